//! The server end of udp_proxy's HTTP/1.1 POST tunnel, spoken by the filter itself.
//!
//! udp_proxy (with the `http_capsule` session filter) opens one request per client address:
//! `POST <path> HTTP/1.1` with a chunked body, and sends its datagrams as RFC 9297 capsules in
//! that body only after a 2xx response head. The filter sits in front of Envoy's echo filter on
//! an internal listener, so whatever it leaves in the read buffer goes back to udp_proxy as the
//! response: the `200` head, then chunks of answer capsules as they become ready, then the
//! last chunk once the request has ended and every forward has come back. No HTTP connection manager, router or second listener sits in between, which
//! is where most of a datagram's cost inside Envoy went (docs/benchmarks.md).
//!
//! Only what udp_proxy sends is accepted: a POST with `transfer-encoding: chunked`. Anything
//! else is an error the filter answers with [`REJECTION`] and a closed connection. After a
//! request ends the connection may carry the next one (Envoy's HTTP/1.1 pool reuses it).
//!
//! udp_proxy ends a session (and this connection) once it has been idle for its
//! `idle_timeout`, counting bytes both ways. That timeout is kept short so that a client asking
//! from a fresh port per lookup does not leave a session behind for long; a forward slower than
//! the timeout is kept alive with [`KEEPALIVE`] chunks instead (see [`UdpTunnel::keepalive`]).

use crate::framing::{Framing, FramingError};
use crate::names::NameIndex;
use crate::tunnel::{Counts, ForwardJob, Tunnel};

/// Longest request head accepted. udp_proxy's is about 100 bytes.
pub const MAX_HEAD: usize = 8192;
/// Longest chunk-size or trailer line accepted (RFC 9112 §7.1 extensions included).
const MAX_LINE: usize = 1024;

const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// One chunk holding an empty capsule of type 0x17, a type RFC 9297 §5.4 reserves
/// (0x29 * N + 0x17, N = 0) to exercise the rule that receivers ignore capsule types they do
/// not know. udp_proxy restarts a session's idle timer on every response byte, and its
/// `http_capsule` filter drops capsules that are not DATAGRAM, so the client never sees it.
pub const KEEPALIVE: &[u8] = b"2\r\n\x17\x00\r\n";

/// The answer to a request that is not a udp_proxy tunnel (see [`UdpTunnel::rejection`]).
pub const REJECTION: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("malformed request line")]
    BadRequestLine,
    #[error("method {0:?} is not POST")]
    NotPost(String),
    #[error("request body is not chunked")]
    NotChunked,
    #[error("malformed chunk framing")]
    BadChunk,
    #[error("a request arrived before the previous response ended")]
    Pipelined,
    #[error(transparent)]
    Framing(#[from] FramingError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    RequestLine,
    Header {
        chunked: bool,
    },
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    /// The request ended; its last answers (or forwards) are still owed.
    Ended,
}

/// One tunnel connection: HTTP/1.1 framing around a capsule [`Tunnel`].
#[derive(Debug)]
pub struct UdpTunnel {
    state: State,
    /// A line (head, chunk size, trailer) whose end has not arrived yet.
    line: Vec<u8>,
    head_len: usize,
    tunnel: Tunnel,
    /// Response bytes not yet handed out (the head, before any answer exists).
    out: Vec<u8>,
}

impl Default for UdpTunnel {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpTunnel {
    pub fn new() -> Self {
        UdpTunnel {
            state: State::RequestLine,
            line: Vec::new(),
            head_len: 0,
            tunnel: Tunnel::new(Framing::Capsule),
            out: Vec::new(),
        }
    }

    /// Takes newly arrived connection bytes. Returns the queries to forward now. After an
    /// error the tunnel is done: the caller refuses the connection (see [`Self::rejection`])
    /// and forwards nothing from the failed read.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        table: Option<&NameIndex>,
        cluster_domain: &str,
        rotation: &mut u32,
    ) -> Result<Vec<ForwardJob>, TunnelError> {
        let mut jobs = Vec::new();
        while !bytes.is_empty() {
            if let State::ChunkData(remaining) = self.state {
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let (data, rest) = bytes.split_at(take);
                jobs.extend(self.tunnel.feed(data, table, cluster_domain, rotation)?);
                let left = remaining - take as u64;
                self.state = if left == 0 {
                    State::ChunkEnd
                } else {
                    State::ChunkData(left)
                };
                bytes = rest;
                continue;
            }
            if self.state == State::Ended {
                if self.tunnel.is_waiting() {
                    return Err(TunnelError::Pipelined);
                }
                self.flush_answers();
            }
            let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
                self.take_partial_line(bytes)?;
                break;
            };
            let (part, rest) = bytes.split_at(end + 1);
            self.take_partial_line(part)?;
            let mut line = std::mem::take(&mut self.line);
            line.pop(); // the '\n'
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.on_line(&line)?;
            self.line = line;
            self.line.clear();
            bytes = rest;
        }
        Ok(jobs)
    }

    fn take_partial_line(&mut self, part: &[u8]) -> Result<(), TunnelError> {
        let in_head = matches!(self.state, State::RequestLine | State::Header { .. });
        if in_head {
            self.head_len += part.len();
            if self.head_len > MAX_HEAD {
                return Err(TunnelError::HeadTooLong);
            }
        } else if self.line.len() + part.len() > MAX_LINE {
            return Err(TunnelError::BadChunk);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn on_line(&mut self, line: &[u8]) -> Result<(), TunnelError> {
        match self.state {
            // RFC 9112 §2.2: empty lines before a request line are ignored.
            State::RequestLine if line.is_empty() => {}
            State::RequestLine => {
                let text = std::str::from_utf8(line).map_err(|_| TunnelError::BadRequestLine)?;
                let mut parts = text.split(' ');
                let (Some(method), Some(_target), Some(version), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(TunnelError::BadRequestLine);
                };
                if !version.starts_with("HTTP/1.") {
                    return Err(TunnelError::BadRequestLine);
                }
                if method != "POST" {
                    return Err(TunnelError::NotPost(method.chars().take(16).collect()));
                }
                self.state = State::Header { chunked: false };
            }
            State::Header { chunked } if line.is_empty() => {
                if !chunked {
                    return Err(TunnelError::NotChunked);
                }
                self.head_len = 0;
                self.out.extend_from_slice(RESPONSE_HEAD);
                self.state = State::ChunkSize;
            }
            State::Header { chunked } => {
                self.state = State::Header {
                    chunked: chunked || is_chunked_header(line),
                };
            }
            State::ChunkSize => {
                let size = parse_chunk_size(line).ok_or(TunnelError::BadChunk)?;
                self.state = if size == 0 {
                    State::Trailer
                } else {
                    State::ChunkData(size)
                };
            }
            State::ChunkEnd if line.is_empty() => self.state = State::ChunkSize,
            State::ChunkEnd => return Err(TunnelError::BadChunk),
            State::Trailer if line.is_empty() => {
                // A capsule cut short by the end of the request can never complete.
                self.tunnel.end_of_stream();
                self.state = State::Ended;
            }
            State::Trailer => {}
            State::ChunkData(_) | State::Ended => {}
        }
        Ok(())
    }

    /// What to send when [`UdpTunnel::feed`] failed: [`REJECTION`] while no response has
    /// begun (its `connection: close` makes the client's codec close); `None` once a `200`
    /// head went out, when only closing the connection is left.
    pub fn rejection(&self) -> Option<&'static [u8]> {
        matches!(self.state, State::RequestLine | State::Header { .. }).then_some(REJECTION)
    }

    /// Completes a forwarded query; see [`Tunnel::complete`].
    pub fn complete(&mut self, slot: usize, answer: Option<&[u8]>) {
        self.tunnel.complete(slot, answer);
    }

    /// Whether forwarded queries are still in flight.
    pub fn is_waiting(&self) -> bool {
        self.tunnel.is_waiting()
    }

    /// What to send, from time to time, so that udp_proxy does not end the session under a
    /// client that is still owed an answer: [`KEEPALIVE`] while a forward is in flight, `None`
    /// otherwise (a session with nothing owed may expire: that is the point of a short idle
    /// timeout). It may be sent between any two outputs: a forward only starts from a capsule
    /// in the request body, so the `200` head has gone out, and the last chunk waits for it.
    pub fn keepalive(&self) -> Option<&'static [u8]> {
        self.tunnel.is_waiting().then_some(KEEPALIVE)
    }

    /// The response bytes to send now: the head, ready answers as one chunk, and the last
    /// chunk once the request has ended and no forward is in flight.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.flush_answers();
        std::mem::take(&mut self.out)
    }

    fn flush_answers(&mut self) {
        let answers = self.tunnel.take_output();
        if !answers.is_empty() {
            self.out
                .extend_from_slice(format!("{:x}\r\n", answers.len()).as_bytes());
            self.out.extend_from_slice(&answers);
            self.out.extend_from_slice(b"\r\n");
        }
        if self.state == State::Ended && !self.tunnel.is_waiting() {
            self.out.extend_from_slice(LAST_CHUNK);
            self.state = State::RequestLine;
        }
    }

    pub fn take_counts(&mut self) -> Counts {
        self.tunnel.take_counts()
    }
}

/// `transfer-encoding` whose final coding is `chunked` (RFC 9112 §6.1).
fn is_chunked_header(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    if !name.eq_ignore_ascii_case(b"transfer-encoding") {
        return false;
    }
    let value = value.get(1..).unwrap_or_default();
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Hex chunk size, extensions after `;` ignored (RFC 9112 §7.1). At most 8 hex digits: a
/// tunnel chunk carries one datagram, so anything larger is not udp_proxy.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::inspect::Response;
    use crate::dns::message::tests::query_bytes;
    use crate::dns::rtype;
    use crate::framing::{encode, Frames};

    const HEAD: &[u8] =
        b"POST /udp-tunnel HTTP/1.1\r\nhost: dns.vmesh.internal\r\ntransfer-encoding: chunked\r\n\r\n";

    fn index() -> NameIndex {
        let json = br#"{"version":"1","namespace":"ns","names":{"mesh.example.com":{"ips":["240.240.0.9"],"registry":"External"}}}"#;
        NameIndex::from_json(json).unwrap()
    }

    fn chunk(name: &str, id: u16) -> Vec<u8> {
        let mut capsule = Vec::new();
        encode(
            Framing::Capsule,
            &query_bytes(id, name, rtype::A, None),
            &mut capsule,
        );
        let mut out = format!("{:x}\r\n", capsule.len()).into_bytes();
        out.extend_from_slice(&capsule);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Splits a chunked response body (after the head) into (id, rcode) of its answers and
    /// whether the last chunk was seen.
    fn answers(mut body: &[u8]) -> (Vec<(u16, u16)>, bool) {
        let mut capsules = Vec::new();
        loop {
            let end = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap(), 16).unwrap();
            if size == 0 {
                assert_eq!(&body[end..], b"\r\n\r\n");
                break;
            }
            capsules.extend_from_slice(&body[end + 2..end + 2 + size]);
            assert_eq!(&body[end + 2 + size..end + 4 + size], b"\r\n");
            body = &body[end + 4 + size..];
            if body.is_empty() {
                break;
            }
        }
        let ended = body.starts_with(b"0\r\n");
        // Capsules that carry no datagram (keepalives) are skipped, as udp_proxy does.
        let ids = Frames::new(Framing::Capsule, &capsules)
            .filter_map(|f| f.unwrap())
            .map(|m| {
                let r = Response::parse(m).unwrap();
                (r.header.id, r.rcode())
            })
            .collect();
        (ids, ended)
    }

    #[test]
    fn rfc9112_post_head_is_answered_with_a_chunked_200_before_any_datagram() {
        let mut t = UdpTunnel::new();
        let jobs = t.feed(HEAD, None, "cluster.local", &mut 0).unwrap();
        assert!(jobs.is_empty());
        assert_eq!(t.take_output(), RESPONSE_HEAD);
        assert!(t.take_output().is_empty());
    }

    #[test]
    fn each_feed_answers_its_datagrams_in_one_chunk_even_when_split_anywhere() {
        let table = index();
        let mut input = HEAD.to_vec();
        input.extend(chunk("mesh.example.com", 1));
        input.extend(chunk("mesh.example.com", 2));
        input.extend(b"0\r\n\r\n");
        for split in 1..input.len() {
            let mut t = UdpTunnel::new();
            let mut out = Vec::new();
            for part in [&input[..split], &input[split..]] {
                t.feed(part, Some(&table), "cluster.local", &mut 0).unwrap();
                out.extend(t.take_output());
            }
            let body = out.strip_prefix(RESPONSE_HEAD).unwrap();
            let (ids, ended) = answers(body);
            assert_eq!(ids, vec![(1, 0), (2, 0)], "split at {split}");
            assert!(ended, "split at {split}");
        }
    }

    #[test]
    fn a_forward_in_flight_holds_only_its_own_answer_and_the_last_chunk() {
        let table = index();
        let mut t = UdpTunnel::new();
        let mut input = HEAD.to_vec();
        input.extend(chunk("example.org", 7));
        input.extend(chunk("mesh.example.com", 8));
        input.extend(b"0\r\n\r\n");
        let jobs = t
            .feed(&input, Some(&table), "cluster.local", &mut 0)
            .unwrap();
        assert_eq!(jobs.len(), 1);
        let out = t.take_output();
        let body = out.strip_prefix(RESPONSE_HEAD).unwrap();
        assert_eq!(answers(body), (vec![(8, 0)], false));
        assert!(t.is_waiting());
        t.complete(jobs[0].slot, None);
        assert_eq!(answers(&t.take_output()), (vec![(7, 2)], true));
    }

    #[test]
    fn rfc9297_5_4_keepalive_is_one_chunk_with_a_reserved_capsule_type_receivers_skip() {
        let size_line = KEEPALIVE.iter().position(|&b| b == b'\n').unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&KEEPALIVE[..size_line - 1]).unwrap(),
            16,
        )
        .unwrap();
        let capsule = &KEEPALIVE[size_line + 1..];
        assert_eq!(capsule.len(), size + 2, "the chunk's data, then CRLF");
        assert!(capsule.ends_with(b"\r\n"));
        let capsule = &capsule[..size];
        // Capsule type 0x29 * N + 0x17 (a one-byte varint here), no value.
        assert_eq!((capsule[0] - 0x17) % 0x29, 0);
        assert_eq!(capsule[1], 0);
        let frames: Vec<_> = Frames::new(Framing::Capsule, capsule).collect();
        assert_eq!(frames, vec![Ok(None)], "skipped, not a datagram");
    }

    #[test]
    fn keepalives_are_owed_only_while_a_forward_is_in_flight_and_keep_the_body_parseable() {
        let table = index();
        let mut t = UdpTunnel::new();
        t.feed(HEAD, Some(&table), "cluster.local", &mut 0).unwrap();
        assert_eq!(t.keepalive(), None, "nothing owed: the session may expire");
        let mut out = t.take_output();
        let jobs = t
            .feed(
                &chunk("example.org", 5),
                Some(&table),
                "cluster.local",
                &mut 0,
            )
            .unwrap();
        out.extend(t.take_output());
        assert_eq!(t.keepalive(), Some(KEEPALIVE));
        out.extend(KEEPALIVE);
        t.feed(
            &chunk("mesh.example.com", 6),
            Some(&table),
            "cluster.local",
            &mut 0,
        )
        .unwrap();
        out.extend(t.take_output());
        out.extend(KEEPALIVE);
        t.feed(b"0\r\n\r\n", Some(&table), "cluster.local", &mut 0)
            .unwrap();
        assert_eq!(
            t.keepalive(),
            Some(KEEPALIVE),
            "the request ended, the answer is owed"
        );
        out.extend(t.take_output());
        out.extend(KEEPALIVE);
        t.complete(jobs[0].slot, None);
        assert_eq!(t.keepalive(), None);
        out.extend(t.take_output());
        let body = out.strip_prefix(RESPONSE_HEAD).unwrap();
        assert_eq!(answers(body), (vec![(6, 0), (5, 2)], true));
    }

    #[test]
    fn the_connection_carries_a_second_request_after_the_first_ends() {
        let table = index();
        let mut t = UdpTunnel::new();
        for id in [1, 2] {
            let mut input = HEAD.to_vec();
            input.extend(chunk("mesh.example.com", id));
            input.extend(b"0\r\n\r\n");
            t.feed(&input, Some(&table), "cluster.local", &mut 0)
                .unwrap();
            let out = t.take_output();
            let (ids, ended) = answers(out.strip_prefix(RESPONSE_HEAD).unwrap());
            assert_eq!((ids, ended), (vec![(id, 0)], true));
        }
    }

    #[test]
    fn chunk_extensions_trailers_and_bare_lf_are_accepted() {
        let table = index();
        let mut t = UdpTunnel::new();
        let mut capsule = Vec::new();
        encode(
            Framing::Capsule,
            &query_bytes(3, "mesh.example.com", rtype::A, None),
            &mut capsule,
        );
        let mut input = b"\r\nPOST /x HTTP/1.1\nTransfer-Encoding: gzip, Chunked\n\n".to_vec();
        input.extend(format!("{:X};ext=1\r\n", capsule.len()).as_bytes());
        input.extend(&capsule);
        input.extend(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
        t.feed(&input, Some(&table), "cluster.local", &mut 0)
            .unwrap();
        let out = t.take_output();
        let (ids, ended) = answers(out.strip_prefix(RESPONSE_HEAD).unwrap());
        assert_eq!((ids, ended), (vec![(3, 0)], true));
    }

    #[test]
    fn what_udp_proxy_never_sends_is_refused() {
        let cases: [(&[u8], TunnelError); 6] = [
            (
                b"GET / HTTP/1.1\r\n\r\n",
                TunnelError::NotPost("GET".into()),
            ),
            (b"POST /\r\n", TunnelError::BadRequestLine),
            (b"POST / SPDY/3\r\n", TunnelError::BadRequestLine),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\n",
                TunnelError::NotChunked,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                TunnelError::BadChunk,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
                TunnelError::BadChunk,
            ),
        ];
        for (i, (input, want)) in cases.into_iter().enumerate() {
            let mut t = UdpTunnel::new();
            assert_eq!(
                t.feed(input, None, "cluster.local", &mut 0),
                Err(want),
                "{}",
                String::from_utf8_lossy(input)
            );
            // A broken head gets the 400; a broken body follows a 200 and can only be closed.
            assert_eq!(t.rejection().is_some(), i < 4, "case {i}");
        }
    }

    #[test]
    fn endless_head_or_chunk_line_is_refused_at_its_limit() {
        let mut t = UdpTunnel::new();
        let mut input = b"POST / HTTP/1.1\r\nx: ".to_vec();
        input.resize(MAX_HEAD + 1, b'a');
        assert_eq!(
            t.feed(&input, None, "cluster.local", &mut 0),
            Err(TunnelError::HeadTooLong)
        );
        let mut t = UdpTunnel::new();
        t.feed(HEAD, None, "cluster.local", &mut 0).unwrap();
        let long = vec![b'0'; MAX_LINE + 1];
        assert_eq!(
            t.feed(&long, None, "cluster.local", &mut 0),
            Err(TunnelError::BadChunk)
        );
        let mut t = UdpTunnel::new();
        t.feed(HEAD, None, "cluster.local", &mut 0).unwrap();
        assert_eq!(
            t.feed(b"100000000\r\n", None, "cluster.local", &mut 0),
            Err(TunnelError::BadChunk)
        );
    }

    #[test]
    fn a_second_request_in_the_same_bytes_follows_the_finished_first_response() {
        let table = index();
        let mut t = UdpTunnel::new();
        let mut input = Vec::new();
        for id in [1, 2] {
            input.extend(HEAD);
            input.extend(chunk("mesh.example.com", id));
            input.extend(b"0\r\n\r\n");
        }
        t.feed(&input, Some(&table), "cluster.local", &mut 0)
            .unwrap();
        let out = t.take_output();
        let first = out.strip_prefix(RESPONSE_HEAD).unwrap();
        let split = first
            .windows(RESPONSE_HEAD.len())
            .position(|w| w == RESPONSE_HEAD)
            .unwrap();
        assert_eq!(answers(&first[..split]), (vec![(1, 0)], true));
        assert_eq!(
            answers(&first[split + RESPONSE_HEAD.len()..]),
            (vec![(2, 0)], true)
        );
    }

    #[test]
    fn a_request_pipelined_behind_an_unfinished_response_is_refused() {
        let mut t = UdpTunnel::new();
        let mut input = HEAD.to_vec();
        input.extend(chunk("example.org", 1));
        input.extend(b"0\r\n\r\n");
        input.extend(HEAD);
        assert_eq!(
            t.feed(&input, None, "cluster.local", &mut 0),
            Err(TunnelError::Pipelined)
        );
    }
}
