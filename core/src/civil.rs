//! Calendar arithmetic on UTC wall-clock times (public for adapters and tests that write the
//! same dates), for the deadlines the upstreams write as dates:
//! RFC 3339 rate-limit resets, "the 1st of next month" of a spend cap, "regain access on
//! 2026-01-01". No time zone data: every date here is UTC or carries a numeric offset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_system(secs: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`: `t` in UTC, whole seconds (truncated), as the upstreams write
/// rate-limit resets; times before 1970 are the epoch.
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
    let (year, month, day) = civil_from_days(secs.div_euclid(DAY));
    let rest = secs.rem_euclid(DAY);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// 00:00 UTC on the 1st of the month after the one `wall` is in (SPEC §11.3).
pub fn first_of_next_month(wall: SystemTime) -> SystemTime {
    let secs = wall
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
    let (year, month, _) = civil_from_days(secs.div_euclid(DAY));
    let (year, month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    to_system(days_from_civil(year, month, 1) * DAY).unwrap_or(wall)
}

/// Parses `n` ASCII digits at the start of `s`.
fn digits(s: &[u8], n: usize) -> Option<u32> {
    let part = s.get(..n)?;
    part.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// `YYYY-MM-DD` at the start of `s`: the date and the rest.
fn date(s: &[u8]) -> Option<(i64, u32, u32, &[u8])> {
    let year = digits(s, 4)?;
    let month = digits(s.get(5..)?, 2)?;
    let day = digits(s.get(8..)?, 2)?;
    if s.get(4) != Some(&b'-') || s.get(7) != Some(&b'-') {
        return None;
    }
    let year = i64::from(year);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some((year, month, day, &s[10..]))
}

/// An RFC 3339 timestamp (`2026-01-01T00:00:40Z`, `2026-01-01T00:00:40.5+01:00`), as the
/// `anthropic-ratelimit-*-reset` headers carry them.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (year, month, day, rest) = date(s.trim().as_bytes())?;
    if !matches!(rest.first(), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let rest = &rest[1..];
    let (h, m, sec) = (
        digits(rest, 2)?,
        digits(rest.get(3..)?, 2)?,
        digits(rest.get(6..)?, 2)?,
    );
    if rest.get(2) != Some(&b':') || rest.get(5) != Some(&b':') || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let mut rest = &rest[8..];
    let mut nanos = 0u32;
    if rest.first() == Some(&b'.') {
        let frac: Vec<u8> = rest[1..].iter().copied().take_while(u8::is_ascii_digit).collect();
        if frac.is_empty() {
            return None;
        }
        for (i, d) in frac.iter().take(9).enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &rest[1 + frac.len()..];
    }
    let offset = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if rest.len() == 6 && rest[3] == b':' => {
            let oh = i64::from(digits(&rest[1..], 2)?);
            let om = i64::from(digits(&rest[4..], 2)?);
            let off = oh * 3600 + om * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * DAY + i64::from(h * 3600 + m * 60 + sec) - offset;
    to_system(secs)?.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// The first `YYYY-MM-DD` date in a message, with an optional ` at HH:MM` after it, read as UTC
/// ("You will regain access on 2026-01-01 at 00:00 UTC").
pub fn find_date(message: &str) -> Option<SystemTime> {
    let bytes = message.as_bytes();
    (0..bytes.len()).find_map(|i| {
        if i > 0 && bytes[i - 1].is_ascii_digit() {
            return None;
        }
        let (year, month, day, rest) = date(&bytes[i..])?;
        let mut secs = days_from_civil(year, month, day) * DAY;
        if let Some(time) = rest.strip_prefix(b" at ")
            && let (Some(h), Some(m)) = (digits(time, 2), time.get(3..).and_then(|t| digits(t, 2)))
            && time.get(2) == Some(&b':')
            && h < 24
            && m < 60
        {
            secs += i64::from(h * 3600 + m * 60);
        }
        to_system(secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn calendar_round_trips() {
        for days in [-800_000, -1, 0, 1, 59, 365, 11_016, 20_454, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    #[test]
    fn next_month() {
        // 2026-01-31T23:59:59Z → 2026-02-01.
        assert_eq!(first_of_next_month(at(1_769_903_999)), at(1_769_904_000));
        // 2026-12-15 → 2027-01-01.
        assert_eq!(first_of_next_month(at(1_797_292_800)), at(1_798_761_600));
        // Exactly the 1st → the 1st of the month after.
        assert_eq!(first_of_next_month(at(1_769_904_000)), at(1_772_323_200));
    }

    #[test]
    fn rfc3339_both_ways() {
        for secs in [0, 1_767_225_640, 1_709_251_199, 4_102_444_799] {
            let text = format_rfc3339(at(secs));
            assert_eq!(parse_rfc3339(&text), Some(at(secs)), "{text}");
        }
        assert_eq!(format_rfc3339(at(1_709_251_199)), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("2026-01-01T00:00:40Z"), Some(at(1_767_225_640)));
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:40.5+01:00"),
            Some(at(1_767_225_640) + Duration::from_millis(500))
        );
        for bad in [
            "",
            "2026-01-01",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T00:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_in_messages() {
        let m = "You have reached your specified workspace API usage limits. You will regain access on 2026-02-01 at 00:00 UTC.";
        assert_eq!(find_date(m), Some(at(1_769_904_000)));
        assert_eq!(
            find_date("regain access on 2026-02-01 at 06:30 UTC"),
            Some(at(1_769_927_400))
        );
        assert_eq!(find_date("regain access on 2026-02-01."), Some(at(1_769_904_000)));
        assert_eq!(find_date("no date here 12026-02-31"), None);
    }
}
