//! The last line of defence for the log: whatever a field holds, one event is one line of
//! printable text.
//!
//! Fields that carry what a VM or client sent are recorded with `?` (Debug: quoted and
//! escaped) so they stay one field. This writer sits under every formatter and escapes any
//! control character that still reaches it (a `%` field somewhere, an error message quoting
//! input, a library's log), so no input can end a line early and forge the next one, or send
//! terminal escape sequences to whoever reads the log.

use std::borrow::Cow;
use std::io::Write;

/// Whether `c` could break a line, rewrite the terminal or reorder text when displayed.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// One formatted event with its control characters escaped; its final newline is kept.
pub fn escape_event(buf: &[u8]) -> Cow<'_, [u8]> {
    let (body, newline) = match buf.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (buf, false),
    };
    let text = String::from_utf8_lossy(body);
    if !text.chars().any(unsafe_char) && matches!(text, Cow::Borrowed(_)) {
        return Cow::Borrowed(buf);
    }
    let mut out = String::with_capacity(buf.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    if newline {
        out.push('\n');
    }
    Cow::Owned(out.into_bytes())
}

/// A writer that escapes each event it is given ([`escape_event`]). tracing-subscriber's
/// formatters hand over one whole event per write.
#[derive(Debug)]
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&escape_event(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line_of_printable_text_whatever_it_holds() {
        let cases: [(&str, &str); 6] = [
            ("plain event\n", "plain event\n"),
            (
                "hostname=vm1\n2025-01-01T00:00:00Z  INFO forged\n",
                "hostname=vm1\\n2025-01-01T00:00:00Z  INFO forged\n",
            ),
            ("a\r\x1b[2Kb\n", "a\\r\\u{1b}[2Kb\n"),
            ("tab\there\n", "tab\\there\n"),
            (
                "c1 \u{9b}31m rtl \u{202e}x\n",
                "c1 \\u{9b}31m rtl \\u{202e}x\n",
            ),
            ("no newline \x07", "no newline \\u{7}"),
        ];
        for (input, want) in cases {
            let got = escape_event(input.as_bytes());
            assert_eq!(String::from_utf8_lossy(&got), want, "{input:?}");
        }
        assert!(matches!(escape_event(b"clean\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_passed_through() {
        let got = escape_event(b"x\xff\x1by\n");
        assert_eq!(String::from_utf8_lossy(&got), "x\u{fffd}\\u{1b}y\n");
    }
}
