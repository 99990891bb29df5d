//! Relaying one DNS query to the upstream resolvers: the logic behind `/dns-query`.
//!
//! A query is parsed by core (anything that is not a standard query is refused, so the shim
//! never relays garbage), sent under a fresh random ID to each upstream in turn within one time
//! budget (over UDP from the upstream's socket pool, [`crate::pool`]; over TCP on a new
//! connection when a client that takes whole answers got a truncated one), and the first upstream's answer goes back byte-for-byte under the client's ID. An
//! upstream's SERVFAIL or NXDOMAIN is an answer like any other; only transport failures,
//! timeouts and non-answers move on to the next upstream. When none answers, the client gets a
//! SERVFAIL that core builds for its query.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use vmesh_core::dns::response::set_id;
use vmesh_core::dns::{Query, QueryError};
use vmesh_core::responder::{servfail, Transport};

use crate::pool::UdpPool;
use crate::upstream::{exchange_tcp_until, ExchangeError, Protocol};

/// The request header the filter uses to say how the client asked.
pub use vmesh_api::paths::header::TRANSPORT as TRANSPORT_HEADER;

/// How to ask upstream, from [`TRANSPORT_HEADER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `udp`: the client asked over UDP; its answer goes back as UDP gave it, TC included, and
    /// the client retries over TCP itself.
    Udp,
    /// `tcp`: the client asked over TCP and takes answers of any size. Asked over UDP first
    /// and over TCP only when that answer is truncated: a TCP connection per query costs the
    /// upstream far more (dnsmasq forks for each one), and the client still gets the whole
    /// answer.
    Tcp,
    /// No header (a real DoH client): UDP, and over TCP when the UDP answer is truncated, since
    /// a DoH client never retries over TCP.
    Doh,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {TRANSPORT_HEADER} {0:?} (expected \"udp\" or \"tcp\")")]
pub struct UnknownTransport(pub String);

impl Mode {
    pub fn from_header(value: Option<&[u8]>) -> Result<Self, UnknownTransport> {
        match value {
            None => Ok(Mode::Doh),
            Some(v) if v.eq_ignore_ascii_case(b"udp") => Ok(Mode::Udp),
            Some(v) if v.eq_ignore_ascii_case(b"tcp") => Ok(Mode::Tcp),
            Some(v) => Err(UnknownTransport(String::from_utf8_lossy(v).into_owned())),
        }
    }

    /// Whether the client takes any size, so a truncated UDP answer must be asked again
    /// over TCP.
    fn wants_whole_answer(self) -> bool {
        matches!(self, Mode::Tcp | Mode::Doh)
    }

    /// The transport core sizes a SERVFAIL for.
    fn transport(self) -> Transport {
        match self {
            Mode::Udp => Transport::Udp,
            Mode::Tcp => Transport::Tcp,
            Mode::Doh => Transport::Https,
        }
    }
}

/// Where an answer came from, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Upstream {
        addr: SocketAddr,
        protocol: Protocol,
    },
    /// Every upstream failed over TCP after answering truncated over UDP: the truncated answer
    /// is still the best there is.
    TruncatedFallback { addr: SocketAddr },
    /// Every upstream failed: SERVFAIL built here.
    ServFail,
}

#[derive(Debug)]
pub struct Answer {
    pub message: Vec<u8>,
    pub source: Source,
}

#[derive(Debug)]
pub struct Forwarder {
    /// Replaced as a whole when resolv.conf changes; a query keeps the list it started with.
    upstreams: RwLock<Arc<[SocketAddr]>>,
    budget: Duration,
    failures: FailureLog,
    pool: UdpPool,
}

impl Forwarder {
    /// `upstreams` in the order to try them; `budget` bounds one query's total time.
    pub fn new(upstreams: Vec<SocketAddr>, budget: Duration) -> Self {
        Forwarder {
            upstreams: RwLock::new(upstreams.into()),
            budget,
            failures: FailureLog::default(),
            pool: UdpPool::new(),
        }
    }

    pub fn upstreams(&self) -> Arc<[SocketAddr]> {
        // A poisoned lock still holds a whole list: writers only ever swap the Arc.
        Arc::clone(
            &self
                .upstreams
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Replaces the upstreams for the queries that start from now on.
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        *self
            .upstreams
            .write()
            .unwrap_or_else(PoisonError::into_inner) = upstreams.into();
    }

    /// Relays `query`. Fails only when `query` is not a standard DNS query.
    pub async fn forward(&self, query: &[u8], mode: Mode) -> Result<Answer, QueryError> {
        self.forward_within(query, mode, self.budget).await
    }

    /// [`Forwarder::forward`] within `budget` (or the forwarder's own budget, if shorter): the
    /// forwarding stream's queries say how long their client still waits.
    pub async fn forward_within(
        &self,
        query: &[u8],
        mode: Mode,
        budget: Duration,
    ) -> Result<Answer, QueryError> {
        let client = Query::parse(query)?;
        let client_id = client.header.id;
        let deadline = Instant::now() + budget.min(self.budget);
        let mut sent = query.to_vec();
        let mut fallback = None;
        let upstreams = self.upstreams();
        for (i, &addr) in upstreams.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // An even share of what is left, so one silent upstream cannot use up the budget
            // of the ones after it, and a fast failure leaves more for the rest.
            let left = u32::try_from(upstreams.len() - i).unwrap_or(u32::MAX);
            let attempt_deadline = now + (deadline - now) / left;
            match self.attempt(addr, mode, &mut sent, attempt_deadline).await {
                Ok(Attempt::Answer(mut message, protocol)) => {
                    set_id(&mut message, client_id);
                    return Ok(Answer {
                        message,
                        source: Source::Upstream { addr, protocol },
                    });
                }
                Ok(Attempt::OnlyTruncated(message, error)) => {
                    tracing::debug!(%addr, %error, "upstream answered truncated over UDP but not over TCP");
                    fallback.get_or_insert((message, addr));
                }
                Err(error) => tracing::debug!(%addr, %error, "upstream failed"),
            }
        }
        if let Some((mut message, addr)) = fallback {
            set_id(&mut message, client_id);
            return Ok(Answer {
                message,
                source: Source::TruncatedFallback { addr },
            });
        }
        self.failures.record(upstreams.len());
        let message = servfail(query, mode.transport()).ok_or(QueryError::ShortHeader)?;
        Ok(Answer {
            message,
            source: Source::ServFail,
        })
    }

    /// One upstream: UDP, then TCP if the client takes any size and UDP came back truncated.
    async fn attempt(
        &self,
        addr: SocketAddr,
        mode: Mode,
        sent: &mut [u8],
        deadline: Instant,
    ) -> Result<Attempt, ExchangeError> {
        let answer = self.ask(addr, Protocol::Udp, sent, deadline).await?;
        if !mode.wants_whole_answer() || !is_truncated(&answer) {
            return Ok(Attempt::Answer(answer, Protocol::Udp));
        }
        match self.ask(addr, Protocol::Tcp, sent, deadline).await {
            Ok(full) => Ok(Attempt::Answer(full, Protocol::Tcp)),
            Err(e) => Ok(Attempt::OnlyTruncated(answer, e)),
        }
    }

    /// The UDP sockets and what their readers ignored (tests, metrics).
    pub fn pool(&self) -> &UdpPool {
        &self.pool
    }

    /// One exchange under a fresh random ID, so an off-path attacker cannot guess which
    /// answer the shim would take.
    async fn ask(
        &self,
        addr: SocketAddr,
        protocol: Protocol,
        sent: &mut [u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, ExchangeError> {
        if protocol == Protocol::Udp {
            return self.pool.exchange(addr, sent, deadline).await;
        }
        let id = random_id().map_err(ExchangeError::Random)?;
        set_id(sent, id);
        // The message parsed when the request came in; only its ID changed.
        let asked = Query::parse(sent).map_err(|_| ExchangeError::Mismatch)?;
        exchange_tcp_until(addr, sent, &asked, deadline).await
    }
}

enum Attempt {
    Answer(Vec<u8>, Protocol),
    OnlyTruncated(Vec<u8>, ExchangeError),
}

fn is_truncated(message: &[u8]) -> bool {
    // The TC bit is in the header, which `answers` already checked is there.
    message.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

fn random_id() -> Result<u16, getrandom::Error> {
    getrandom::u32().map(|n| (n & 0xFFFF) as u16)
}

/// Says "all upstreams failed" at warn level at most once per [`FailureLog::EVERY`], with a
/// count, so an upstream outage does not become a log line per query.
#[derive(Debug, Default)]
struct FailureLog {
    state: Mutex<FailureState>,
}

#[derive(Debug, Default)]
struct FailureState {
    last_warned: Option<Instant>,
    since: u64,
}

impl FailureLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn record(&self, upstreams: usize) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.since += 1;
        let now = Instant::now();
        if state
            .last_warned
            .is_some_and(|at| now.duration_since(at) < Self::EVERY)
        {
            return;
        }
        tracing::warn!(
            upstreams,
            queries = state.since,
            "no upstream resolver answered; replied SERVFAIL"
        );
        state.last_warned = Some(now);
        state.since = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_header_values() {
        assert_eq!(Mode::from_header(None), Ok(Mode::Doh));
        assert_eq!(Mode::from_header(Some(b"udp")), Ok(Mode::Udp));
        assert_eq!(Mode::from_header(Some(b"TCP")), Ok(Mode::Tcp));
        assert_eq!(
            Mode::from_header(Some(b"quic")),
            Err(UnknownTransport("quic".into()))
        );
    }

    #[test]
    fn tc_bit_is_read_from_the_header() {
        assert!(is_truncated(&[0, 0, 0x83, 0x80]));
        assert!(!is_truncated(&[0, 0, 0x81, 0x80]));
        assert!(!is_truncated(&[0]));
    }
}
