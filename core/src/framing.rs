//! How DNS messages sit in the byte streams Envoy hands the filter.
//!
//! - UDP arrives through udp_proxy's `http_capsule` session filter: each datagram is an
//!   RFC 9297 DATAGRAM capsule (type 0, varint length, then context ID 0 and the payload).
//! - TCP arrives through a tcp_proxy tunnel unchanged: RFC 1035 §4.2.2 two-byte length prefix.
//!
//! A callback's chunk may end in the middle of a frame; [`Frames`] yields the complete ones and
//! reports how much it consumed, and the caller keeps the rest for the next chunk.

/// Largest capsule or TCP message accepted; anything longer means the stream is not DNS.
pub const MAX_FRAME: u64 = 65535 + 16;

const CAPSULE_DATAGRAM: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// RFC 9297 capsules carrying UDP datagrams.
    Capsule,
    /// RFC 1035 §4.2.2 length-prefixed messages.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("frame of {0} bytes is larger than any DNS message")]
    Oversized(u64),
}

/// Iterates the complete DNS messages in a buffer.
#[derive(Debug)]
pub struct Frames<'a> {
    framing: Framing,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Frames<'a> {
    pub fn new(framing: Framing, buf: &'a [u8]) -> Self {
        Frames {
            framing,
            buf,
            pos: 0,
        }
    }

    /// Bytes consumed by the frames yielded so far (the rest is an incomplete frame).
    pub fn consumed(&self) -> usize {
        self.pos
    }

    fn next_capsule(&mut self) -> Option<Result<Option<&'a [u8]>, FramingError>> {
        let rest = self.buf.get(self.pos..)?;
        let (ctype, n1) = read_varint(rest)?;
        let (len, n2) = read_varint(rest.get(n1..)?)?;
        if len > MAX_FRAME {
            return Some(Err(FramingError::Oversized(len)));
        }
        let start = n1 + n2;
        let value = rest.get(start..start + len as usize)?;
        self.pos += start + len as usize;
        if ctype != CAPSULE_DATAGRAM {
            // RFC 9297 §3.2: unknown capsule types are skipped.
            return Some(Ok(None));
        }
        match read_varint(value) {
            // Only context ID 0 carries UDP payloads (RFC 9298 §5).
            Some((0, n)) => Some(Ok(value.get(n..))),
            _ => Some(Ok(None)),
        }
    }

    fn next_tcp(&mut self) -> Option<Result<Option<&'a [u8]>, FramingError>> {
        let rest = self.buf.get(self.pos..)?;
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let msg = rest.get(2..2 + len)?;
        self.pos += 2 + len;
        Some(Ok(if len == 0 { None } else { Some(msg) }))
    }
}

impl<'a> Iterator for Frames<'a> {
    /// `Ok(Some(message))`, `Ok(None)` for a frame that carries no DNS message.
    type Item = Result<Option<&'a [u8]>, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.framing {
            Framing::Capsule => self.next_capsule(),
            Framing::Tcp => self.next_tcp(),
        }
    }
}

/// Appends `msg` framed for the stream. TCP messages over 65535 bytes cannot be framed and
/// are never built (answers are cut to 65535 first).
pub fn encode(framing: Framing, msg: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::Capsule => {
            write_varint(CAPSULE_DATAGRAM, out);
            write_varint(msg.len() as u64 + 1, out);
            out.push(0); // context ID 0
            out.extend_from_slice(msg);
        }
        Framing::Tcp => {
            let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(msg.get(..usize::from(len)).unwrap_or(msg));
        }
    }
}

/// QUIC variable-length integer (RFC 9000 §16): value and bytes used, `None` if incomplete.
fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3F);
    for b in bytes.iter().skip(1) {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

fn write_varint(v: u64, out: &mut Vec<u8>) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xC000_0000_0000_0000).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(framing: Framing, buf: &[u8]) -> (Vec<Option<Vec<u8>>>, usize) {
        let mut frames = Frames::new(framing, buf);
        let mut out = Vec::new();
        for f in frames.by_ref() {
            out.push(f.unwrap().map(<[u8]>::to_vec));
        }
        (out, frames.consumed())
    }

    #[test]
    fn rfc9000_16_varints_round_trip_at_every_width() {
        for v in [0u64, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30] {
            let mut out = Vec::new();
            write_varint(v, &mut out);
            assert_eq!(read_varint(&out), Some((v, out.len())), "{v}");
        }
        // RFC 9000 appendix A.1 sample: 0x7bbd = 15293
        assert_eq!(read_varint(&[0x7b, 0xbd]), Some((15293, 2)));
    }

    #[test]
    fn rfc9297_capsules_split_with_partial_tail_kept() {
        let mut buf = Vec::new();
        encode(Framing::Capsule, b"one", &mut buf);
        encode(Framing::Capsule, &[7u8; 100], &mut buf);
        let whole = buf.len();
        encode(Framing::Capsule, b"three", &mut buf);
        buf.truncate(buf.len() - 2);
        let (msgs, consumed) = collect(Framing::Capsule, &buf);
        assert_eq!(msgs, vec![Some(b"one".to_vec()), Some(vec![7u8; 100])]);
        assert_eq!(consumed, whole);
    }

    #[test]
    fn rfc9297_3_2_unknown_capsule_types_and_other_contexts_are_skipped() {
        let buf = [
            0x17, 2, 0xAA, 0xBB, 0x00, 3, 0x02, b'h', b'i', 0x00, 2, 0x00, b'x',
        ];
        let (msgs, consumed) = collect(Framing::Capsule, &buf);
        assert_eq!(msgs, vec![None, None, Some(b"x".to_vec())]);
        assert_eq!(consumed, buf.len());
    }

    #[test]
    fn oversized_capsule_is_an_error_not_a_wait() {
        let buf = [0x00, 0x80, 0x10, 0x00, 0x00];
        let mut frames = Frames::new(Framing::Capsule, &buf);
        assert_eq!(frames.next(), Some(Err(FramingError::Oversized(0x100000))));
    }

    #[test]
    fn rfc1035_4_2_2_tcp_length_prefix_splits_and_keeps_partial_message() {
        let buf = [0, 2, b'a', b'b', 0, 0, 0, 3, b'x'];
        let (msgs, consumed) = collect(Framing::Tcp, &buf);
        assert_eq!(msgs, vec![Some(b"ab".to_vec()), None]);
        assert_eq!(consumed, 6);
        let mut out = Vec::new();
        encode(Framing::Tcp, b"ab", &mut out);
        assert_eq!(out, [0, 2, b'a', b'b']);
    }
}
