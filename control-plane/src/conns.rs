//! Connection admission: how many connections the server holds open, in total and per source
//! address, and which one gives way when a new one arrives at the cap.
//!
//! Every open connection costs a file descriptor. Without a cap, a client that opens
//! connections and sends nothing takes every descriptor the process has, and from then on
//! `accept` fails for everyone (measured: 1,011 idle TLS connections under the default 1,024
//! limit stopped every legitimate request). The total cap sits below the open-file limit
//! (see [`fd_budget`]), so `accept` itself keeps working, and a connection arriving at a cap
//! does not simply lose: a connection that has not yet *proven* itself (no request on it has
//! passed authentication) is closed to make room, the oldest one of the address holding the
//! most connections. A VM's connection proves itself with its first request, so an attacker's
//! idle or slow connections, which never do, are what gets evicted; and a VM's newcomer, from
//! an address holding one or two connections, is not what an attacker's flood of newer
//! connections pushes out. At the per-source cap an address evicts only its own.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Descriptors kept back from the connection cap: [`CLOSING_SLACK`] evicted connections whose
/// tasks have not yet closed them, and the rest for the listener, the store file, the
/// runtime's epoll and wake-up descriptors, stdio, the accepted-but-not-yet-admitted socket and
/// key files read at renewal. Far less than any real limit.
pub const FD_RESERVE: u64 = 64;
/// Evicted connections still being closed, at most: an eviction only tells a connection's task
/// to close, and under a flood of new connections those tasks may run later than `accept`
/// does. Beyond this many, newcomers are refused until they catch up, so the descriptors in use
/// never exceed the open-file limit (measured without it: `accept` failed with EMFILE).
pub const CLOSING_SLACK: usize = 32;

/// The most connections an open-file limit of `nofile` can hold without `accept` failing.
pub fn fd_budget(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX)
}

/// The open-file limit after raising the soft limit to the hard one (`(soft, hard)`; `None`
/// where there is no limit). A server's connections are file descriptors: the distribution
/// default soft limit of 1,024 is a historical `select()` constraint that tokio does not have.
#[cfg(unix)]
pub fn raise_nofile() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        )?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok((after.current, after.maximum))
}

#[cfg(not(unix))]
pub fn raise_nofile() -> std::io::Result<(Option<u64>, Option<u64>)> {
    Ok((None, None))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_source: usize,
}

/// Why a connection was not admitted (nothing could be evicted for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address holds `per_source` connections, all proven.
    PerSource,
    /// The server holds `total` connections, all proven.
    Full,
    /// [`CLOSING_SLACK`] evicted connections are still being closed.
    Draining,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source",
            Refusal::Full => "full",
            Refusal::Draining => "draining",
        }
    }
}

struct Slot {
    source: IpAddr,
    proven: Arc<AtomicBool>,
    evict: Arc<Notify>,
    /// Evicted: told to close, its descriptor not yet released. Counts against no cap but
    /// [`CLOSING_SLACK`].
    closing: bool,
}

#[derive(Default)]
struct State {
    next: u64,
    /// By admission order: the first unproven slot found is the oldest. Closing ones included.
    open: BTreeMap<u64, Slot>,
    closing: usize,
    /// Connections not closing, per address.
    per_source: HashMap<IpAddr, usize>,
}

impl State {
    fn active(&self) -> usize {
        self.open.len() - self.closing
    }

    fn uncount(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// The connection's descriptor is released.
    fn remove(&mut self, id: u64) {
        if let Some(slot) = self.open.remove(&id) {
            if slot.closing {
                self.closing -= 1;
            } else {
                self.uncount(slot.source);
            }
        }
    }

    /// Tells the oldest unproven connection (from `source` if given) to close.
    fn evict_oldest_unproven(&mut self, source: Option<IpAddr>) -> bool {
        let victim = self.open.iter_mut().find(|(_, s)| {
            !s.closing
                && source.is_none_or(|src| s.source == src)
                && !s.proven.load(Ordering::Relaxed)
        });
        let Some((_, slot)) = victim else {
            return false;
        };
        slot.closing = true;
        // A stored permit: the connection sees it even if it is not waiting yet.
        slot.evict.notify_one();
        let source = slot.source;
        self.closing += 1;
        self.uncount(source);
        true
    }
}

impl State {
    /// Makes room at the total cap: an unproven connection of the address holding the most
    /// connections, else the oldest unproven one anywhere.
    fn evict_for_total(&mut self) -> bool {
        let heaviest = self
            .per_source
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(ip, _)| *ip);
        heaviest.is_some_and(|ip| self.evict_oldest_unproven(Some(ip)))
            || self.evict_oldest_unproven(None)
    }
}

/// The open connections and their caps.
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("open", &self.open())
            .finish()
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    /// Set once a request on this connection passes authentication.
    pub proven: Arc<AtomicBool>,
    /// Notified when the connection is evicted to make room.
    pub evicted: Arc<Notify>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.lock().remove(self.id);
    }
}

/// What admitting a connection did.
#[derive(Debug)]
pub struct Admitted {
    pub ticket: Ticket,
    /// How many unproven connections were closed to make room (0, 1 or 2).
    pub evicted: usize,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            state: Mutex::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now, those being closed included.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Admits a connection from `source`, evicting unproven ones if a cap is reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refusal> {
        let mut st = self.lock();
        if st.closing >= CLOSING_SLACK {
            return Err(Refusal::Draining);
        }
        let mut evicted = 0;
        if st.per_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            if !st.evict_oldest_unproven(Some(source)) {
                return Err(Refusal::PerSource);
            }
            evicted += 1;
        }
        if st.active() >= self.limits.total {
            if !st.evict_for_total() {
                return Err(Refusal::Full);
            }
            evicted += 1;
        }
        let id = st.next;
        st.next += 1;
        let proven = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(Notify::new());
        st.open.insert(
            id,
            Slot {
                source,
                proven: proven.clone(),
                evict: evict.clone(),
                closing: false,
            },
        );
        *st.per_source.entry(source).or_default() += 1;
        Ok(Admitted {
            ticket: Ticket {
                admission: self.clone(),
                id,
                proven,
                evicted: evict,
            },
            evicted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_connection_cap_stays_below_the_open_file_limit() {
        assert_eq!(fd_budget(256), 192);
        assert_eq!(fd_budget(1024), 960);
        assert_eq!(fd_budget(10), 1);
    }

    #[test]
    fn at_the_cap_the_heaviest_addresss_oldest_unproven_connection_gives_way() {
        let a = Admission::new(Limits {
            total: 4,
            per_source: 10,
        });
        let vm = a.admit(ip(1)).unwrap().ticket;
        vm.proven.store(true, Ordering::Relaxed);
        // A VM's newcomer, older than the attacker's connections, not yet authenticated.
        let newcomer_vm = a.admit(ip(5)).unwrap().ticket;
        let idle1 = a.admit(ip(2)).unwrap().ticket;
        let idle2 = a.admit(ip(2)).unwrap().ticket;
        let newcomer = a.admit(ip(4)).unwrap();
        assert_eq!(newcomer.evicted, 1);
        // Four connections and one being closed: its descriptor is not free yet.
        assert_eq!(a.open(), 5);
        // idle1 was told; idle2, the VM's newcomer and the proven VM were not.
        assert!(futures_ready(&idle1.evicted));
        assert!(!futures_ready(&idle2.evicted));
        assert!(!futures_ready(&newcomer_vm.evicted));
        assert!(!futures_ready(&vm.evicted));
        drop(idle1);
        assert_eq!(a.open(), 4);
        drop(idle2);
        assert_eq!(a.open(), 3);
        // The freed slot is usable without evicting anyone.
        assert_eq!(a.admit(ip(6)).unwrap().evicted, 0);
    }

    #[test]
    fn newcomers_wait_while_too_many_evicted_connections_are_still_open() {
        let a = Admission::new(Limits {
            total: 1,
            per_source: 1000,
        });
        // Each newcomer evicts the one before; none of the evicted has closed yet.
        let held: Vec<Ticket> = (0..=CLOSING_SLACK)
            .map(|_| a.admit(ip(2)).unwrap().ticket)
            .collect();
        assert_eq!(a.admit(ip(3)).unwrap_err(), Refusal::Draining);
        assert_eq!(a.open(), CLOSING_SLACK + 1);
        drop(held);
        assert_eq!(a.open(), 0);
        assert_eq!(a.admit(ip(3)).unwrap().evicted, 0);
    }

    #[test]
    fn when_every_connection_is_proven_a_newcomer_is_refused() {
        let a = Admission::new(Limits {
            total: 2,
            per_source: 10,
        });
        let t: Vec<Ticket> = (1..=2).map(|i| a.admit(ip(i)).unwrap().ticket).collect();
        for t in &t {
            t.proven.store(true, Ordering::Relaxed);
        }
        assert_eq!(a.admit(ip(9)).unwrap_err(), Refusal::Full);
        drop(t);
        assert_eq!(a.open(), 0);
        assert!(a.admit(ip(9)).is_ok());
    }

    #[test]
    fn one_address_can_only_evict_its_own_connections() {
        let a = Admission::new(Limits {
            total: 100,
            per_source: 2,
        });
        let other = a.admit(ip(1)).unwrap().ticket;
        let first = a.admit(ip(2)).unwrap().ticket;
        let _second = a.admit(ip(2)).unwrap().ticket;
        let third = a.admit(ip(2)).unwrap();
        assert_eq!(third.evicted, 1);
        assert!(futures_ready(&first.evicted));
        assert!(!futures_ready(&other.evicted));
        // Its own connections all proven: refused, nobody else touched.
        third.ticket.proven.store(true, Ordering::Relaxed);
        _second.proven.store(true, Ordering::Relaxed);
        assert_eq!(a.admit(ip(2)).unwrap_err(), Refusal::PerSource);
        assert!(!futures_ready(&other.evicted));
    }

    /// Whether a permit is stored in `n` (consumes it).
    fn futures_ready(n: &Notify) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(1), n.notified())
                .await
                .is_ok()
        })
    }
}
