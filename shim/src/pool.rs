//! UDP exchanges with the upstream resolvers over a pool of sockets, instead of a socket per
//! query.
//!
//! ```text
//! exchange(upstream, query) ─► a random socket of the upstream's pool ─► a random free ID
//!        ▲                        (connected; random source port)          │ send
//!        └── the waiter of (socket, ID), if the datagram answers its question ◄─ reader task
//! ```
//!
//! What an off-path attacker must guess to have a forged answer taken: the source port (the
//! kernel picks each socket's port at random from `ip_local_port_range`, by default
//! 32768-60999: ~14.8 bits), the query ID (random among the IDs free on that socket: ~16
//! bits), and the question; and the datagram must come from the upstream's address and port
//! (the sockets are connected, so the kernel drops anything else, and the reader checks again).
//! That is ~30.8 bits against a blind attacker, against unbound's ~32 (16 bits of ID plus a
//! fresh random port per query from `outgoing-port-permit`, ~16 bits; `outgoing-range` only
//! caps how many are open at once). What a pool gives up is per-query port freshness: an
//! attacker who learned a pool's open ports (e.g. by an ICMP side channel, as SAD DNS did)
//! faces 16 bits of ID plus 5 bits for which of the [`POOL_SIZE`] sockets was used. Rotation
//! bounds that: a socket takes at most [`MAX_USES`] queries and lives at most [`MAX_AGE`],
//! then it is replaced by a fresh one on a new random port (the old one finishes its queries
//! in flight, then closes).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::time::{timeout, timeout_at, Instant};
use vmesh_core::dns::response::set_id;
use vmesh_core::dns::{inspect, Query, TCP_LIMIT};

use crate::upstream::ExchangeError;

/// Sockets per upstream.
pub const POOL_SIZE: usize = 32;
/// Queries a socket sends before it is replaced.
pub const MAX_USES: u32 = 256;
/// How long a socket is used before it is replaced.
pub const MAX_AGE: Duration = Duration::from_secs(10);
/// How often an idle reader checks whether its retired socket can close.
const READER_CHECK: Duration = Duration::from_secs(1);

/// A query waiting on a socket: its bytes as sent (to match the question) and where its
/// answer goes.
struct Waiter {
    query: Vec<u8>,
    answer: oneshot::Sender<Vec<u8>>,
}

struct Pooled {
    socket: UdpSocket,
    upstream: SocketAddr,
    waiting: Mutex<HashMap<u16, Waiter>>,
    uses: AtomicU32,
    born: Instant,
    retired: AtomicBool,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled")
            .field("local", &self.socket.local_addr().ok())
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Pooled {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Waiter>> {
        // A waiter map is whole after any panic elsewhere: entries are inserted and removed
        // whole.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn worn_out(&self, now: Instant) -> bool {
        self.uses.load(Ordering::Relaxed) >= MAX_USES || now.duration_since(self.born) >= MAX_AGE
    }
}

/// Counts of what the readers threw away, for tests and metrics.
#[derive(Debug, Default)]
pub struct Ignored {
    /// Datagrams whose ID waits for nothing on that socket.
    pub unknown_id: std::sync::atomic::AtomicU64,
    /// Datagrams with a waiting ID that do not answer its question (or are not DNS).
    pub wrong_question: std::sync::atomic::AtomicU64,
    /// Datagrams from another address than the upstream (the kernel drops most first).
    pub wrong_source: std::sync::atomic::AtomicU64,
}

/// The pools of every upstream.
#[derive(Debug, Default)]
pub struct UdpPool {
    /// [`POOL_SIZE`] slots per upstream, filled as they are first picked.
    pools: Mutex<HashMap<SocketAddr, Vec<Option<Arc<Pooled>>>>>,
    pub ignored: Arc<Ignored>,
}

impl UdpPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `query` to `upstream` under an ID of the pool's choosing (written into `query`)
    /// and returns the first datagram that answers it, byte-for-byte, or an error at
    /// `deadline`.
    pub async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &mut [u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, ExchangeError> {
        let socket = self.socket(upstream).await?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut waiting = socket.waiting();
            let id = free_id(&waiting).map_err(ExchangeError::Random)?;
            set_id(query, id);
            waiting.insert(
                id,
                Waiter {
                    query: query.to_vec(),
                    answer: tx,
                },
            );
            id
        };
        // Whatever happens next, the ID is freed when this exchange ends.
        let _cleanup = Cleanup {
            socket: &socket,
            id,
        };
        socket
            .socket
            .send(query)
            .await
            .map_err(|source| ExchangeError::Io {
                op: "UDP send",
                source,
            })?;
        match timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            // The upstream refused (ICMP), or the socket failed: no answer will come.
            Ok(Err(_)) => Err(ExchangeError::Io {
                op: "UDP receive",
                source: io::Error::from(io::ErrorKind::ConnectionRefused),
            }),
            Err(_) => Err(ExchangeError::Timeout),
        }
    }

    /// A socket of `upstream`'s pool, picked at random; a worn-out one is replaced first.
    async fn socket(&self, upstream: SocketAddr) -> Result<Arc<Pooled>, ExchangeError> {
        let slot = random_index().map_err(ExchangeError::Random)? % POOL_SIZE;
        let usable = |s: &Arc<Pooled>| !s.worn_out(Instant::now());
        let existing = self.slot(upstream, slot).filter(usable);
        let socket = match existing {
            Some(s) => s,
            None => {
                let fresh = self.open(upstream).await?;
                let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
                let pool = pools
                    .entry(upstream)
                    .or_insert_with(|| vec![None; POOL_SIZE]);
                match pool.get_mut(slot) {
                    // Another exchange filled the slot meanwhile: use its socket; the fresh
                    // one closes unused.
                    Some(Some(current)) if usable(current) => {
                        fresh.retired.store(true, Ordering::Relaxed);
                        Arc::clone(current)
                    }
                    Some(entry) => {
                        if let Some(old) = entry.replace(Arc::clone(&fresh)) {
                            old.retired.store(true, Ordering::Relaxed);
                        }
                        fresh
                    }
                    None => fresh,
                }
            }
        };
        socket.uses.fetch_add(1, Ordering::Relaxed);
        Ok(socket)
    }

    fn slot(&self, upstream: SocketAddr, slot: usize) -> Option<Arc<Pooled>> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.get(&upstream)?.get(slot)?.clone()
    }

    async fn open(&self, upstream: SocketAddr) -> Result<Arc<Pooled>, ExchangeError> {
        let any: IpAddr = match upstream {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        // Port 0: the kernel picks a random free ephemeral port.
        let socket = UdpSocket::bind(SocketAddr::new(any, 0))
            .await
            .map_err(|source| ExchangeError::Io {
                op: "UDP bind",
                source,
            })?;
        // Connected: the kernel drops datagrams from anyone but the upstream, and reports
        // ICMP refusals.
        socket
            .connect(upstream)
            .await
            .map_err(|source| ExchangeError::Io {
                op: "UDP connect",
                source,
            })?;
        let pooled = Arc::new(Pooled {
            socket,
            upstream,
            waiting: Mutex::new(HashMap::new()),
            uses: AtomicU32::new(0),
            born: Instant::now(),
            retired: AtomicBool::new(false),
        });
        tokio::spawn(read_answers(Arc::clone(&pooled), Arc::clone(&self.ignored)));
        Ok(pooled)
    }

    /// Local addresses of `upstream`'s sockets (tests).
    pub fn local_addrs(&self, upstream: SocketAddr) -> Vec<SocketAddr> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools
            .get(&upstream)
            .map(|p| {
                p.iter()
                    .flatten()
                    .filter_map(|s| s.socket.local_addr().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Cleanup<'a> {
    socket: &'a Pooled,
    id: u16,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.socket.waiting().remove(&self.id);
    }
}

/// A random ID no query on this socket waits with. With 65,536 IDs and at most a few
/// thousand in flight on a socket, a few draws always suffice.
fn free_id(waiting: &HashMap<u16, Waiter>) -> Result<u16, getrandom::Error> {
    loop {
        let id = (getrandom::u32()? & 0xFFFF) as u16;
        if !waiting.contains_key(&id) {
            return Ok(id);
        }
    }
}

fn random_index() -> Result<usize, getrandom::Error> {
    getrandom::u32().map(|n| n as usize)
}

/// Whether a retired socket can close: nothing waits on it, and no exchange holds it (the
/// pool no longer hands it out, so only the reader's own reference is left). A waiter is only
/// ever added by an exchange that holds the socket, so none can come after this.
fn can_close(socket: &Arc<Pooled>) -> bool {
    socket.retired.load(Ordering::Relaxed)
        && Arc::strong_count(socket) == 1
        && socket.waiting().is_empty()
}

/// Delivers each datagram that answers a waiting query; ends when the socket fails, or when
/// it was retired and nothing uses it any more.
async fn read_answers(socket: Arc<Pooled>, ignored: Arc<Ignored>) {
    // Large EDNS answers must arrive whole.
    let mut buf = Vec::with_capacity(TCP_LIMIT);
    loop {
        buf.clear();
        let received = match timeout(READER_CHECK, socket.socket.recv_buf_from(&mut buf)).await {
            Ok(r) => r,
            Err(_) => {
                if can_close(&socket) {
                    return;
                }
                continue;
            }
        };
        let (n, from) = match received {
            Ok(r) => r,
            // An ICMP port unreachable for an earlier datagram: the upstream is not listening.
            // It cannot say which query it was for, but every query on this socket went to
            // that upstream: they all fail now (and move on to the next upstream) instead of
            // waiting out their budget.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                socket.waiting().clear();
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, upstream = %socket.upstream, "upstream socket failed");
                socket.retired.store(true, Ordering::Relaxed);
                // Dropping the waiters wakes their exchanges with an error.
                socket.waiting().clear();
                return;
            }
        };
        let datagram = buf.get(..n).unwrap_or_default();
        if from != socket.upstream {
            ignored.wrong_source.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Some(id) = datagram.first_chunk::<2>().map(|b| u16::from_be_bytes(*b)) else {
            ignored.unknown_id.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut waiting = socket.waiting();
        let Some(waiter) = waiting.get(&id) else {
            ignored.unknown_id.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let matches = Query::parse(&waiter.query).is_ok_and(|q| inspect::answers(&q, datagram));
        if !matches {
            ignored.wrong_question.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %socket.upstream, len = n, "ignoring a datagram that does not answer the query with its ID");
            continue;
        }
        if let Some(waiter) = waiting.remove(&id) {
            let _ = waiter.answer.send(datagram.to_vec());
        }
    }
}
