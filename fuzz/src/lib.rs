//! Invariants the fuzz targets check. Each function takes arbitrary bytes and panics (the
//! fuzzer's signal) only when vmesh-core breaks a promise:
//! - [`respond`]: the decoder never panics; every reply is a well-formed response to the query
//!   (same ID, question echoed, within the transport's size limit); forwarded messages are
//!   queries the forwarder can parse again.
//! - [`name_table`]: any JSON either compiles into a table or is refused; a compiled table
//!   survives publication (image round trip) and answers lookups.
//! - [`tunnel`]: any capsule or TCP byte stream, or any bytes on udp_proxy's HTTP/1.1 tunnel,
//!   in any chunking, yields answers in frames (on the tunnel: a 200 head, then chunks), or
//!   a refusal; never a panic.
//! - [`forward`]: the forwarding stream. Bytes as the shim reads them (gRPC framing, in any
//!   chunking, then `ForwardRequest`/`ForwardResponse` decoding) never panic, and whatever
//!   decodes encodes back to the same values; and any sequence of link operations (submit,
//!   flush, answer, close, reopen, expire) hands every query back exactly once.

use std::sync::OnceLock;

use vmesh_core::dns::inspect::Response;
use vmesh_core::dns::Query;
use vmesh_core::framing::{Frames, Framing};
use vmesh_core::names::NameIndex;
use vmesh_core::responder::{forwarded_answer, respond as decide, Outcome, Transport};
use vmesh_core::tunnel::Tunnel;
use vmesh_core::udp_tunnel::UdpTunnel;

/// A table with every kind of entry the lookup rules treat differently.
pub fn table() -> &'static NameIndex {
    static TABLE: OnceLock<NameIndex> = OnceLock::new();
    TABLE.get_or_init(|| {
        let big: Vec<String> = (0..120).map(|i| format!("\"240.240.1.{i}\"")).collect();
        let json = format!(
            r#"{{"version":"f","namespace":"ns","searchDomains":["ns.svc.cluster.local","corp.example"],"names":{{
              "a.ns.svc.cluster.local":{{"ips":["10.0.0.1","fd00::1"],"registry":"Kubernetes","shortname":"a","namespace":"ns"}},
              "b.example.com":{{"ips":["240.240.0.1"],"registry":"External"}},
              "*.w.example.com":{{"ips":["240.240.0.2"],"registry":"External"}},
              "big.example.com":{{"ips":[{}],"registry":"External"}}
            }}}}"#,
            big.join(",")
        );
        NameIndex::from_json(json.as_bytes()).expect("fuzz table")
    })
}

pub fn respond(data: &[u8]) {
    let (transport, rest) = match data.split_first() {
        Some((b, rest)) if b % 3 == 0 => (Transport::Udp, rest),
        Some((b, rest)) if b % 3 == 1 => (Transport::Tcp, rest),
        Some((_, rest)) => (Transport::Https, rest),
        None => return,
    };
    let parsed = Query::parse(rest);
    for table in [None, Some(table())] {
        match decide(rest, transport, table, "cluster.local", 7) {
            Outcome::Reply { message, .. } => {
                let resp = Response::parse(&message).expect("every reply parses");
                assert!(resp.header.flags & 0x8000 != 0, "QR set");
                assert_eq!(
                    resp.header.id,
                    u16::from_be_bytes([rest[0], rest[1]]),
                    "same ID"
                );
                if let Ok(q) = &parsed {
                    assert!(
                        message.len() <= transport.limit(q),
                        "within the transport limit"
                    );
                    assert_eq!(resp.questions.len(), 1, "question echoed");
                    let mut asked = Vec::new();
                    q.qname.write_to(&mut asked);
                    asked.extend_from_slice(&q.qtype.to_be_bytes());
                    asked.extend_from_slice(&q.qclass.to_be_bytes());
                    assert_eq!(
                        message.get(12..12 + asked.len()),
                        Some(asked.as_slice()),
                        "question as asked"
                    );
                }
            }
            Outcome::Forward => {
                let q = parsed
                    .as_ref()
                    .expect("only parseable queries are forwarded");
                // The forwarder's answer, whatever it is, gets the client's ID back.
                let fake = {
                    let mut m = rest.to_vec();
                    m[2] |= 0x80;
                    m
                };
                let back = forwarded_answer(rest, &fake, transport).expect("forwarded answer");
                assert_eq!(&back[..2], &rest[..2]);
                assert!(
                    back.len() <= transport.limit(q),
                    "forwarded answer fits the transport"
                );
            }
            Outcome::Drop(_) => assert!(parsed.is_err(), "only unparseable messages are dropped"),
        }
    }
}

pub fn name_table(data: &[u8]) {
    let Ok(index) = NameIndex::from_json(data) else {
        return;
    };
    let copy = NameIndex::from_image(index.image().to_vec()).expect("a compiled image validates");
    assert_eq!(copy, index);
    for name in ["a", "a.b", "x.y.z", "cluster.local", "*.x"] {
        let _ = copy.lookup(name);
    }
}

pub fn tunnel(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        return udp_tunnel(usize::from(mode >> 2).min(rest.len()), rest);
    }
    let framing = if mode & 1 == 0 {
        Framing::Capsule
    } else {
        Framing::Tcp
    };
    let cut = usize::from(mode >> 1).min(rest.len());
    let mut t = Tunnel::new(framing);
    let mut rotation = 0;
    let mut jobs = Vec::new();
    for chunk in [&rest[..cut], &rest[cut..]] {
        match t.feed(chunk, Some(table()), "cluster.local", &mut rotation) {
            Ok(j) => jobs.extend(j),
            Err(_) => return,
        }
    }
    for job in &jobs {
        t.complete(job.slot, None);
    }
    assert!(!t.is_waiting());
    let out = t.take_output();
    for frame in Frames::new(framing, &out) {
        let msg = frame
            .expect("our own frames are valid")
            .expect("answers, not padding");
        Response::parse(msg).expect("every framed answer parses");
    }
}

/// The HTTP/1.1 side of [`tunnel`]: `rest` cut at `cut` into two reads.
fn udp_tunnel(cut: usize, rest: &[u8]) {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut t = UdpTunnel::new();
    let mut rotation = 0;
    let mut out = Vec::new();
    let mut refused = false;
    for chunk in [&rest[..cut], &rest[cut..]] {
        match t.feed(chunk, Some(table()), "cluster.local", &mut rotation) {
            Ok(jobs) => {
                for job in &jobs {
                    t.complete(job.slot, None);
                }
            }
            Err(_) => {
                // Refused: the filter drops the connection (queries of the failed read are
                // never forwarded); what was answered before stays well formed.
                refused = true;
                break;
            }
        }
        out.extend(t.take_output());
    }
    assert!(refused || !t.is_waiting());
    // Responses one after another: a 200 head, chunks of capsules, maybe the last chunk.
    let mut rest = out.as_slice();
    while !rest.is_empty() {
        rest = rest
            .strip_prefix(HEAD)
            .expect("every response starts with the 200 head");
        loop {
            if rest.is_empty() {
                break;
            }
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk-size line");
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..end]).expect("ASCII chunk size"),
                16,
            )
            .expect("hex chunk size");
            rest = &rest[end + 2..];
            if size == 0 {
                rest = rest
                    .strip_prefix(b"\r\n")
                    .expect("last chunk ends the response");
                break;
            }
            let (capsules, after) = rest.split_at(size);
            for frame in Frames::new(Framing::Capsule, capsules) {
                let msg = frame
                    .expect("our own capsules are valid")
                    .expect("answers, not padding");
                Response::parse(msg).expect("every answer parses");
            }
            rest = after
                .strip_prefix(b"\r\n")
                .expect("chunk data ends with CRLF");
        }
    }
}

/// The forwarding stream's codec and the filter's link state machine.
pub fn forward(data: &[u8]) {
    use vmesh_api::forward::{answers, frame, push_answer, push_query, queries, GrpcFrames};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        return link_ops(rest);
    }
    // gRPC framing at a cut chosen by the input, then both message kinds.
    let cut = usize::from(mode / 2).min(rest.len());
    let mut frames = GrpcFrames::default();
    let mut messages = Vec::new();
    for part in [&rest[..cut], &rest[cut..]] {
        frames.push(part);
        while let Ok(Some(m)) = frames.next_message() {
            messages.push(m.to_vec());
        }
    }
    messages.push(rest.to_vec());
    for m in &messages {
        let qs: Vec<_> = queries(m).filter_map(Result::ok).collect();
        let mut again = Vec::new();
        for q in &qs {
            push_query(q, &mut again);
        }
        let back: Vec<_> = queries(&again)
            .collect::<Result<_, _>>()
            .expect("re-encoded decodes");
        assert_eq!(back, qs, "queries round trip");
        let ans: Vec<_> = answers(m).filter_map(Result::ok).collect();
        let mut again = Vec::new();
        for a in &ans {
            push_answer(a, &mut again);
        }
        let back: Vec<_> = answers(&again)
            .collect::<Result<_, _>>()
            .expect("re-encoded decodes");
        assert_eq!(back, ans, "answers round trip");
        let mut framed = Vec::new();
        frame(m, &mut framed);
        let mut f = GrpcFrames::default();
        f.push(&framed);
        if m.len() <= vmesh_api::forward::MAX_MESSAGE {
            assert_eq!(f.next_message(), Ok(Some(&m[..])), "framing round trips");
        }
    }
}

/// Bytes as link operations; checks that each submitted query comes back exactly once (as an
/// answer or expired) and only through the stream it may come from.
fn link_ops(ops: &[u8]) {
    use vmesh_api::forward::{queries, Transport};
    use vmesh_core::link::Link;
    let mut link: Link<u32> = Link::new(0);
    let mut now = 0u64;
    let mut next = 0u32;
    let mut token = 0u32;
    let mut returned = std::collections::BTreeSet::new();
    let mut sent: Vec<(u32, u32)> = Vec::new(); // (token, id) seen on the wire
    let mut give_back =
        |owner: u32| assert!(returned.insert(owner), "query {owner} returned twice");
    for &op in ops {
        match op % 7 {
            0 | 1 => {
                next += 1;
                let deadline = now + u64::from(op / 7) * 10;
                if let Err(owner) = link.submit(next, Transport::Udp, vec![op], deadline) {
                    give_back(owner);
                }
            }
            2 => {
                let t = link.token();
                for m in link.flush(now) {
                    for q in queries(&m) {
                        let q = q.expect("the link writes what it reads");
                        sent.push((t.expect("flush sends only on a stream"), q.id));
                    }
                }
            }
            3 => {
                if let Some(&(t, id)) = sent.get(usize::from(op) % sent.len().max(1)) {
                    if let Some(p) = link.answer(t, id) {
                        assert_eq!(Some(t), link.token(), "answers only from the open stream");
                        give_back(p.owner);
                    }
                }
            }
            4 => {
                if let Some(t) = link.token() {
                    assert!(link.closed(t, now));
                } else if link.wants_stream(now) {
                    token += 1;
                    link.opened(token);
                }
            }
            5 => now += u64::from(op),
            _ => {
                for p in link.expire(now) {
                    assert!(p.deadline <= now);
                    give_back(p.owner);
                }
            }
        }
    }
    for p in link.expire(u64::MAX) {
        give_back(p.owner);
    }
    assert_eq!(link.in_flight(), 0);
    assert_eq!(returned.len() as u32, next, "every query came back");
}
