//! UDP and TCP DNS on worker threads: a network filter in front of Envoy's echo filter.
//!
//! proxy-wasm cannot write to a connection, but it can replace what it read: the filter turns
//! the queries in the read buffer into answers and echo writes them back. Two listeners use
//! it, told apart by root id:
//! - `vmesh_dns_udp`: the internal listener udp_proxy tunnels each client address to, as an
//!   HTTP/1.1 POST whose chunked body carries RFC 9297 capsules ([`UdpTunnel`]);
//! - `vmesh_dns_tcp`: the TCP DNS listener itself, RFC 1035 §4.2.2 framing ([`Tunnel`]).
//!
//! Answers leave as soon as they exist. A forwarded query goes to the shim on the worker's
//! stream ([`crate::stream`]); its answer comes back in a callback of the root that owns the
//! stream, where there is no read buffer to replace unless the connection's last read callback
//! returned Pause: Envoy keeps the buffer handle only then. So while forwards are in flight
//! every read returns Pause (after consuming the bytes), and answers ready meanwhile are pushed
//! to echo by resuming the connection right away. A forward's answer is written into the
//! (empty) read buffer and sent the same way ([`deliver`]). Resuming does not end the pause
//! for later answers: the handle stays until a read returns Continue, which the filter does
//! only when nothing is in flight.
//!
//! udp_proxy ends a tunnel after a short idle time (vm-sidecar.yaml), so that clients asking
//! from a fresh port per lookup do not hold sessions for long. A forward can take longer than
//! that, so while one is in flight the tunnel is listed in [`Worker::keepalive`] and the UDP
//! root's tick writes a [`udp_tunnel::KEEPALIVE`] into it ([`send_keepalives`]), which restarts
//! udp_proxy's idle timer and is dropped by its capsule filter.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType};
use vmesh_api::forward::Transport;
use vmesh_core::framing::Framing;
use vmesh_core::names::NameIndex;
use vmesh_core::tunnel::{Counts, ForwardJob, Tunnel};
use vmesh_core::udp_tunnel::{self, UdpTunnel};

use crate::dns::Worker;
use crate::stream::{self, Owner};

/// Which bytes a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    UdpTunnel,
    Tcp,
}

enum Pipe {
    Udp(UdpTunnel),
    Tcp(Tunnel),
}

/// The same operations on either carrier.
impl Pipe {
    fn feed(
        &mut self,
        bytes: &[u8],
        table: Option<&NameIndex>,
        domain: &str,
        rotation: &mut u32,
    ) -> Result<Vec<ForwardJob>, String> {
        match self {
            Pipe::Udp(p) => p
                .feed(bytes, table, domain, rotation)
                .map_err(|e| e.to_string()),
            Pipe::Tcp(p) => p
                .feed(bytes, table, domain, rotation)
                .map_err(|e| e.to_string()),
        }
    }

    fn complete(&mut self, slot: usize, answer: Option<&[u8]>) {
        match self {
            Pipe::Udp(p) => p.complete(slot, answer),
            Pipe::Tcp(p) => p.complete(slot, answer),
        }
    }

    fn is_waiting(&self) -> bool {
        match self {
            Pipe::Udp(p) => p.is_waiting(),
            Pipe::Tcp(p) => p.is_waiting(),
        }
    }

    fn take_output(&mut self) -> Vec<u8> {
        match self {
            Pipe::Udp(p) => p.take_output(),
            Pipe::Tcp(p) => p.take_output(),
        }
    }

    fn take_counts(&mut self) -> Counts {
        match self {
            Pipe::Udp(p) => p.take_counts(),
            Pipe::Tcp(p) => p.take_counts(),
        }
    }

    /// Only udp_proxy's tunnels expire when idle; TCP connections do not.
    fn needs_keepalive(&self) -> bool {
        match self {
            Pipe::Udp(p) => p.keepalive().is_some(),
            Pipe::Tcp(_) => false,
        }
    }
}

/// A connection's state. The connection's context owns it; forwarded queries waiting in the
/// worker's stream hold it weakly, so the root that owns the stream can write their answers.
pub struct ConnCore {
    worker: Rc<Worker>,
    /// This connection's context id, the one a root makes effective to write to it.
    id: u32,
    /// Whether `id` is in the worker's keepalive list.
    listed: bool,
    pipe: Pipe,
    /// Set once the connection was refused or ended; later bytes and answers are ignored.
    closed: bool,
}

pub struct DnsConn {
    core: Rc<RefCell<ConnCore>>,
}

impl DnsConn {
    pub fn new(worker: Rc<Worker>, id: u32, carrier: Carrier) -> Self {
        let core = ConnCore {
            worker,
            id,
            listed: false,
            pipe: match carrier {
                Carrier::UdpTunnel => Pipe::Udp(UdpTunnel::new()),
                Carrier::Tcp => Pipe::Tcp(Tunnel::new(Framing::Tcp)),
            },
            closed: false,
        };
        DnsConn {
            core: Rc::new(RefCell::new(core)),
        }
    }
}

/// Replaces the first `replaced` bytes of the read buffer with `out`.
fn write(replaced: usize, out: &[u8]) {
    if let Err(e) = hostcalls::set_buffer(BufferType::DownstreamData, 0, replaced, out) {
        log::warn!("answers not written to the connection: {e:?}");
    }
}

/// Sends what is in the read buffer on to echo now, while the read stays paused.
fn push() {
    // Envoy 1.40 answers Ok for Downstream in any state (the SDK would panic on anything
    // else); the continue runs after this callback returns.
    let _ = hostcalls::resume_downstream();
}

impl ConnCore {
    fn transport(&self) -> Transport {
        match self.pipe {
            Pipe::Udp(_) => Transport::Udp,
            Pipe::Tcp(_) => Transport::Tcp,
        }
    }

    /// Lists or unlists the connection for keepalives after anything changed what it owes.
    fn sync_keepalive(&mut self) {
        let wanted = !self.closed && self.pipe.needs_keepalive();
        if wanted == self.listed {
            return;
        }
        let mut list = self.worker.keepalive.borrow_mut();
        if wanted {
            list.push(self.id);
        } else if let Some(at) = list.iter().position(|&id| id == self.id) {
            list.swap_remove(at);
        }
        self.listed = wanted;
    }

    fn flush_counts(&mut self) {
        let counts = self.pipe.take_counts();
        if counts != Counts::default() {
            self.worker.metrics.add_counts(&counts);
        }
    }

    /// Refuses a connection that does not carry what this listener expects. A tunnel whose
    /// response has not begun gets a 400 with `connection: close`, which makes udp_proxy's
    /// codec close it (closing it from here would discard the 400: Envoy closes before echo
    /// writes). Otherwise the connection is closed. Later bytes are dropped, and so are the
    /// answers of its forwards.
    fn refuse(&mut self, buffered: usize, why: &str) -> Action {
        log::debug!("DNS connection refused: {why}");
        self.closed = true;
        let rejection = match &self.pipe {
            Pipe::Udp(p) => p.rejection(),
            Pipe::Tcp(_) => None,
        };
        match rejection {
            Some(reply) => write(buffered, reply),
            None => {
                write(buffered, &[]);
                // A live connection's context gets Ok (the SDK panics on anything else).
                let _ = hostcalls::close_downstream();
            }
        }
        self.sync_keepalive();
        Action::Continue
    }
}

thread_local! {
    /// Connections written to in the current root callback, with the bytes written: see
    /// [`emit`].
    static EMITTED: RefCell<Vec<(u32, usize)>> = const { RefCell::new(Vec::new()) };
}

/// Starts a root callback that may write to connections ([`emit`]).
pub fn begin_root_callback() {
    EMITTED.with_borrow_mut(Vec::clear);
}

/// Writes `out` into connection `id`'s paused read buffer from a root callback and has echo
/// send it; `id` must be the effective context.
///
/// Each connection is resumed at most once per root callback: Envoy runs a resume
/// (`continueReading`) after the VM call returns, and two queued for one connection run nested
/// (the first one's write calls back into the VM, whose return runs the second), which crashed
/// Envoy 1.40 (a segfault) when one stream message carried several answers for one tunnel. So
/// a second write in the same callback is appended behind the first (the buffer is empty when
/// the callback starts: echo took everything when the last resume ran), and goes out with it.
fn emit(id: u32, out: &[u8]) {
    let written = EMITTED.with_borrow(|e| e.iter().find(|(c, _)| *c == id).map(|(_, n)| *n));
    match written {
        None => {
            if hostcalls::set_buffer(BufferType::DownstreamData, 0, 0, out).is_ok() {
                push();
                EMITTED.with_borrow_mut(|e| e.push((id, out.len())));
            } else {
                log::warn!("answers not written to connection {id}");
            }
        }
        Some(n) => {
            if hostcalls::set_buffer(BufferType::DownstreamData, n, 0, out).is_ok() {
                EMITTED.with_borrow_mut(|e| {
                    if let Some(entry) = e.iter_mut().find(|(c, _)| *c == id) {
                        entry.1 += out.len();
                    }
                });
            } else {
                log::warn!("answers not written to connection {id}");
            }
        }
    }
}

/// Writes a forwarded query's answer (`None`: SERVFAIL) into its connection. Called from the
/// root that owns the worker's stream, in its callbacks; leaves the connection the effective
/// context (the caller restores its own).
///
/// While a forward is in flight every read of the connection returned Pause after emptying
/// the buffer, so Envoy still holds the read buffer for the filter: the answer goes into it
/// and resuming hands it to echo. That invariant is load-bearing: the SDK's `set_buffer`
/// panics on any status but Ok, and Envoy answers BadArgument for a connection whose buffer
/// it no longer holds. A connection that is gone is skipped (its context is, too: the weak
/// reference in the stream's pending query no longer upgrades).
pub fn deliver(core: &Rc<RefCell<ConnCore>>, slot: usize, answer: Option<&[u8]>) {
    let (id, out) = {
        let mut c = core.borrow_mut();
        if c.closed {
            return;
        }
        c.pipe.complete(slot, answer);
        let out = c.pipe.take_output();
        c.flush_counts();
        c.sync_keepalive();
        (c.id, out)
    };
    if out.is_empty() || hostcalls::set_effective_context(id).is_err() {
        return;
    }
    emit(id, &out);
}

impl Drop for DnsConn {
    /// A closed connection's context goes away; the tick must not write to its id again.
    fn drop(&mut self) {
        let mut c = self.core.borrow_mut();
        c.closed = true;
        c.sync_keepalive();
    }
}

/// Writes a keepalive into every UDP tunnel of `worker` that has a forward in flight, then
/// makes the root (`root_id`) the effective context again. Called from the UDP root's tick.
///
/// Each listed connection's last read returned Pause (it is listed only while a forward is in
/// flight, and then every read pauses), so Envoy still holds its read buffer for the filter,
/// as for a forward's answer ([`deliver`]). The context must be made effective first, since
/// hostcalls act on the effective context; a connection that is gone (Envoy refuses its id)
/// is skipped, though its context unlists itself when dropped.
pub fn send_keepalives(worker: &Worker, root_id: u32) {
    // A copy: no borrow may be held across host calls.
    let ids = worker.keepalive.borrow().clone();
    if ids.is_empty() {
        return;
    }
    for id in ids {
        if hostcalls::set_effective_context(id).is_err() {
            log::debug!("keepalive: connection {id} is gone");
            continue;
        }
        emit(id, udp_tunnel::KEEPALIVE);
    }
    if let Err(e) = hostcalls::set_effective_context(root_id) {
        log::warn!("keepalive: root context {root_id} not restored: {e:?}");
    }
}

impl Context for DnsConn {}

impl StreamContext for DnsConn {
    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let core = Rc::clone(&self.core);
        let mut c = core.borrow_mut();
        if c.closed {
            write(data_size, &[]);
            return Action::Continue;
        }
        let bytes = hostcalls::get_buffer(BufferType::DownstreamData, 0, data_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let worker = Rc::clone(&c.worker);
        let table = worker.table();
        let mut rotation = worker.rotation.get();
        let domain = &worker.config.cluster_domain;
        let fed = c.pipe.feed(&bytes, table.as_deref(), domain, &mut rotation);
        worker.rotation.set(rotation);
        let jobs = match fed {
            Ok(jobs) => jobs,
            Err(why) => return c.refuse(data_size, &why),
        };
        let transport = c.transport();
        let forwarded = !jobs.is_empty();
        for job in jobs {
            let owner = Owner::Conn(Rc::downgrade(&self.core), job.slot);
            if stream::submit(owner, transport, &job.query).is_err() {
                c.pipe.complete(job.slot, None);
            }
        }
        let out = c.pipe.take_output();
        write(data_size, &out);
        c.flush_counts();
        c.sync_keepalive();
        let (id, waiting) = (c.id, c.pipe.is_waiting());
        drop(c);
        if forwarded {
            stream::flush(id);
        }
        if !waiting {
            return Action::Continue;
        }
        // Keep the buffer handle for the answers; what is ready goes out now all the same.
        if !out.is_empty() {
            push();
        }
        Action::Pause
    }
}
