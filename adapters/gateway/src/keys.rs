//! Key lists: `KEYPOOL_KEYS` (comma- or newline-separated), key files (one per line, `#`
//! comments, optional `label=key`) and the `keys = [...]` list of a config file. Errors name the
//! line or item, never the key.

use keypool_core::KeySpec;

/// How a key list is written, which decides how its errors read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A file: one key per line.
    File,
    /// A comma- or newline-separated value (an environment variable).
    Separated,
    /// A list of strings (the `keys = [...]` of a config file).
    List,
}

impl Form {
    fn unit(self) -> &'static str {
        match self {
            Self::File => "line",
            Self::Separated | Self::List => "item",
        }
    }
}

/// A key list that cannot be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The list has no key at all.
    #[error("{}", empty_message(source_name, *form))]
    Empty {
        /// Where the list came from.
        source_name: String,
        /// How it is written.
        form: Form,
    },
    /// A line has a label with characters other than letters, digits, `.`, `_`, `-`.
    #[error("{source_name} {} {line}: the label before `=` must be 1-64 letters, digits, '.', '_' or '-'", form.unit())]
    BadLabel {
        /// Where the list came from.
        source_name: String,
        /// How it is written.
        form: Form,
        /// 1-based line (or item) number.
        line: usize,
    },
    /// A line has `label=` and no key.
    #[error("{source_name} {} {line}: `label=` is followed by no key", form.unit())]
    MissingKey {
        /// Where the list came from.
        source_name: String,
        /// How it is written.
        form: Form,
        /// 1-based line (or item) number.
        line: usize,
    },
}

fn empty_message(source_name: &str, form: Form) -> String {
    match form {
        Form::File => format!(
            "{source_name} has no keys: write one key per line (`#` starts a comment, `label=key` names a key)"
        ),
        Form::Separated => format!(
            "{source_name} has no keys: give them comma-separated, e.g. key1,key2 (`label=key` names a key)"
        ),
        Form::List => {
            format!("{source_name} is empty: list the keys, e.g. keys = [\"key1\", \"team-b=key2\"]")
        }
    }
}

/// One key of a list, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedKey {
    /// The key and its label.
    pub spec: KeySpec,
    /// 1-based line (or item) number.
    pub line: usize,
}

/// The UTF-8 byte-order mark some editors (Notepad, PowerShell's `Out-File`) put at the start
/// of a text file. It is not part of the first key.
const BOM: char = '\u{feff}';

/// Removes a leading UTF-8 byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix(BOM).unwrap_or(text)
}

/// Parses a key file's text (a leading byte-order mark is skipped).
pub fn parse_file(text: &str, source_name: &str) -> Result<Vec<ListedKey>, KeysError> {
    parse_items(strip_bom(text).lines(), source_name, Form::File)
}

/// Parses `KEYPOOL_KEYS`: items separated by commas or newlines.
pub fn parse_env(value: &str, source_name: &str) -> Result<Vec<ListedKey>, KeysError> {
    parse_items(strip_bom(value).split([',', '\n']), source_name, Form::Separated)
}

/// Parses the `keys = [...]` list of a config file: one key (or `label=key`) per item.
pub fn parse_list(items: &[String], source_name: &str) -> Result<Vec<ListedKey>, KeysError> {
    parse_items(items.iter().map(String::as_str), source_name, Form::List)
}

fn parse_items<'a>(
    items: impl Iterator<Item = &'a str>,
    source_name: &str,
    form: Form,
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
                        form,
                        line,
                    });
                }
                if key.is_empty() {
                    return Err(KeysError::MissingKey {
                        source_name: source_name.to_owned(),
                        form,
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
            form,
        });
    }
    Ok(out)
}

/// Whether `label` is a usable key (or pool) label: 1-64 letters, digits, `.`, `_`, `-`.
pub fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Keys shorter than this are almost certainly not whole API keys (Anthropic's are about 100
/// characters).
const PLAUSIBLE_LEN: usize = 20;

/// Warnings for keys that do not look like Anthropic API keys: one line per such key, naming
/// its position (and label, when it has one), never the key. A warning, not an error: test
/// upstreams and compatible APIs may use other keys.
pub fn implausible(keys: &[KeySpec]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let secret = key.secret.trim();
        let problem = if secret.chars().count() < PLAUSIBLE_LEN {
            "is shorter than 20 characters; Anthropic API keys are about 100 (is it the whole key?)"
        } else if secret.starts_with("sk-ant-admin") {
            "is an Anthropic Admin API key, which cannot call the Messages API; use an API key (sk-ant-api...)"
        } else if !secret.starts_with("sk-ant-") {
            "does not start with sk-ant- as Anthropic API keys do (fine for a test or compatible upstream)"
        } else {
            continue;
        };
        let name = match &key.label {
            Some(label) => format!("key #{} ({label})", i + 1),
            None => format!("key #{}", i + 1),
        };
        out.push(format!("{name} {problem}"));
    }
    out
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
    fn a_byte_order_mark_is_not_part_of_the_first_key() {
        let keys = parse_file(
            "\u{feff}sk-ant-api03-first\r\nsk-ant-api03-second\r\n",
            "keys.txt",
        )
        .unwrap();
        assert_eq!(keys[0].spec.secret, "sk-ant-api03-first");
        assert_eq!(keys[1].spec.secret, "sk-ant-api03-second");
        let keys = parse_file("\u{feff}team-a=sk-ant-api03-first\n", "keys.txt").unwrap();
        assert_eq!(keys[0].spec.label.as_deref(), Some("team-a"));
        // The pool accepts what the parser produced.
        let specs: Vec<KeySpec> = keys.into_iter().map(|k| k.spec).collect();
        assert!(
            keypool_core::Pool::new(specs, keypool_core::Order::default(), std::time::Instant::now()).is_ok()
        );
    }

    #[test]
    fn empty_lists_say_how_their_source_is_written() {
        let e = parse_env("", "KEYPOOL_KEYS").unwrap_err().to_string();
        assert!(e.contains("comma-separated"), "{e}");
        assert!(!e.contains("per line"), "{e}");
        let e = parse_file("# nothing\n", "keys.txt").unwrap_err().to_string();
        assert!(e.contains("one key per line"), "{e}");
        let e = parse_list(&[], "keypool.toml [[pool]] main keys")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty") && e.contains("keys = ["), "{e}");
    }

    #[test]
    fn errors_name_lines_not_keys() {
        let e = parse_file("ok-key-1234567\nbad label=sk-secret-99999999\n", "f").unwrap_err();
        assert_eq!(
            e,
            KeysError::BadLabel {
                source_name: "f".into(),
                form: Form::File,
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
        let e = parse_list(&["ok".into(), "bad label=sk-x".into()], "list").unwrap_err();
        assert!(e.to_string().contains("item 2"), "{e}");
    }

    #[test]
    fn implausible_keys_are_named_by_position_never_shown() {
        let keys = [
            KeySpec::new("sk-ant-api03-looks-right-0123456789"),
            KeySpec::new("abc"),
            KeySpec::labelled("team-c", "some-other-provider-key-0123456789"),
            KeySpec::new("sk-ant-admin01-0123456789abcdef"),
        ];
        let w = implausible(&keys);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("key #2 is shorter than 20"), "{}", w[0]);
        assert!(
            w[1].starts_with("key #3 (team-c) does not start with sk-ant-"),
            "{}",
            w[1]
        );
        assert!(w[2].contains("Admin API key"), "{}", w[2]);
        let all = w.join("\n");
        assert!(!all.contains("abc") && !all.contains("other-provider") && !all.contains("0123456789"));
    }
}
