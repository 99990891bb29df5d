//! The filter's end of the forwarding stream (`vmesh_api::forward`) as a state machine: which
//! queries are in flight, under which id, until when, and whether the stream is up.
//!
//! One [`Link`] per Envoy worker VM. The filter drives it with what Envoy tells it (a stream
//! opened, a message, the stream closed, the time) and does what it says (send these batches,
//! open a stream now, deliver this answer or this SERVFAIL):
//!
//! ```text
//!   submit ──► pending (an id, a deadline) ──flush──► sent on the open stream
//!                 │  ▲                                   │
//!                 │  └──── stream closed: sent again ◄───┤  (on the next stream, same id)
//!                 ▼                                      ▼
//!     deadline passed: SERVFAIL               answer with its id: delivered, once
//! ```
//!
//! - **Ids** are a slot index (16 bits) and the slot's generation (16 bits): O(1) to find, and
//!   an answer for a slot reused since (a late duplicate) does not match.
//! - **Deadlines** are fixed at submit; [`Link::expire`] hands back every query whose deadline
//!   passed, unanswered, exactly once. Deadlines are kept in submit order, which is deadline
//!   order (one timeout for all), so expiring costs nothing per tick when nothing expires.
//! - **Reconnects**: when the stream closes (reset, the shim restarting), the queries it
//!   carried stay pending and go out again on the next stream, until their deadlines. An
//!   answer is taken only from the current stream and only for a pending id, and taking it
//!   ends the query, so no query is answered twice and none is dropped silently.
//! - **Backoff**: a stream is opened again after [`RETRY_MIN_MS`], doubling up to
//!   [`RETRY_MAX_MS`] while streams close without having answered anything; a stream that
//!   answered resets it. The cap keeps a restarted shim in use within a second.

use std::collections::VecDeque;

use vmesh_api::forward::{push_query, Query, Transport, BATCH_BYTES};

/// First retry after a stream closed or failed to open.
pub const RETRY_MIN_MS: u64 = 100;
/// Retries never wait longer than this.
pub const RETRY_MAX_MS: u64 = 500;
/// Queries in flight per worker at most; more are refused (SERVFAIL at once).
pub const MAX_IN_FLIGHT: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No stream; open one at `retry_at` (milliseconds).
    Down { retry_at: u64 },
    /// A stream Envoy accepted; `answered` once anything came back on it.
    Open { token: u32, answered: bool },
}

/// A query waiting for its answer, with whatever the caller needs to deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<T> {
    pub owner: T,
    pub transport: Transport,
    /// The client's query as it arrived (the answer is fitted to it).
    pub query: Vec<u8>,
    /// Milliseconds, on the caller's clock.
    pub deadline: u64,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u16,
    pending: Option<Pending<T>>,
}

#[derive(Debug)]
pub struct Link<T> {
    state: State,
    backoff: u64,
    slots: Vec<Slot<T>>,
    free: Vec<u16>,
    /// (deadline, id) in submit order.
    deadlines: VecDeque<(u64, u32)>,
    /// Ids to send with the next [`Link::flush`].
    unsent: Vec<u32>,
    in_flight: usize,
}

fn index_of(id: u32) -> usize {
    (id & 0xFFFF) as usize
}

impl<T> Link<T> {
    /// A link without a stream, due to open one at `now`.
    pub fn new(now: u64) -> Self {
        Link {
            state: State::Down { retry_at: now },
            backoff: RETRY_MIN_MS,
            slots: Vec::new(),
            free: Vec::new(),
            deadlines: VecDeque::new(),
            unsent: Vec::new(),
            in_flight: 0,
        }
    }

    /// The open stream's token.
    pub fn token(&self) -> Option<u32> {
        match self.state {
            State::Open { token, .. } => Some(token),
            State::Down { .. } => None,
        }
    }

    /// Whether a stream should be opened now.
    pub fn wants_stream(&self, now: u64) -> bool {
        matches!(self.state, State::Down { retry_at } if now >= retry_at)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Envoy accepted a new stream: what is pending goes out on it with the next flush.
    pub fn opened(&mut self, token: u32) {
        self.state = State::Open {
            token,
            answered: false,
        };
        self.requeue();
    }

    /// Opening a stream failed; try again later.
    pub fn open_failed(&mut self, now: u64) {
        self.retry_later(now, false);
    }

    /// The stream `token` closed. Returns false (and changes nothing) for another stream's
    /// token: a close that arrives for a stream already replaced.
    pub fn closed(&mut self, token: u32, now: u64) -> bool {
        let State::Open {
            token: current,
            answered,
        } = self.state
        else {
            return false;
        };
        if current != token {
            return false;
        }
        self.retry_later(now, answered);
        true
    }

    fn retry_later(&mut self, now: u64, worked: bool) {
        if worked {
            self.backoff = RETRY_MIN_MS;
        }
        self.state = State::Down {
            retry_at: now.saturating_add(self.backoff),
        };
        if !worked {
            self.backoff = (self.backoff * 2).min(RETRY_MAX_MS);
        }
        self.unsent.clear();
    }

    /// Everything still pending goes out again, in submit order.
    fn requeue(&mut self) {
        self.unsent.clear();
        for &(deadline, id) in &self.deadlines {
            if self.lookup(id).is_some_and(|p| p.deadline == deadline) {
                self.unsent.push(id);
            }
        }
    }

    fn lookup(&self, id: u32) -> Option<&Pending<T>> {
        let slot = self.slots.get(index_of(id))?;
        if u32::from(slot.generation) != id >> 16 {
            return None;
        }
        slot.pending.as_ref()
    }

    /// Takes a query in. Returns its id, or gives `owner` back when [`MAX_IN_FLIGHT`] are
    /// already waiting (the caller answers SERVFAIL).
    pub fn submit(
        &mut self,
        owner: T,
        transport: Transport,
        query: Vec<u8>,
        deadline: u64,
    ) -> Result<u32, T> {
        let index = match self.free.pop() {
            Some(i) => usize::from(i),
            None if self.slots.len() < MAX_IN_FLIGHT => {
                self.slots.push(Slot {
                    generation: 0,
                    pending: None,
                });
                self.slots.len() - 1
            }
            None => return Err(owner),
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return Err(owner);
        };
        slot.pending = Some(Pending {
            owner,
            transport,
            query,
            deadline,
        });
        let id = (u32::from(slot.generation) << 16) | index as u32;
        self.in_flight += 1;
        self.deadlines.push_back((deadline, id));
        // Answered queries leave their entry behind until it reaches the front; a slow query
        // at the front would let them pile up, so they are dropped once they outnumber the
        // live ones.
        if self.deadlines.len() > 2 * self.in_flight + 1024 {
            let slots = &self.slots;
            self.deadlines.retain(|&(d, id)| {
                slots.get(index_of(id)).is_some_and(|s| {
                    u32::from(s.generation) == id >> 16
                        && s.pending.as_ref().is_some_and(|p| p.deadline == d)
                })
            });
        }
        if self.token().is_some() {
            self.unsent.push(id);
        }
        Ok(id)
    }

    fn take(&mut self, id: u32) -> Option<Pending<T>> {
        let index = index_of(id);
        let slot = self.slots.get_mut(index)?;
        if u32::from(slot.generation) != id >> 16 {
            return None;
        }
        let pending = slot.pending.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u16);
        self.in_flight -= 1;
        Some(pending)
    }

    /// The messages to send now on the open stream: every query not yet sent on it, in
    /// batches of about [`BATCH_BYTES`], each with its remaining budget. Empty without a
    /// stream (they go when one opens).
    pub fn flush(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if self.token().is_none() || self.unsent.is_empty() {
            return out;
        }
        let mut batch = Vec::new();
        for id in std::mem::take(&mut self.unsent) {
            let Some(p) = self.lookup(id) else { continue };
            let query = Query {
                id,
                transport: p.transport,
                budget_ms: budget(p.deadline.saturating_sub(now)),
                message: &p.query,
            };
            push_query(&query, &mut batch);
            if batch.len() >= BATCH_BYTES {
                out.push(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            out.push(batch);
        }
        out
    }

    /// An answer arrived on stream `token` for `id`: the pending query, once. `None` for
    /// another stream, an unknown id or one already answered or expired.
    pub fn answer(&mut self, token: u32, id: u32) -> Option<Pending<T>> {
        match &mut self.state {
            State::Open {
                token: current,
                answered,
            } if *current == token => *answered = true,
            _ => return None,
        }
        self.take(id)
    }

    /// Queries whose deadline has passed, unanswered: each is handed out once, here or by
    /// [`Link::answer`], never both.
    pub fn expire(&mut self, now: u64) -> Vec<Pending<T>> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.front() {
            // Deadlines may not be monotonic if the caller's clock steps back; an entry
            // already answered is dropped wherever it is, so the queue cannot grow without
            // bound.
            let live = self.lookup(id).is_some_and(|p| p.deadline == deadline);
            if live && deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if live {
                out.extend(self.take(id));
            }
        }
        out
    }
}

/// The shim's share of what is left: five sixths, so its own SERVFAIL (every upstream failed)
/// still reaches the filter before the deadline.
fn budget(remaining_ms: u64) -> u32 {
    u32::try_from(remaining_ms * 5 / 6)
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_api::forward::queries;

    fn ids(messages: &[Vec<u8>]) -> Vec<u32> {
        messages
            .iter()
            .flat_map(|m| queries(m).map(|q| q.unwrap().id).collect::<Vec<_>>())
            .collect()
    }

    fn link_open() -> Link<&'static str> {
        let mut l = Link::new(0);
        assert!(l.wants_stream(0));
        l.opened(7);
        l
    }

    #[test]
    fn queries_go_out_batched_with_their_remaining_budget() {
        let mut l = link_open();
        let a = l.submit("a", Transport::Udp, b"qa".to_vec(), 6000).unwrap();
        let b = l.submit("b", Transport::Tcp, b"qb".to_vec(), 6000).unwrap();
        let msgs = l.flush(0);
        assert_eq!(msgs.len(), 1);
        let sent: Vec<_> = queries(&msgs[0]).map(Result::unwrap).collect();
        assert_eq!(
            (sent[0].id, sent[0].message, sent[0].budget_ms),
            (a, &b"qa"[..], 5000)
        );
        assert_eq!((sent[1].id, sent[1].transport), (b, Transport::Tcp));
        assert!(l.flush(0).is_empty(), "sent once");
        assert_eq!(l.answer(7, b).map(|p| p.owner), Some("b"));
        assert_eq!(l.answer(7, b), None, "answered once");
        assert_eq!(l.in_flight(), 1);
    }

    #[test]
    fn big_batches_are_split() {
        let mut l = link_open();
        for _ in 0..200 {
            l.submit("x", Transport::Udp, vec![0; 400], 100).unwrap();
        }
        let msgs = l.flush(0);
        assert!(msgs.len() > 1);
        assert!(msgs.iter().all(|m| m.len() < BATCH_BYTES + 500));
        assert_eq!(ids(&msgs).len(), 200);
    }

    #[test]
    fn a_reconnect_sends_what_was_in_flight_again_and_answers_it_once() {
        let mut l = link_open();
        let a = l.submit("a", Transport::Udp, b"qa".to_vec(), 6000).unwrap();
        let b = l.submit("b", Transport::Udp, b"qb".to_vec(), 6000).unwrap();
        assert_eq!(ids(&l.flush(0)), [a, b]);
        assert_eq!(l.answer(7, a).map(|p| p.owner), Some("a"));

        assert!(!l.closed(99, 10), "another stream's close is ignored");
        assert!(l.closed(7, 10));
        assert_eq!(l.token(), None);
        // Queries while down wait for the next stream.
        let c = l.submit("c", Transport::Udp, b"qc".to_vec(), 6010).unwrap();
        assert!(l.flush(20).is_empty());
        assert!(!l.wants_stream(10 + RETRY_MIN_MS - 1));
        assert!(l.wants_stream(10 + RETRY_MIN_MS));
        l.opened(8);
        assert_eq!(ids(&l.flush(200)), [b, c], "b again, then c; not a");
        // A late message from the old stream does not count.
        assert_eq!(l.answer(7, b), None);
        assert_eq!(l.answer(8, b).map(|p| p.owner), Some("b"));
        assert_eq!(l.answer(8, c).map(|p| p.owner), Some("c"));
        assert_eq!(l.in_flight(), 0);
        assert!(l.expire(u64::MAX).is_empty(), "nothing left to expire");
    }

    #[test]
    fn backoff_doubles_while_streams_fail_and_resets_once_one_answers() {
        let mut l: Link<()> = Link::new(0);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            l.opened(1);
            assert!(l.closed(1, now));
            let mut t = now;
            while !l.wants_stream(t) {
                t += 1;
            }
            waits.push(t - now);
            now = t;
        }
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        l.open_failed(now);
        assert!(!l.wants_stream(now + 499) && l.wants_stream(now + 500));
        l.opened(2);
        let id = l.submit((), Transport::Udp, vec![1], now + 5000).unwrap();
        assert!(l.answer(2, id).is_some());
        assert!(l.closed(2, now));
        assert!(l.wants_stream(now + RETRY_MIN_MS));
    }

    #[test]
    fn deadlines_expire_each_query_once_and_never_an_answered_one() {
        let mut l = link_open();
        let a = l.submit("a", Transport::Udp, vec![1], 100).unwrap();
        let b = l.submit("b", Transport::Udp, vec![2], 200).unwrap();
        let _c = l.submit("c", Transport::Udp, vec![3], 300).unwrap();
        assert!(l.expire(99).is_empty());
        assert!(l.answer(7, a).is_some());
        let gone: Vec<_> = l.expire(250).into_iter().map(|p| p.owner).collect();
        assert_eq!(gone, ["b"]);
        assert_eq!(l.answer(7, b), None, "an expired query takes no answer");
        assert!(l.expire(250).is_empty());
        assert_eq!(l.expire(300).len(), 1);
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn reused_slots_do_not_take_answers_meant_for_their_previous_query() {
        let mut l = link_open();
        let a = l.submit("a", Transport::Udp, vec![1], 100).unwrap();
        assert!(l.answer(7, a).is_some());
        let b = l.submit("b", Transport::Udp, vec![2], 100).unwrap();
        assert_eq!(index_of(a), index_of(b));
        assert_ne!(a, b);
        assert_eq!(l.answer(7, a), None);
        assert_eq!(l.answer(7, b).map(|p| p.owner), Some("b"));
    }

    #[test]
    fn answered_entries_do_not_pile_up_behind_a_slow_query() {
        let mut l = link_open();
        l.submit("slow", Transport::Udp, vec![1], 1_000_000)
            .unwrap();
        for i in 0..100_000u64 {
            let id = l.submit("fast", Transport::Udp, vec![2], 1000 + i).unwrap();
            assert!(l.answer(7, id).is_some());
        }
        assert!(l.deadlines.len() < 2000, "{}", l.deadlines.len());
        assert_eq!(l.expire(1_000_000).len(), 1);
    }

    #[test]
    fn the_in_flight_limit_refuses_and_gives_the_owner_back() {
        let mut l: Link<u8> = Link::new(0);
        l.opened(7);
        for _ in 0..MAX_IN_FLIGHT {
            l.submit(1u8, Transport::Udp, Vec::new(), 10).unwrap();
        }
        assert_eq!(l.submit(2u8, Transport::Udp, Vec::new(), 10), Err(2));
        assert_eq!(l.expire(10).len(), MAX_IN_FLIGHT);
        assert!(l.submit(3u8, Transport::Udp, Vec::new(), 20).is_ok());
    }
}
