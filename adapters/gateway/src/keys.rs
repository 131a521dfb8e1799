//! Key lists: `KEYPOOL_KEYS` (comma- or newline-separated) and key files (one per line, `#`
//! comments, optional `label=key`). Errors name the line, never the key.

use keypool_core::KeySpec;

/// A key list that cannot be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The list has no key at all.
    #[error("{source_name} has no keys (one key per line, `#` starts a comment, `label=key` names a key)")]
    Empty {
        /// Where the list came from.
        source_name: String,
    },
    /// A line has a label with characters other than letters, digits, `.`, `_`, `-`.
    #[error("{source_name} line {line}: the label before `=` must be 1-64 letters, digits, '.', '_' or '-'")]
    BadLabel {
        /// Where the list came from.
        source_name: String,
        /// 1-based line (or item) number.
        line: usize,
    },
    /// A line has `label=` and no key.
    #[error("{source_name} line {line}: `label=` is followed by no key")]
    MissingKey {
        /// Where the list came from.
        source_name: String,
        /// 1-based line (or item) number.
        line: usize,
    },
}

/// One key of a list, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedKey {
    /// The key and its label.
    pub spec: KeySpec,
    /// 1-based line (or item) number.
    pub line: usize,
}

/// Parses a key file's text.
pub fn parse_file(text: &str, source_name: &str) -> Result<Vec<ListedKey>, KeysError> {
    parse_items(text.lines(), source_name)
}

/// Parses `KEYPOOL_KEYS`: items separated by commas or newlines.
pub fn parse_env(value: &str, source_name: &str) -> Result<Vec<ListedKey>, KeysError> {
    parse_items(value.split([',', '\n']), source_name)
}

fn parse_items<'a>(
    items: impl Iterator<Item = &'a str>,
    source_name: &str,
) -> Result<Vec<ListedKey>, KeysError> {
    let mut out = Vec::new();
    for (i, raw) in items.enumerate() {
        let line = i + 1;
        let text = raw.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        let spec = match text.split_once('=') {
            Some((label, key)) => {
                let (label, key) = (label.trim(), key.trim());
                if !valid_label(label) {
                    return Err(KeysError::BadLabel {
                        source_name: source_name.to_owned(),
                        line,
                    });
                }
                if key.is_empty() {
                    return Err(KeysError::MissingKey {
                        source_name: source_name.to_owned(),
                        line,
                    });
                }
                KeySpec::labelled(label, key)
            }
            None => KeySpec::new(text),
        };
        out.push(ListedKey { spec, line });
    }
    if out.is_empty() {
        return Err(KeysError::Empty {
            source_name: source_name.to_owned(),
        });
    }
    Ok(out)
}

fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format() {
        let text = "# team keys\n\nteam-a = sk-ant-aaaa-1111111111  # primary\nsk-ant-bbbb-2222222222\n  \n";
        let keys = parse_file(text, "keys.txt").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].spec.label.as_deref(), Some("team-a"));
        assert_eq!(keys[0].spec.secret, "sk-ant-aaaa-1111111111");
        assert_eq!(keys[0].line, 3);
        assert_eq!(keys[1].spec.label, None);
        assert_eq!(keys[1].line, 4);
    }

    #[test]
    fn env_format() {
        let keys = parse_env("a=sk-1111111111, sk-2222222222\nsk-3333333333", "KEYPOOL_KEYS").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2].line, 3);
    }

    #[test]
    fn errors_name_lines_not_keys() {
        let e = parse_file("ok-key-1234567\nbad label=sk-secret-99999999\n", "f").unwrap_err();
        assert_eq!(
            e,
            KeysError::BadLabel {
                source_name: "f".into(),
                line: 2
            }
        );
        assert!(!e.to_string().contains("sk-secret"));
        let e = parse_file("x=\n", "f").unwrap_err();
        assert!(e.to_string().contains("line 1"));
        assert!(matches!(
            parse_file("# only\n\n", "f"),
            Err(KeysError::Empty { .. })
        ));
        assert!(matches!(parse_env(" , ,", "env"), Err(KeysError::Empty { .. })));
    }
}
