//! The one way vmesh reads and writes DNS bytes.
//!
//! Every read is bounds-checked and returns a typed [`WireError`]; nothing here can panic on
//! hostile input. Names are decoded with RFC 1035 §4.1.4 compression, following pointers only
//! strictly backwards so a packet cannot make the decoder loop.

use super::WireError;

/// Longest name in wire form, RFC 1035 §2.3.4.
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Longest label, RFC 1035 §2.3.4.
pub const MAX_LABEL_LEN: usize = 63;

/// Bounds-checked cursor over a DNS message.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn read_u8(&mut self) -> Result<u8, WireError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(WireError::Truncated { at: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    pub fn read_u16(&mut self) -> Result<u16, WireError> {
        let s = self.read_slice(2)?;
        Ok(u16::from_be_bytes([
            s.first().copied().unwrap_or(0),
            s.get(1).copied().unwrap_or(0),
        ]))
    }

    pub fn read_u32(&mut self) -> Result<u32, WireError> {
        let s = self.read_slice(4)?;
        let mut b = [0u8; 4];
        b.copy_from_slice(s);
        Ok(u32::from_be_bytes(b))
    }

    pub fn read_slice(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(WireError::Truncated { at: self.pos })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated { at: self.pos })?;
        self.pos = end;
        Ok(s)
    }

    pub fn skip(&mut self, len: usize) -> Result<(), WireError> {
        self.read_slice(len).map(|_| ())
    }

    /// Reads a possibly compressed name and returns it as labels (case preserved).
    ///
    /// The cursor ends after the name's bytes at the current position (after the first pointer,
    /// if any), which is what the caller needs to continue reading the record.
    pub fn read_name(&mut self) -> Result<Labels<'a>, WireError> {
        let mut labels = Labels::default();
        let mut wire_len = 0usize;
        let mut cursor = self.pos;
        // Where the caller continues: set once, at the first pointer followed.
        let mut resume: Option<usize> = None;
        // Pointers must point strictly before the position they were read at; that makes every
        // jump move backwards, so the walk terminates without a hop counter.
        let mut limit = self.pos;
        loop {
            let len = *self
                .buf
                .get(cursor)
                .ok_or(WireError::Truncated { at: cursor })?;
            match len & 0xC0 {
                0x00 => {
                    wire_len += usize::from(len) + 1;
                    if wire_len > MAX_NAME_WIRE_LEN {
                        return Err(WireError::NameTooLong);
                    }
                    if len == 0 {
                        cursor += 1;
                        break;
                    }
                    let start = cursor + 1;
                    let end = start + usize::from(len);
                    let label = self
                        .buf
                        .get(start..end)
                        .ok_or(WireError::Truncated { at: start })?;
                    labels.push(label)?;
                    cursor = end;
                }
                0xC0 => {
                    let low = *self
                        .buf
                        .get(cursor + 1)
                        .ok_or(WireError::Truncated { at: cursor + 1 })?;
                    let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                    if target >= limit {
                        return Err(WireError::BadPointer { at: cursor });
                    }
                    if resume.is_none() {
                        resume = Some(cursor + 2);
                    }
                    limit = target;
                    cursor = target;
                }
                _ => return Err(WireError::BadLabelType { at: cursor }),
            }
        }
        self.pos = resume.unwrap_or(cursor);
        Ok(labels)
    }
}

/// Labels of a decoded name, borrowed from the message. At most 127 labels fit in 255 bytes.
#[derive(Debug, Clone, Default)]
pub struct Labels<'a> {
    labels: Vec<&'a [u8]>,
}

impl<'a> Labels<'a> {
    fn push(&mut self, label: &'a [u8]) -> Result<(), WireError> {
        if label.len() > MAX_LABEL_LEN {
            return Err(WireError::LabelTooLong);
        }
        self.labels.push(label);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.labels.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Lower-cased dotted form without the trailing dot ("" for the root), or `None` when a
    /// label holds a byte that cannot appear in a mesh host name ('.', whitespace, non-ASCII...).
    /// Such names are never in the table, so callers forward them untouched.
    pub fn to_lower_dotted(&self) -> Option<String> {
        let mut out = String::with_capacity(self.labels.iter().map(|l| l.len() + 1).sum());
        for (i, label) in self.labels.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for &b in label.iter() {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*') {
                    return None;
                }
                out.push(char::from(b.to_ascii_lowercase()));
            }
        }
        Some(out)
    }

    /// Writes the name uncompressed, case preserved.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for label in &self.labels {
            // Length was checked when the label was pushed (<= 63).
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
    }
}

/// Encodes a dotted name ("a.b.c", no trailing dot needed) into wire form.
pub fn encode_dotted_name(name: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let start = out.len();
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() {
                out.truncate(start);
                return Err(WireError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                out.truncate(start);
                return Err(WireError::LabelTooLong);
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() - start > MAX_NAME_WIRE_LEN {
        out.truncate(start);
        return Err(WireError::NameTooLong);
    }
    Ok(())
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Overwrites two bytes at `at`; a no-op when `at` is out of range (callers write headers they
/// created themselves, so that never happens, but it must not panic either).
pub(crate) fn set_u16(buf: &mut [u8], at: usize, v: u16) {
    if let Some(dst) = buf.get_mut(at..at + 2) {
        dst.copy_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(buf: &[u8], at: usize) -> Result<(String, usize), WireError> {
        let mut d = Decoder::new(buf);
        d.skip(at)?;
        let labels = d.read_name()?;
        let text = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>()
            .join(".");
        Ok((text, d.position()))
    }

    #[test]
    fn rfc1035_4_1_4_compression_pointer_is_followed_and_cursor_resumes_after_it() {
        // "foo.bar" at 0, then "www" + pointer to 0 at 9.
        let buf = b"\x03foo\x03bar\x00\x03www\xC0\x00\xFF";
        assert_eq!(name_of(buf, 0).unwrap(), ("foo.bar".to_string(), 9));
        assert_eq!(name_of(buf, 9).unwrap(), ("www.foo.bar".to_string(), 15));
    }

    #[test]
    fn table_of_malformed_names_is_rejected_with_typed_errors() {
        let cases: &[(&[u8], usize, WireError)] = &[
            (b"\x03fo", 0, WireError::Truncated { at: 1 }),
            (b"\x03foo", 0, WireError::Truncated { at: 4 }),
            (b"\xC0\x00", 0, WireError::BadPointer { at: 0 }),
            // pointer to itself / forwards
            (b"\x00\xC0\x01", 1, WireError::BadPointer { at: 1 }),
            (
                b"\x00\xC0\x05\x00\x00\x00",
                1,
                WireError::BadPointer { at: 1 },
            ),
            (b"\x40abc", 0, WireError::BadLabelType { at: 0 }),
            (b"\x80abc", 0, WireError::BadLabelType { at: 0 }),
            (b"\xC0", 0, WireError::Truncated { at: 1 }),
        ];
        for (bytes, at, want) in cases {
            assert_eq!(name_of(bytes, *at).unwrap_err(), *want, "input {bytes:?}");
        }
    }

    #[test]
    fn pointer_loop_between_two_names_terminates() {
        // Name at 2 points to 0, name at 0 points to 2: the second jump goes forwards -> refused.
        let buf = b"\xC0\x02\xC0\x00";
        assert_eq!(
            name_of(buf, 2).unwrap_err(),
            WireError::BadPointer { at: 0 }
        );
    }

    #[test]
    fn rfc1035_2_3_4_names_longer_than_255_octets_are_refused() {
        let mut buf = Vec::new();
        for _ in 0..5 {
            buf.push(63);
            buf.extend_from_slice(&[b'a'; 63]);
        }
        buf.push(0);
        assert_eq!(name_of(&buf, 0).unwrap_err(), WireError::NameTooLong);
        // 4 x 63 + 3 = 255 octets with the root label: allowed.
        let mut ok = Vec::new();
        for _ in 0..3 {
            ok.push(63);
            ok.extend_from_slice(&[b'a'; 63]);
        }
        ok.push(61);
        ok.extend_from_slice(&[b'a'; 61]);
        ok.push(0);
        assert_eq!(ok.len(), 255);
        assert!(name_of(&ok, 0).is_ok());
    }

    #[test]
    fn lower_dotted_folds_case_and_rejects_bytes_outside_host_names() {
        let buf = b"\x03FoO\x03Bar\x00\x03a.b\x00";
        let mut d = Decoder::new(buf);
        assert_eq!(
            d.read_name().unwrap().to_lower_dotted().as_deref(),
            Some("foo.bar")
        );
        assert_eq!(d.read_name().unwrap().to_lower_dotted(), None);
        assert_eq!(
            Decoder::new(b"\x00")
                .read_name()
                .unwrap()
                .to_lower_dotted()
                .as_deref(),
            Some("")
        );
    }

    #[test]
    fn dotted_names_encode_and_refuse_bad_labels() {
        let mut out = Vec::new();
        encode_dotted_name("a.bc.", &mut out).unwrap();
        assert_eq!(out, b"\x01a\x02bc\x00");
        assert_eq!(
            encode_dotted_name("a..b", &mut out),
            Err(WireError::EmptyLabel)
        );
        assert_eq!(
            encode_dotted_name(&"x".repeat(64), &mut out),
            Err(WireError::LabelTooLong)
        );
        assert_eq!(
            out, b"\x01a\x02bc\x00",
            "a refused name leaves the buffer as it was"
        );
    }
}
