//! A small pull reader for the JSON vmesh consumes inside Wasm (name tables, filter config,
//! the shim's replies to the agent), and a writer for what the agent sends.
//!
//! Why not serde_json here: inside the filter it costs about 60 KB of a 250 KB budget (most of
//! it float formatting and per-type monomorphised visitors). Native code keeps using serde;
//! tests check both agree on the same documents. Like the DNS decoder, every read is
//! bounds-checked and returns a typed error with the byte offset; nesting is bounded, so
//! hostile input can neither panic nor exhaust the stack.

use std::borrow::Cow;

/// Deepest nesting [`Reader::skip_value`] follows.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON at byte {at}: {kind}")]
pub struct JsonError {
    pub at: usize,
    pub kind: JsonErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonErrorKind {
    #[error("unexpected end of input")]
    Eof,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("invalid escape in string")]
    BadEscape,
    #[error("control character in string")]
    ControlCharacter,
    #[error("invalid UTF-8")]
    BadUtf8,
    #[error("number is not a non-negative integer that fits 64 bits")]
    BadInteger,
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("trailing characters after the document")]
    Trailing,
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("duplicate field {0:?}")]
    DuplicateField(String),
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    #[error("{0}")]
    Invalid(String),
}

/// Reads one JSON document front to back.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// Continues reading at `pos` (a position this reader reported earlier).
    pub fn seek(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    pub fn error(&self, kind: JsonErrorKind) -> JsonError {
        JsonError { at: self.pos, kind }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.buf.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, JsonError> {
        self.skip_ws();
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(self.error(JsonErrorKind::Eof))
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek()? != byte {
            return Err(self.error(JsonErrorKind::Expected(what)));
        }
        self.pos += 1;
        Ok(())
    }

    /// Consumes `{`. Then call [`Reader::next_key`] until it returns `None`.
    pub fn begin_object(&mut self) -> Result<(), JsonError> {
        self.expect(b'{', "an object")
    }

    /// The next key of the current object (its value is next), or `None` after the `}`.
    /// `first` tells whether this is the first call for this object.
    pub fn next_key(&mut self, first: &mut bool) -> Result<Option<Cow<'a, str>>, JsonError> {
        match self.peek()? {
            b'}' => {
                self.pos += 1;
                return Ok(None);
            }
            b',' if !*first => self.pos += 1,
            _ if *first => {}
            _ => return Err(self.error(JsonErrorKind::Expected("',' or '}'"))),
        }
        *first = false;
        let key = self.string()?;
        self.expect(b':', "':'")?;
        Ok(Some(key))
    }

    /// Consumes `[`. Then call [`Reader::next_element`] before each element.
    pub fn begin_array(&mut self) -> Result<(), JsonError> {
        self.expect(b'[', "an array")
    }

    /// Whether another element follows (consuming the `,`), or the `]` ended the array.
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool, JsonError> {
        match self.peek()? {
            b']' => {
                self.pos += 1;
                Ok(false)
            }
            b',' if !*first => {
                self.pos += 1;
                Ok(true)
            }
            _ if *first => {
                *first = false;
                Ok(true)
            }
            _ => Err(self.error(JsonErrorKind::Expected("',' or ']'"))),
        }
    }

    pub fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.expect(b'"', "a string")?;
        let start = self.pos;
        // Fast path: no escapes, borrow straight from the input.
        loop {
            match self.buf.get(self.pos) {
                None => return Err(self.error(JsonErrorKind::Eof)),
                Some(b'"') => {
                    let raw = self.buf.get(start..self.pos).unwrap_or_default();
                    self.pos += 1;
                    return std::str::from_utf8(raw)
                        .map(Cow::Borrowed)
                        .map_err(|_| JsonError {
                            at: start,
                            kind: JsonErrorKind::BadUtf8,
                        });
                }
                Some(b'\\') => break,
                Some(&b) if b < 0x20 => return Err(self.error(JsonErrorKind::ControlCharacter)),
                Some(_) => self.pos += 1,
            }
        }
        let mut out: Vec<u8> = self.buf.get(start..self.pos).unwrap_or_default().to_vec();
        loop {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or(self.error(JsonErrorKind::Eof))?;
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let e = *self
                        .buf
                        .get(self.pos)
                        .ok_or(self.error(JsonErrorKind::Eof))?;
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0C),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                        }
                        _ => return Err(self.error(JsonErrorKind::BadEscape)),
                    }
                }
                b if b < 0x20 => return Err(self.error(JsonErrorKind::ControlCharacter)),
                b => out.push(b),
            }
        }
        String::from_utf8(out)
            .map(Cow::Owned)
            .map_err(|_| JsonError {
                at: start,
                kind: JsonErrorKind::BadUtf8,
            })
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .buf
            .get(self.pos..self.pos + 4)
            .ok_or(self.error(JsonErrorKind::Eof))?;
        let mut v = 0u32;
        for &d in digits {
            let n = char::from(d)
                .to_digit(16)
                .ok_or(self.error(JsonErrorKind::BadEscape))?;
            v = (v << 4) | n;
        }
        self.pos += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, JsonError> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if self.buf.get(self.pos..self.pos + 2) != Some(b"\\u".as_slice()) {
                return Err(self.error(JsonErrorKind::BadEscape));
            }
            self.pos += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(self.error(JsonErrorKind::BadEscape));
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).ok_or(self.error(JsonErrorKind::BadEscape))
    }

    pub fn u64(&mut self) -> Result<u64, JsonError> {
        self.skip_ws();
        let start = self.pos;
        let mut v: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.buf.get(self.pos) {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(d - b'0')))
                .ok_or(JsonError {
                    at: start,
                    kind: JsonErrorKind::BadInteger,
                })?;
            self.pos += 1;
        }
        let digits = self.pos - start;
        let leading_zero = digits > 1 && self.buf.get(start) == Some(&b'0');
        let fraction = matches!(self.buf.get(self.pos), Some(b'.' | b'e' | b'E'));
        if digits == 0 || leading_zero || fraction {
            return Err(JsonError {
                at: start,
                kind: JsonErrorKind::BadInteger,
            });
        }
        Ok(v)
    }

    pub fn bool(&mut self) -> Result<bool, JsonError> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| true),
            b'f' => self.literal(b"false").map(|()| false),
            _ => Err(self.error(JsonErrorKind::Expected("true or false"))),
        }
    }

    /// Consumes a `null` if one is next (an absent optional value), and says so.
    pub fn null(&mut self) -> Result<bool, JsonError> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Skips any value (used for fields a newer producer added), to a bounded depth, in one
    /// forward pass.
    pub fn skip_value(&mut self) -> Result<(), JsonError> {
        // Open containers, innermost last: true for an object.
        let mut stack = [false; MAX_DEPTH];
        let mut depth = 0usize;
        loop {
            let b = self.peek()?;
            match b {
                b'{' | b'[' => {
                    let is_object = b == b'{';
                    let slot = stack
                        .get_mut(depth)
                        .ok_or(self.error(JsonErrorKind::TooDeep))?;
                    *slot = is_object;
                    depth += 1;
                    self.pos += 1;
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.pos += 1;
                        depth -= 1;
                    } else {
                        if is_object {
                            self.string()?;
                            self.expect(b':', "':'")?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.skip_number()?,
                _ => return Err(self.error(JsonErrorKind::Expected("a value"))),
            }
            // After a value: done, the next member of the enclosing container, or its end.
            loop {
                let Some(&is_object) = depth.checked_sub(1).and_then(|d| stack.get(d)) else {
                    return Ok(());
                };
                match self.peek()? {
                    b',' => {
                        self.pos += 1;
                        if is_object {
                            self.string()?;
                            self.expect(b':', "':'")?;
                        }
                        break;
                    }
                    b'}' if is_object => {
                        self.pos += 1;
                        depth -= 1;
                    }
                    b']' if !is_object => {
                        self.pos += 1;
                        depth -= 1;
                    }
                    _ => {
                        return Err(self.error(JsonErrorKind::Expected("',' or a closing bracket")))
                    }
                }
            }
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.buf.get(self.pos..self.pos + word.len()) != Some(word) {
            return Err(self.error(JsonErrorKind::Expected("a value")));
        }
        self.pos += word.len();
        Ok(())
    }

    fn skip_number(&mut self) -> Result<(), JsonError> {
        let start = self.pos;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.buf.get(self.pos) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(JsonErrorKind::Expected("a number")));
        }
        Ok(())
    }

    /// Ensures nothing but whitespace follows the document.
    pub fn end(&mut self) -> Result<(), JsonError> {
        self.skip_ws();
        if self.pos != self.buf.len() {
            return Err(self.error(JsonErrorKind::Trailing));
        }
        Ok(())
    }
}

/// Writes one JSON object, member by member, into a `String`. Nested objects start with
/// [`Writer::begin`] and end with [`Writer::end`]; the caller keeps them balanced.
#[derive(Debug)]
pub struct Writer {
    out: String,
    /// Whether the innermost open object has a member yet.
    has_member: bool,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    pub fn new() -> Self {
        Writer {
            out: String::from("{"),
            has_member: false,
        }
    }

    fn key(&mut self, key: &str) {
        if self.has_member {
            self.out.push(',');
        }
        self.has_member = true;
        write_string(&mut self.out, key);
        self.out.push(':');
    }

    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_string(&mut self.out, value);
        self
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        use std::fmt::Write;
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// Opens an object as the value of `key`.
    pub fn begin(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.push('{');
        self.has_member = false;
        self
    }

    /// Closes the innermost object opened with [`Writer::begin`].
    pub fn end(&mut self) -> &mut Self {
        self.out.push('}');
        self.has_member = true;
        self
    }

    /// Closes the outer object and returns the document.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// Appends `s` as a JSON string (RFC 8259 §7: quote, backslash and control characters escaped).
pub fn write_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip_all(doc: &str) -> Result<(), JsonError> {
        let mut r = Reader::new(doc.as_bytes());
        r.skip_value()?;
        r.end()
    }

    #[test]
    fn rfc8259_7_strings_unescape_including_surrogate_pairs() {
        let cases: &[(&str, &str)] = &[
            (r#""plain""#, "plain"),
            (r#""a\"b\\c\/d""#, "a\"b\\c/d"),
            (r#""\b\f\n\r\t""#, "\u{8}\u{c}\n\r\t"),
            (r#""\u00e9\u4e2d""#, "é中"),
            (r#""\ud83d\ude00""#, "😀"),
            ("\"é\"", "é"),
        ];
        for (doc, want) in cases {
            assert_eq!(
                Reader::new(doc.as_bytes()).string().unwrap(),
                *want,
                "{doc}"
            );
        }
    }

    #[test]
    fn malformed_strings_are_typed_errors() {
        let cases: &[(&[u8], JsonErrorKind)] = &[
            (b"\"abc", JsonErrorKind::Eof),
            (b"\"a\\x\"", JsonErrorKind::BadEscape),
            (b"\"\\ud83d\"", JsonErrorKind::BadEscape),
            (b"\"\\udc00\"", JsonErrorKind::BadEscape),
            (b"\"\\u12zz\"", JsonErrorKind::BadEscape),
            (b"\"a\nb\"", JsonErrorKind::ControlCharacter),
            (b"\"\xff\"", JsonErrorKind::BadUtf8),
            (b"12", JsonErrorKind::Expected("a string")),
        ];
        for (doc, want) in cases {
            assert_eq!(
                Reader::new(doc).string().unwrap_err().kind,
                *want,
                "{doc:?}"
            );
        }
    }

    #[test]
    fn integers_are_exact_or_refused() {
        assert_eq!(Reader::new(b" 0").u64().unwrap(), 0);
        assert_eq!(
            Reader::new(b"18446744073709551615").u64().unwrap(),
            u64::MAX
        );
        for bad in ["18446744073709551616", "-1", "1.5", "1e3", "01", "x"] {
            assert_eq!(
                Reader::new(bad.as_bytes()).u64().unwrap_err().kind,
                JsonErrorKind::BadInteger,
                "{bad}"
            );
        }
    }

    #[test]
    fn skipping_agrees_with_serde_json_on_what_is_a_document() {
        let docs = [
            r#"{}"#,
            r#"[]"#,
            r#"{"a":[1,2,{"b":null}],"c":{"d":[true,false,"x\"}"]},"e":-1.5e+10}"#,
            r#"[[[[]]],{},[{}]]"#,
            r#""just a string""#,
            r#"{"a":1,}"#,
            r#"[1,]"#,
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            r#"[1 2]"#,
            r#"{1:2}"#,
            r#"[}"#,
            r#"{]"#,
            r#"nul"#,
            r#"{"a":[1,2}"#,
            r#""#,
            r#"[1] [2]"#,
        ];
        for doc in docs {
            let ours = skip_all(doc).is_ok();
            let serde = serde_json::from_str::<serde_json::Value>(doc).is_ok();
            assert_eq!(ours, serde, "{doc}");
        }
    }

    #[test]
    fn nesting_is_bounded_not_recursive() {
        let deep = "[".repeat(100_000);
        assert_eq!(skip_all(&deep).unwrap_err().kind, JsonErrorKind::TooDeep);
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(skip_all(&ok).is_ok());
    }

    #[test]
    fn objects_and_arrays_are_walked_member_by_member() {
        let mut r = Reader::new(br#" { "a" : [ "x" , "y" ] , "b" : 7 } "#);
        r.begin_object().unwrap();
        let mut first = true;
        assert_eq!(r.next_key(&mut first).unwrap().as_deref(), Some("a"));
        r.begin_array().unwrap();
        let mut f = true;
        let mut items = Vec::new();
        while r.next_element(&mut f).unwrap() {
            items.push(r.string().unwrap().into_owned());
        }
        assert_eq!(items, ["x", "y"]);
        assert_eq!(r.next_key(&mut first).unwrap().as_deref(), Some("b"));
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.next_key(&mut first).unwrap(), None);
        r.end().unwrap();
    }

    #[test]
    fn rfc8259_7_written_strings_escape_what_must_be_escaped() {
        let mut w = Writer::new();
        w.string("k\"1", "a\"b\\c\n\u{1}é")
            .u64("n", 18446744073709551615)
            .bool("t", true)
            .begin("o")
            .bool("f", false)
            .end()
            .begin("empty")
            .end();
        let doc = w.finish();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["k\"1"], "a\"b\\c\n\u{1}é");
        assert_eq!(v["n"], 18446744073709551615u64);
        assert_eq!(v["o"]["f"], false);
        assert_eq!(v["empty"], serde_json::json!({}));
        let mut r = Reader::new(doc.as_bytes());
        r.begin_object().unwrap();
        let mut first = true;
        assert_eq!(r.next_key(&mut first).unwrap().as_deref(), Some("k\"1"));
        assert_eq!(r.string().unwrap(), "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn booleans_and_null() {
        assert_eq!(Reader::new(b" true").bool(), Ok(true));
        assert_eq!(Reader::new(b"false").bool(), Ok(false));
        assert!(Reader::new(b"1").bool().is_err());
        assert!(Reader::new(b"tru").bool().is_err());
        assert_eq!(Reader::new(b"null").null(), Ok(true));
        let mut r = Reader::new(b"1");
        assert_eq!(r.null(), Ok(false));
        assert_eq!(r.u64(), Ok(1));
    }
}
