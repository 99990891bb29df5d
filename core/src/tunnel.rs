//! One tunnelled DNS stream (all datagrams of a UDP client address, or one TCP connection) as
//! a state machine the filter drives with bytes and forward results.
//!
//! Answers leave as soon as they exist: owned ones at once, forwarded ones when the forwarder
//! answers. So one slow forward never holds the answers behind it, and the order of answers is
//! the order they became ready, not the order of the queries. Clients match answers by ID:
//! over UDP every datagram stands alone, and over TCP RFC 7766 §7 lets a server answer
//! pipelined queries out of order.

use crate::framing::{encode, Frames, Framing, FramingError};
use crate::names::NameIndex;
use crate::responder::{forwarded_answer, respond, servfail, Outcome, Transport, Verdict};

/// Counters of what happened to the queries seen since the last [`Tunnel::take_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub answered: u64,
    pub nodata: u64,
    pub truncated: u64,
    pub forwarded: u64,
    pub forward_failed: u64,
    pub not_ready: u64,
    pub formerr: u64,
    pub notimp: u64,
    pub refused: u64,
    pub badvers: u64,
    pub dropped: u64,
}

impl Counts {
    pub fn record(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Answered { truncated } => {
                self.answered += 1;
                self.truncated += u64::from(truncated);
            }
            Verdict::NoData => self.nodata += 1,
            Verdict::NotReady => self.not_ready += 1,
            Verdict::FormErr => self.formerr += 1,
            Verdict::NotImp => self.notimp += 1,
            Verdict::Refused => self.refused += 1,
            Verdict::BadVers => self.badvers += 1,
        }
    }
}

/// A query the filter must send to the forwarder; report the result with its `slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardJob {
    pub slot: usize,
    pub query: Vec<u8>,
}

#[derive(Debug)]
pub struct Tunnel {
    framing: Framing,
    transport: Transport,
    /// The start of a frame whose end has not arrived yet.
    carry: Vec<u8>,
    /// Framed answers ready to leave.
    ready: Vec<u8>,
    /// Forwarded queries in flight, by slot.
    waiting: Vec<(usize, Vec<u8>)>,
    next_slot: usize,
    counts: Counts,
}

impl Tunnel {
    pub fn new(framing: Framing) -> Self {
        let transport = match framing {
            Framing::Capsule => Transport::Udp,
            Framing::Tcp => Transport::Tcp,
        };
        Tunnel {
            framing,
            transport,
            carry: Vec::new(),
            ready: Vec::new(),
            waiting: Vec::new(),
            next_slot: 0,
            counts: Counts::default(),
        }
    }

    /// Takes newly arrived stream bytes. Returns the queries to forward now.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        table: Option<&NameIndex>,
        cluster_domain: &str,
        rotation: &mut u32,
    ) -> Result<Vec<ForwardJob>, FramingError> {
        let joined;
        let data: &[u8] = if self.carry.is_empty() {
            bytes
        } else {
            self.carry.extend_from_slice(bytes);
            joined = std::mem::take(&mut self.carry);
            &joined
        };
        let mut jobs = Vec::new();
        let mut frames = Frames::new(self.framing, data);
        for frame in frames.by_ref() {
            let Some(message) = frame? else { continue };
            match respond(message, self.transport, table, cluster_domain, *rotation) {
                Outcome::Reply {
                    message: answer,
                    verdict,
                } => {
                    self.counts.record(verdict);
                    *rotation = rotation.wrapping_add(1);
                    encode(self.framing, &answer, &mut self.ready);
                }
                Outcome::Forward => {
                    self.counts.forwarded += 1;
                    let slot = self.next_slot;
                    self.next_slot = self.next_slot.wrapping_add(1);
                    jobs.push(ForwardJob {
                        slot,
                        query: message.to_vec(),
                    });
                    self.waiting.push((slot, message.to_vec()));
                }
                Outcome::Drop(_) => self.counts.dropped += 1,
            }
        }
        let consumed = frames.consumed();
        if let Some(rest) = data.get(consumed..) {
            self.carry = rest.to_vec();
        }
        Ok(jobs)
    }

    /// Completes a forwarded query: `Some(answer)` from the forwarder, `None` when it failed
    /// (the client then gets SERVFAIL). Unknown or already completed slots are ignored.
    pub fn complete(&mut self, slot: usize, answer: Option<&[u8]>) {
        let Some(at) = self.waiting.iter().position(|(s, _)| *s == slot) else {
            return;
        };
        let (_, query) = self.waiting.swap_remove(at);
        let reply = match answer {
            Some(a) => forwarded_answer(&query, a, self.transport),
            None => {
                self.counts.forward_failed += 1;
                servfail(&query, self.transport)
            }
        };
        if let Some(reply) = reply {
            encode(self.framing, &reply, &mut self.ready);
        }
    }

    /// The stream ended: an incomplete frame left over can never complete and is dropped.
    pub fn end_of_stream(&mut self) {
        if !self.carry.is_empty() {
            self.carry.clear();
            self.counts.dropped += 1;
        }
    }

    /// Whether forwarded queries are still in flight.
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The framed answers ready to send now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.ready)
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::inspect::Response;
    use crate::dns::message::tests::query_bytes;
    use crate::dns::rtype;
    use crate::framing::Frames;

    fn index() -> NameIndex {
        let json = br#"{"version":"1","namespace":"ns","names":{"mesh.example.com":{"ips":["240.240.0.9"],"registry":"External"}}}"#;
        NameIndex::from_json(json).unwrap()
    }

    fn framed(framing: Framing, msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            encode(framing, m, &mut out);
        }
        out
    }

    fn answers(framing: Framing, out: &[u8]) -> Vec<Response> {
        Frames::new(framing, out)
            .map(|f| Response::parse(f.unwrap().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn owned_queries_are_answered_in_place_without_waiting() {
        let t = index();
        let mut tunnel = Tunnel::new(Framing::Capsule);
        let input = framed(
            Framing::Capsule,
            &[query_bytes(1, "mesh.example.com", rtype::A, None)],
        );
        let jobs = tunnel
            .feed(&input, Some(&t), "cluster.local", &mut 0)
            .unwrap();
        assert!(jobs.is_empty() && !tunnel.is_waiting());
        let out = answers(Framing::Capsule, &tunnel.take_output());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].header.id, 1);
        assert_eq!(tunnel.take_counts().answered, 1);
    }

    #[test]
    fn a_pending_forward_does_not_hold_the_answers_behind_it() {
        let t = index();
        let mut tunnel = Tunnel::new(Framing::Tcp);
        let first = framed(
            Framing::Tcp,
            &[
                query_bytes(1, "mesh.example.com", rtype::A, None),
                query_bytes(2, "example.org", rtype::A, None),
            ],
        );
        let jobs = tunnel
            .feed(&first, Some(&t), "cluster.local", &mut 0)
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(tunnel.is_waiting());
        let out = answers(Framing::Tcp, &tunnel.take_output());
        assert_eq!(out.iter().map(|r| r.header.id).collect::<Vec<_>>(), [1]);

        // A third query arrives split over two chunks while the forward is in flight.
        let third = framed(
            Framing::Tcp,
            &[query_bytes(3, "mesh.example.com", rtype::A, None)],
        );
        assert!(tunnel
            .feed(&third[..5], Some(&t), "cluster.local", &mut 0)
            .unwrap()
            .is_empty());
        assert!(tunnel.take_output().is_empty());
        assert!(tunnel
            .feed(&third[5..], Some(&t), "cluster.local", &mut 0)
            .unwrap()
            .is_empty());
        let out = answers(Framing::Tcp, &tunnel.take_output());
        assert_eq!(out.iter().map(|r| r.header.id).collect::<Vec<_>>(), [3]);

        let mut upstream = query_bytes(0x7777, "example.org", rtype::A, None);
        upstream[2] |= 0x80;
        tunnel.complete(jobs[0].slot, Some(&upstream));
        assert!(!tunnel.is_waiting());
        let out = answers(Framing::Tcp, &tunnel.take_output());
        assert_eq!(out.iter().map(|r| r.header.id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn forwards_complete_in_any_order_under_their_own_slots() {
        let mut tunnel = Tunnel::new(Framing::Capsule);
        let input = framed(
            Framing::Capsule,
            &[
                query_bytes(1, "a.example.org", rtype::A, None),
                query_bytes(2, "b.example.org", rtype::A, None),
            ],
        );
        let jobs = tunnel.feed(&input, None, "cluster.local", &mut 0).unwrap();
        assert_ne!(jobs[0].slot, jobs[1].slot);
        tunnel.complete(jobs[1].slot, None);
        assert!(tunnel.is_waiting());
        let out = answers(Framing::Capsule, &tunnel.take_output());
        assert_eq!(out.iter().map(|r| r.header.id).collect::<Vec<_>>(), [2]);
        tunnel.complete(jobs[0].slot, None);
        assert!(!tunnel.is_waiting());
        let out = answers(Framing::Capsule, &tunnel.take_output());
        assert_eq!(out.iter().map(|r| r.header.id).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn failed_forward_becomes_servfail_for_that_query_only() {
        let mut tunnel = Tunnel::new(Framing::Capsule);
        let input = framed(Framing::Capsule, &[query_bytes(9, "example.org", 16, None)]);
        let jobs = tunnel.feed(&input, None, "cluster.local", &mut 0).unwrap();
        tunnel.complete(jobs[0].slot, None);
        tunnel.complete(jobs[0].slot, None); // a late duplicate is ignored
        let out = answers(Framing::Capsule, &tunnel.take_output());
        assert_eq!((out[0].header.id, out[0].rcode()), (9, 2));
        let counts = tunnel.take_counts();
        assert_eq!((counts.forwarded, counts.forward_failed), (1, 1));
    }

    #[test]
    fn hostile_frames_are_dropped_or_refused_and_the_stream_goes_on() {
        let t = index();
        let mut tunnel = Tunnel::new(Framing::Capsule);
        let mut response = query_bytes(5, "mesh.example.com", rtype::A, None);
        response[2] |= 0x80;
        let input = framed(
            Framing::Capsule,
            &[
                vec![1, 2, 3],
                response,
                vec![0u8; 12],
                query_bytes(6, "mesh.example.com", rtype::A, None),
            ],
        );
        let jobs = tunnel
            .feed(&input, Some(&t), "cluster.local", &mut 0)
            .unwrap();
        assert!(jobs.is_empty());
        let out = answers(Framing::Capsule, &tunnel.take_output());
        // short and QR=1 dropped; QDCOUNT=0 -> FORMERR; the good query answered.
        assert_eq!(
            out.iter()
                .map(|r| (r.header.id, r.rcode()))
                .collect::<Vec<_>>(),
            vec![(0, 1), (6, 0)]
        );
        assert_eq!(tunnel.take_counts().dropped, 2);
    }
}
