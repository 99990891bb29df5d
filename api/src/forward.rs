//! The forwarding stream between the filter and the shim: one gRPC bidirectional stream per
//! Envoy worker, `/vmesh.dns.v1.Forwarder/Forward` on the shim's port, carrying the DNS
//! queries the filter does not answer and the shim's answers.
//!
//! ```text
//! filter (a worker's VM) ──ForwardRequest{queries: [Query{id, transport, budget_ms, message}]}──► shim
//!                        ◄──ForwardResponse{answers: [Answer{id, message}]}───────────────────────┘
//! ```
//!
//! Each message is a batch: the filter sends the queries one read of a connection produced
//! together, the shim the answers that are ready together, so a busy stream costs Envoy one
//! gRPC message for many DNS messages. `id` is the filter's: unique among the worker's
//! queries in flight, echoed on the answer, which is how an answer finds its connection and
//! slot. Answers come in the order they are ready, not the order asked.
//!
//! The schema, as protobuf (proto3) would declare it; both sides encode and decode it with
//! the hand-written codec below (the filter cannot afford a protobuf library):
//!
//! ```text
//! package vmesh.dns.v1;
//! service Forwarder { rpc Forward(stream ForwardRequest) returns (stream ForwardResponse); }
//! enum Transport { TRANSPORT_UNSPECIFIED = 0; UDP = 1; TCP = 2; HTTPS = 3; }
//! message Query   { uint32 id = 1; Transport transport = 2; uint32 budget_ms = 3; bytes message = 4; }
//! message Answer  { uint32 id = 1; bytes message = 2; }
//! message ForwardRequest  { repeated Query queries = 1; }
//! message ForwardResponse { repeated Answer answers = 1; }
//! ```
//!
//! - `transport` is how the client asked the filter, which decides how the shim asks upstream
//!   (a UDP client gets the UDP answer, TC included; TCP and DoH clients get whole answers).
//! - `budget_ms` is how long the shim may take: what is left of the filter's deadline, less
//!   a margin, so the shim's answer (SERVFAIL when every upstream failed) wins the race.
//! - The shim's first message on every stream is an empty `ForwardResponse`: Envoy reports
//!   response headers even for a stream that never reached the shim (its own local reply), so
//!   this greeting is how the filter knows the shim is there.
//! - An answer with an empty `message` says the shim will not relay the query (not a standard
//!   DNS query); the filter answers SERVFAIL.
//!
//! Decoding follows protobuf's rules: fields in any order, unknown fields skipped, the last
//! value of a scalar wins. Bytes are borrowed from the input, and every length is checked.
//! On the shim's side the messages travel in gRPC's length-prefixed framing
//! ([`GrpcFrames`], [`frame`]); inside Envoy, Envoy frames and unframes them.

/// gRPC service and method, and the HTTP/2 path they make.
pub const SERVICE: &str = "vmesh.dns.v1.Forwarder";
pub const METHOD: &str = "Forward";
pub const PATH: &str = "/vmesh.dns.v1.Forwarder/Forward";
pub const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// Largest gRPC message either side accepts: a batch of DNS messages. The filter keeps its
/// batches under [`BATCH_BYTES`], the shim its own.
pub const MAX_MESSAGE: usize = 1 << 20;
/// What a sender puts in one message before starting the next.
pub const BATCH_BYTES: usize = 32 << 10;
/// Largest DNS message inside a query or answer.
pub const MAX_DNS: usize = 65535;

/// How the client asked the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    /// DNS over HTTPS (RFC 8484).
    Https,
}

impl Transport {
    fn code(self) -> u64 {
        match self {
            Transport::Udp => 1,
            Transport::Tcp => 2,
            Transport::Https => 3,
        }
    }

    fn from_code(v: u64) -> Option<Self> {
        match v {
            1 => Some(Transport::Udp),
            2 => Some(Transport::Tcp),
            3 => Some(Transport::Https),
            _ => None,
        }
    }
}

/// One forwarded DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u32,
    pub transport: Transport,
    pub budget_ms: u32,
    pub message: &'a [u8],
}

/// The shim's answer to the query with the same `id`; empty `message`: no answer (SERVFAIL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<'a> {
    pub id: u32,
    pub message: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated field")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    Varint,
    #[error("wire type {0} is not allowed")]
    WireType(u8),
    #[error("field number 0")]
    FieldZero,
    #[error("field {0} has the wrong wire type")]
    FieldType(u32),
    #[error("transport {0} is not UDP, TCP or HTTPS")]
    Transport(u64),
    #[error("{0} does not fit the field")]
    Range(u64),
    #[error("DNS message of {0} bytes")]
    TooLong(usize),
    #[error("gRPC message compressed (flag {0}); compression was not negotiated")]
    Compressed(u8),
    #[error("gRPC message of {0} bytes is over the limit")]
    Oversized(u64),
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(field: u32, wire: u8, out: &mut Vec<u8>) {
    put_varint((u64::from(field) << 3) | u64::from(wire), out);
}

fn put_uint(field: u32, v: u64, out: &mut Vec<u8>) {
    // proto3: a zero scalar is not written.
    if v != 0 {
        put_tag(field, VARINT, out);
        put_varint(v, out);
    }
}

fn put_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    put_tag(field, LEN, out);
    put_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// A field as read: its number and value.
enum Value<'a> {
    Uint(u64),
    Bytes(&'a [u8]),
    Other,
}

struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated)?;
            self.buf = rest;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Varint)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn next(&mut self) -> Option<Result<(u32, Value<'a>), DecodeError>> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.field())
    }

    fn field(&mut self) -> Result<(u32, Value<'a>), DecodeError> {
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| DecodeError::Range(tag))?;
        if number == 0 {
            return Err(DecodeError::FieldZero);
        }
        let value = match (tag & 7) as u8 {
            VARINT => Value::Uint(self.varint()?),
            LEN => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            I64 => {
                self.take(8)?;
                Value::Other
            }
            I32 => {
                self.take(4)?;
                Value::Other
            }
            other => return Err(DecodeError::WireType(other)),
        };
        Ok((number, value))
    }
}

fn uint32(number: u32, v: Value<'_>) -> Result<u32, DecodeError> {
    match v {
        Value::Uint(n) => u32::try_from(n).map_err(|_| DecodeError::Range(n)),
        _ => Err(DecodeError::FieldType(number)),
    }
}

fn bytes(number: u32, v: Value<'_>) -> Result<&[u8], DecodeError> {
    match v {
        Value::Bytes(b) if b.len() <= MAX_DNS => Ok(b),
        Value::Bytes(b) => Err(DecodeError::TooLong(b.len())),
        _ => Err(DecodeError::FieldType(number)),
    }
}

impl<'a> Query<'a> {
    /// Bytes [`Query::encode`] appends.
    fn encoded_len(&self) -> usize {
        let uint = |v: u64| if v == 0 { 0 } else { 1 + varint_len(v) };
        uint(u64::from(self.id))
            + uint(self.transport.code())
            + uint(u64::from(self.budget_ms))
            + 1
            + varint_len(self.message.len() as u64)
            + self.message.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_uint(1, u64::from(self.id), out);
        put_uint(2, self.transport.code(), out);
        put_uint(3, u64::from(self.budget_ms), out);
        put_bytes(4, self.message, out);
    }

    fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut q = Query {
            id: 0,
            transport: Transport::Udp,
            budget_ms: 0,
            message: &[],
        };
        let mut transport = 0;
        let mut fields = Fields { buf };
        while let Some(field) = fields.next() {
            match field? {
                (1, v) => q.id = uint32(1, v)?,
                (2, Value::Uint(v)) => transport = v,
                (2, _) => return Err(DecodeError::FieldType(2)),
                (3, v) => q.budget_ms = uint32(3, v)?,
                (4, v) => q.message = bytes(4, v)?,
                _ => {}
            }
        }
        q.transport = Transport::from_code(transport).ok_or(DecodeError::Transport(transport))?;
        Ok(q)
    }
}

impl<'a> Answer<'a> {
    fn encoded_len(&self) -> usize {
        let id = if self.id == 0 {
            0
        } else {
            1 + varint_len(u64::from(self.id))
        };
        id + 1 + varint_len(self.message.len() as u64) + self.message.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_uint(1, u64::from(self.id), out);
        put_bytes(2, self.message, out);
    }

    fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut a = Answer {
            id: 0,
            message: &[],
        };
        let mut fields = Fields { buf };
        while let Some(field) = fields.next() {
            match field? {
                (1, v) => a.id = uint32(1, v)?,
                (2, v) => a.message = bytes(2, v)?,
                _ => {}
            }
        }
        Ok(a)
    }
}

/// Appends one query to a `ForwardRequest` being built in `out`.
pub fn push_query(q: &Query<'_>, out: &mut Vec<u8>) {
    put_tag(1, LEN, out);
    put_varint(q.encoded_len() as u64, out);
    q.encode(out);
}

/// Appends one answer to a `ForwardResponse` being built in `out`.
pub fn push_answer(a: &Answer<'_>, out: &mut Vec<u8>) {
    put_tag(1, LEN, out);
    put_varint(a.encoded_len() as u64, out);
    a.encode(out);
}

/// The queries of a `ForwardRequest`, in order. An error ends the iteration: the rest of a
/// message that breaks the encoding cannot be trusted.
pub fn queries(msg: &[u8]) -> Repeated<'_, Query<'_>> {
    Repeated {
        fields: Fields { buf: msg },
        done: false,
        decode: Query::decode,
    }
}

/// The answers of a `ForwardResponse`, in order (see [`queries`]).
pub fn answers(msg: &[u8]) -> Repeated<'_, Answer<'_>> {
    Repeated {
        fields: Fields { buf: msg },
        done: false,
        decode: Answer::decode,
    }
}

/// The elements of field 1 of a batch message.
pub struct Repeated<'a, T> {
    fields: Fields<'a>,
    done: bool,
    decode: fn(&'a [u8]) -> Result<T, DecodeError>,
}

impl<T> std::fmt::Debug for Repeated<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repeated")
            .field("left", &self.fields.buf.len())
            .finish()
    }
}

impl<'a, T> Iterator for Repeated<'a, T> {
    type Item = Result<T, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let item = match self.fields.next()? {
                Ok((1, Value::Bytes(b))) => (self.decode)(b),
                Ok((1, _)) => Err(DecodeError::FieldType(1)),
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            self.done = item.is_err();
            return Some(item);
        }
        None
    }
}

/// gRPC's length-prefixed message: a compressed flag (0), a 4-byte big-endian length, the
/// message. Appends it to `out`.
pub fn frame(message: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
}

/// Splits a gRPC byte stream into messages. Feed bytes as they arrive with [`GrpcFrames::push`]
/// and take complete messages with [`GrpcFrames::next_message`]; a partial message waits for
/// the rest.
#[derive(Debug, Default)]
pub struct GrpcFrames {
    buf: Vec<u8>,
    start: usize,
}

impl GrpcFrames {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message; `Ok(None)` until one is. After an error the stream is
    /// broken for good (the same error again).
    pub fn next_message(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        let rest = self.buf.get(self.start..).unwrap_or_default();
        let Some(head) = rest.get(..5) else {
            self.compact();
            return Ok(None);
        };
        let flag = head.first().copied().unwrap_or(0);
        if flag != 0 {
            return Err(DecodeError::Compressed(flag));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(head.get(1..5).unwrap_or(&[0; 4]));
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(DecodeError::Oversized(len as u64));
        }
        if rest.len() < 5 + len {
            self.compact();
            return Ok(None);
        }
        let at = self.start + 5;
        self.start = at + len;
        Ok(self.buf.get(at..at + len))
    }

    /// Drops consumed bytes before waiting for more, so a long stream does not keep them.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Bytes of an incomplete message held back.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u32, message: &[u8]) -> Query<'_> {
        Query {
            id,
            transport: Transport::Tcp,
            budget_ms: 5000,
            message,
        }
    }

    #[test]
    fn batches_round_trip_with_every_field() {
        let big = vec![7u8; 300];
        let qs = [query(1, b"abc"), query(u32::MAX, &big), query(0, b"")];
        let mut msg = Vec::new();
        for q in &qs {
            push_query(q, &mut msg);
        }
        let back: Vec<Query<'_>> = queries(&msg).map(Result::unwrap).collect();
        assert_eq!(back, qs);

        let answers_in = [
            Answer {
                id: 9,
                message: b"xyz",
            },
            Answer {
                id: 0,
                message: b"",
            },
        ];
        let mut msg = Vec::new();
        for a in &answers_in {
            push_answer(a, &mut msg);
        }
        let back: Vec<Answer<'_>> = answers(&msg).map(Result::unwrap).collect();
        assert_eq!(back, answers_in);
    }

    #[test]
    fn proto3_wire_bytes_as_protoc_would_write_them() {
        // Query{id: 300, transport: UDP, budget_ms: 0, message: "hi"} inside field 1.
        let mut msg = Vec::new();
        push_query(
            &Query {
                id: 300,
                transport: Transport::Udp,
                budget_ms: 0,
                message: b"hi",
            },
            &mut msg,
        );
        assert_eq!(
            msg,
            [0x0a, 9, 0x08, 0xac, 0x02, 0x10, 0x01, 0x22, 0x02, b'h', b'i']
        );
        let mut msg = Vec::new();
        push_answer(
            &Answer {
                id: 1,
                message: b"",
            },
            &mut msg,
        );
        assert_eq!(msg, [0x0a, 4, 0x08, 0x01, 0x12, 0x00]);
    }

    #[test]
    fn unknown_fields_are_skipped_and_the_last_scalar_wins() {
        // Query with id twice, an unknown varint, fixed64, fixed32 and bytes fields.
        let inner = [
            0x08, 0x05, 0x08, 0x06, 0x28, 0x01, 0x31, 0, 0, 0, 0, 0, 0, 0, 0, 0x3d, 0, 0, 0, 0,
            0x42, 0x01, 0xff, 0x10, 0x02, 0x22, 0x01, b'q',
        ];
        let mut msg = vec![0x10, 0x01, 0x0a, inner.len() as u8];
        msg.extend_from_slice(&inner);
        let back: Vec<_> = queries(&msg).collect();
        assert_eq!(
            back,
            [Ok(Query {
                id: 6,
                transport: Transport::Tcp,
                budget_ms: 0,
                message: b"q"
            })]
        );
    }

    #[test]
    fn broken_messages_are_errors_not_panics() {
        let cases: &[(&[u8], DecodeError)] = &[
            (&[0x0a, 5, 0x08], DecodeError::Truncated),
            (&[0x0a], DecodeError::Truncated),
            (&[0x0b], DecodeError::WireType(3)),
            (&[0x00], DecodeError::FieldZero),
            (&[0x08, 0x80], DecodeError::Truncated),
            (
                &[
                    0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
                ],
                DecodeError::Varint,
            ),
            (&[0x08, 1], DecodeError::FieldType(1)),
            (&[0x0a, 2, 0x10, 0x07], DecodeError::Transport(7)),
            (&[0x0a, 0], DecodeError::Transport(0)),
            (
                &[0x0a, 6, 0x08, 0x80, 0x80, 0x80, 0x80, 0x10],
                DecodeError::Range(1 << 32),
            ),
            (&[0x0a, 2, 0x20, 0x01], DecodeError::FieldType(4)),
            (&[0x0a, 2, 0x22, 0x01], DecodeError::Truncated),
        ];
        for (bytes, want) in cases {
            let got: Vec<_> = queries(bytes).collect();
            assert_eq!(got, [Err(*want)], "{bytes:?}");
        }
        // An error ends the batch; what came before stands.
        let mut msg = Vec::new();
        push_query(&query(1, b"a"), &mut msg);
        msg.extend_from_slice(&[0x0a, 9, 0x08]);
        push_query(&query(2, b"b"), &mut msg);
        let got: Vec<_> = queries(&msg).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok() && got[1].is_err());
    }

    #[test]
    fn grpc_frames_split_at_any_point() {
        let mut stream = Vec::new();
        for m in [&b"one"[..], b"", &[9u8; 1000]] {
            frame(m, &mut stream);
        }
        for cut in 0..stream.len() {
            let mut f = GrpcFrames::default();
            let mut got: Vec<Vec<u8>> = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                f.push(part);
                while let Some(m) = f.next_message().unwrap() {
                    got.push(m.to_vec());
                }
            }
            assert_eq!(got, [b"one".to_vec(), vec![], vec![9u8; 1000]], "cut {cut}");
            assert_eq!(f.pending(), 0);
        }
    }

    #[test]
    fn grpc_compressed_or_oversized_messages_are_refused() {
        let mut f = GrpcFrames::default();
        f.push(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(f.next_message(), Err(DecodeError::Compressed(1)));
        let mut f = GrpcFrames::default();
        f.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            f.next_message(),
            Err(DecodeError::Oversized(u32::MAX as u64))
        );
    }
}
