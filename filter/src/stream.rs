//! The worker's gRPC stream to the shim: every query the DNS roots of this VM forward goes out
//! on it, and every answer comes back on it (`vmesh_api::forward`, `vmesh_core::link`).
//!
//! One stream per VM, that is per Envoy worker, shared by the UDP, TCP and DoH roots. Envoy
//! gives a stream to the root context that opened it: the host acts on the root of the
//! effective context, and the SDK delivers the stream's callbacks to the context that was
//! active when it was opened. So a stream is only ever opened from a root callback (the
//! configure call, a tick), the root that opened it owns it, connections send on it by making
//! that root the effective context for the call, and the owner's callbacks deliver each answer
//! by making the connection (or DoH stream) the effective context, as the UDP root's
//! keepalives do.
//!
//! The SDK panics when `proxy_grpc_stream` answers anything but Ok, ParseFailure or
//! InternalFailure. Envoy answers BadArgument when the cluster does not exist, or when it
//! cannot build a gRPC client for the service, which cannot happen for a plain cluster name;
//! and it reads the name as a serialized `GrpcService` first, which [`crate::config`] rules
//! out by refusing cluster names that could parse as one. That the cluster exists is checked
//! once per VM, before the first stream, with a `dispatch_http_call` (`GET /healthz`), which
//! returns BadArgument for an unknown cluster instead of panicking: a misnamed cluster then
//! costs SERVFAILs and a log line, not the VM. `proxy_grpc_send` answers Ok, BadArgument or NotFound, all
//! of which the SDK returns. After Envoy reported a stream closed, its token is never used
//! again: Envoy frees the stream behind it, and sending, closing or cancelling it would touch
//! freed memory.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::BufferType;
use vmesh_api::forward::{answers, Transport, METHOD, SERVICE};
use vmesh_core::link::{Link, Pending};
use vmesh_core::responder::{forwarded_answer, servfail, Transport as DnsTransport};

use crate::config::Config;
use crate::conn::{self, ConnCore};
use crate::dns::{self, Worker};
use crate::metrics::Counter;

/// Who is waiting for a forwarded query's answer.
pub enum Owner {
    /// A UDP tunnel or TCP connection, and the query's slot in it. Weak: a connection that
    /// closed takes no answer.
    Conn(Weak<RefCell<ConnCore>>, usize),
    /// A DoH request (HTTP stream context id).
    Doh(u32, Rc<Worker>),
}

struct Shared {
    link: Link<Owner>,
    /// The root context that opened the current stream.
    root: u32,
    cluster: String,
    timeout_ms: u64,
    /// Since when (ms) no stream worked: set when a stream closes or does not open, cleared
    /// by a message on the current stream (the shim greets every stream with an empty one;
    /// Envoy's own headers for a stream that never connected are no evidence). Logged once per outage; after
    /// [`SHIM_DOWN_MS`] queries stop waiting for it.
    down_since: Option<u64>,
    /// Envoy accepted a callout to `cluster`, so it exists (see the module doc).
    cluster_known: bool,
    /// Envoy refused the last callout to `cluster`: it does not exist (a configuration
    /// error). Queries get SERVFAIL at once instead of at their deadline until it does.
    cluster_missing: bool,
}

/// How long the shim may be unreachable before queries stop waiting for it: a restart
/// (typically well under a second) loses nothing, a shim that is gone costs clients a
/// SERVFAIL at once rather than the whole deadline.
pub const SHIM_DOWN_MS: u64 = 1000;

impl Shared {
    fn shim_down(&self, now: u64) -> bool {
        self.down_since
            .is_some_and(|t| now.saturating_sub(t) >= SHIM_DOWN_MS)
    }

    /// A stream closed or did not open; says so once per outage.
    fn failed(&mut self, now: u64, what: std::fmt::Arguments<'_>) {
        if self.down_since.is_none() {
            log::warn!("forward stream to the shim {what}; reopening");
            self.down_since = Some(now);
        }
    }

    /// The shim answered on the current stream.
    fn works(&mut self) {
        if self.down_since.take().is_some() {
            log::info!("forward stream to the shim works again");
        }
    }
}

thread_local! {
    static LINK: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// Milliseconds on Envoy's clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .map(|t| crate::liveness::nanos(t) / 1_000_000)
        .unwrap_or(0)
}

/// Called by every DNS root when it is configured: the first sets the VM's link up (with its
/// configuration) and tries to open the stream at once, as the root `root`.
pub fn init(config: &Config, root: u32) {
    LINK.with_borrow_mut(|l| {
        if l.is_none() {
            *l = Some(Shared {
                link: Link::new(0),
                root,
                cluster: config.shim_cluster.clone(),
                timeout_ms: config.forward_timeout_ms,
                down_since: None,
                cluster_known: false,
                cluster_missing: false,
            });
        }
    });
    tick(root);
}

/// Takes a query to forward. Gives the owner back when it cannot wait (no link, or too many
/// in flight); the caller answers SERVFAIL.
pub fn submit(owner: Owner, transport: Transport, query: &[u8]) -> Result<(), Owner> {
    let now = now_ms();
    LINK.with_borrow_mut(|l| match l {
        Some(s) if !s.cluster_missing && !s.shim_down(now) => {
            let deadline = now.saturating_add(s.timeout_ms);
            s.link
                .submit(owner, transport, query.to_vec(), deadline)
                .map(drop)
        }
        _ => Err(owner),
    })
}

/// Sends what was submitted and not yet sent, then makes `caller` the effective context again.
pub fn flush(caller: u32) {
    let now = now_ms();
    let Some((root, token, messages)) = LINK.with_borrow_mut(|l| {
        let s = l.as_mut()?;
        let token = s.link.token()?;
        let messages = s.link.flush(now);
        (!messages.is_empty()).then_some((s.root, token, messages))
    }) else {
        return;
    };
    // The stream is the owner root's: sends must act on it.
    let sent = hostcalls::set_effective_context(root).is_ok()
        && messages
            .iter()
            .all(|m| hostcalls::send_grpc_stream_message(token, Some(m), false).is_ok());
    if !sent {
        // Envoy no longer knows the stream (its root went away): a tick opens another, and
        // the queries go out on it.
        log::warn!("forward stream to the shim lost; reopening");
        LINK.with_borrow_mut(|l| {
            if let Some(s) = l {
                s.link.closed(token, now);
            }
        });
    }
    if caller != root {
        let _ = hostcalls::set_effective_context(caller);
    }
}

/// A DNS root's tick: SERVFAIL for queries past their deadline, a new stream when one is due.
pub fn tick(root: u32) {
    let now = now_ms();
    let expired = LINK
        .with_borrow_mut(|l| {
            l.as_mut().map(|s| {
                // The shim is gone: what waits for it gets SERVFAIL now.
                let until = if s.shim_down(now) { u64::MAX } else { now };
                s.link.expire(until)
            })
        })
        .unwrap_or_default();
    let delivered = !expired.is_empty();
    for p in expired {
        deliver(p, None);
    }
    if delivered {
        let _ = hostcalls::set_effective_context(root);
    }
    let open = LINK.with_borrow(|l| {
        l.as_ref()
            .filter(|s| s.link.wants_stream(now))
            .map(|s| (s.cluster.clone(), s.cluster_known))
    });
    if let Some((cluster, known)) = open {
        let exists = known || cluster_exists(&cluster);
        let opened = if exists {
            hostcalls::open_grpc_stream(&cluster, SERVICE, METHOD, vec![])
        } else {
            Err(proxy_wasm::types::Status::BadArgument)
        };
        LINK.with_borrow_mut(|l| {
            let Some(s) = l else { return };
            s.cluster_missing = !exists;
            match opened {
                Ok(token) => {
                    s.link.opened(token);
                    s.root = root;
                    s.cluster_known = true;
                }
                Err(e) => {
                    s.failed(now, format_args!("(cluster {cluster}) not opened ({e:?})"));
                    s.link.open_failed(now);
                }
            }
        });
    }
    flush(root);
}

/// Whether Envoy knows `cluster`: it accepts a callout to it (whose answer the root ignores).
fn cluster_exists(cluster: &str) -> bool {
    let headers = vec![
        (":method", "GET"),
        (":path", vmesh_api::paths::shim::HEALTHZ),
        (":authority", "vmesh-shim"),
    ];
    hostcalls::dispatch_http_call(cluster, headers, None, vec![], Duration::from_secs(1)).is_ok()
}

/// `on_grpc_stream_message` on the root that owns the stream.
pub fn on_message(root: u32, token: u32, size: usize) {
    let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut ready = Vec::new();
    LINK.with_borrow_mut(|l| {
        let Some(s) = l else { return };
        if s.link.token() == Some(token) {
            s.works();
        }
        for answer in answers(&body) {
            match answer {
                Ok(a) => {
                    if let Some(p) = s.link.answer(token, a.id) {
                        ready.push((p, a.message.to_vec()));
                    }
                }
                Err(_) => {
                    // Which error is not logged: its Display would cost the module ~1 KB.
                    log::warn!("undecodable answers from the shim");
                    break;
                }
            }
        }
    });
    if ready.is_empty() {
        return;
    }
    for (p, message) in ready {
        deliver(p, (!message.is_empty()).then_some(&message[..]));
    }
    let _ = hostcalls::set_effective_context(root);
}

/// `on_grpc_stream_close`: the queries it carried go out again on the next stream.
pub fn on_close(token: u32, status: u32) {
    let now = now_ms();
    LINK.with_borrow_mut(|l| {
        let Some(s) = l else { return };
        if s.link.closed(token, now) {
            s.failed(now, format_args!("closed (gRPC status {status})"));
        }
    });
}

/// Hands a query its answer (`None`: SERVFAIL).
fn deliver(p: Pending<Owner>, answer: Option<&[u8]>) {
    match p.owner {
        Owner::Conn(core, slot) => {
            if let Some(core) = core.upgrade() {
                conn::deliver(&core, slot, answer);
            }
        }
        Owner::Doh(context, worker) => {
            if hostcalls::set_effective_context(context).is_err() {
                return;
            }
            let reply = match answer {
                Some(a) => forwarded_answer(&p.query, a, DnsTransport::Https),
                None => {
                    worker.metrics.add(Counter::ForwardFailed, 1);
                    servfail(&p.query, DnsTransport::Https)
                }
            };
            dns::send_dns_message(&reply.unwrap_or_default());
        }
    }
}
