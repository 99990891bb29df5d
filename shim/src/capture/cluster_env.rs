//! Reading Istio's `cluster.env`: the shell variable file `istioctl x workload entry configure`
//! writes for a VM (`ISTIO_INBOUND_PORTS='*'` and so on, one per line).
//!
//! It is meant to be sourced by a shell, so it is read as a shell would for the plain forms it
//! contains: `KEY=value`, `KEY='value'`, `KEY="value"` (with `\"`, `\\`, `\$` and `` \` ``
//! escapes), an optional `export `, `#` comments and blank lines. Anything that would make a
//! shell expand or run something (`$VAR`, `` `cmd` ``, `$(cmd)`) is refused rather than taken
//! literally. Only the keys asked for are checked; a line this reader does not understand is
//! an error only if it sets one of them.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {key}: {why}")]
pub struct EnvLineError {
    pub line: usize,
    pub key: String,
    pub why: &'static str,
}

/// The values of `keys` found in `text` (a later assignment wins, as in a shell), and the
/// lines setting one of them that could not be read.
pub fn parse(text: &str, keys: &[&str]) -> (HashMap<String, String>, Vec<EnvLineError>) {
    let mut values = HashMap::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, rest)) = line.split_once('=') else {
            continue;
        };
        if !keys.contains(&key) {
            continue;
        }
        match value(rest) {
            Ok(v) => {
                values.insert(key.to_string(), v);
            }
            Err(why) => errors.push(EnvLineError {
                line: i + 1,
                key: key.to_string(),
                why,
            }),
        }
    }
    (values, errors)
}

/// One shell word: quoted and unquoted parts joined, up to unquoted whitespace; after it only
/// a comment may follow.
fn value(text: &str) -> Result<String, &'static str> {
    const EXPANSION: &str = "shell expansion ($ or `) is not supported: quote it with '...'";
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err("unterminated '"),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some('\n') => {}
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => return Err("unterminated \""),
                    },
                    Some('$' | '`') => return Err(EXPANSION),
                    Some(c) => out.push(c),
                    None => return Err("unterminated \""),
                }
            },
            '\\' => match chars.next() {
                Some(c) => out.push(c),
                None => return Err("trailing \\"),
            },
            '$' | '`' => return Err(EXPANSION),
            c if c.is_whitespace() => {
                let rest = chars.as_str().trim_start();
                if rest.is_empty() || rest.starts_with('#') {
                    break;
                }
                return Err("unquoted space in the value");
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("'*'", Ok("*")),
            ("15090,15021,15020", Ok("15090,15021,15020")),
            ("'15090,15021'", Ok("15090,15021")),
            ("\"10.0.0.0/8\"", Ok("10.0.0.0/8")),
            ("", Ok("")),
            ("''", Ok("")),
            ("'a'\"b\"c", Ok("abc")),
            ("'it'\\''s'", Ok("it's")),
            ("\"a \\\"b\\\" \\$c\"", Ok("a \"b\" $c")),
            ("'$literal'", Ok("$literal")),
            ("'x'  # comment", Ok("x")),
            ("x #comment", Ok("x")),
            ("'{\"app\":\"vm\"}'", Ok("{\"app\":\"vm\"}")),
            (
                "$HOME",
                Err("shell expansion ($ or `) is not supported: quote it with '...'"),
            ),
            (
                "\"$(id)\"",
                Err("shell expansion ($ or `) is not supported: quote it with '...'"),
            ),
            (
                "`id`",
                Err("shell expansion ($ or `) is not supported: quote it with '...'"),
            ),
            ("'open", Err("unterminated '")),
            ("\"open", Err("unterminated \"")),
            ("a b", Err("unquoted space in the value")),
        ];
        for (text, want) in cases {
            assert_eq!(value(text).as_deref(), want.as_deref(), "{text}");
        }
    }

    #[test]
    fn a_file_as_istioctl_writes_it() {
        let text = "\
CANONICAL_REVISION='1'
CANONICAL_SERVICE='python-http'
ISTIO_INBOUND_PORTS='*'
ISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'
ISTIO_METAJSON_LABELS='{\"app\":\"python-http\",\"service.istio.io/canonical-name\":\"python-http\"}'
ISTIO_META_DNS_CAPTURE='true'
# a comment
  export ISTIO_SERVICE_CIDR=\"10.96.0.0/12\"
ISTIO_SERVICE_CIDR='*'
POD_NAMESPACE=$(cat /etc/ns)
ISTIO_SERVICE_EXCLUDE_CIDR=$EXCLUDED
SERVICE_ACCOUNT='vm-sa'
";
        let keys = [
            "ISTIO_INBOUND_PORTS",
            "ISTIO_LOCAL_EXCLUDE_PORTS",
            "ISTIO_SERVICE_CIDR",
            "ISTIO_SERVICE_EXCLUDE_CIDR",
            "ISTIO_META_DNS_CAPTURE",
            "ENVOY_PORT",
        ];
        let (values, errors) = parse(text, &keys);
        let get = |k: &str| values.get(k).map(String::as_str);
        assert_eq!(get("ISTIO_INBOUND_PORTS"), Some("*"));
        assert_eq!(get("ISTIO_LOCAL_EXCLUDE_PORTS"), Some("15090,15021,15020"));
        assert_eq!(get("ISTIO_SERVICE_CIDR"), Some("*"), "the later line wins");
        assert_eq!(get("ISTIO_META_DNS_CAPTURE"), Some("true"));
        assert_eq!(get("ENVOY_PORT"), None);
        assert_eq!(
            get("POD_NAMESPACE"),
            None,
            "not asked for: not even checked"
        );
        assert_eq!(
            errors,
            vec![EnvLineError {
                line: 11,
                key: "ISTIO_SERVICE_EXCLUDE_CIDR".into(),
                why: "shell expansion ($ or `) is not supported: quote it with '...'",
            }]
        );
    }
}
