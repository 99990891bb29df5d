//! UDP and TCP DNS on worker threads: a network filter in front of Envoy's echo filter.
//!
//! proxy-wasm cannot write to a connection, but it can replace what it read: the filter turns
//! the queries in the read buffer into answers and echo writes them back. Two listeners use
//! it, told apart by root id:
//! - `vmesh_dns_udp`: the internal listener udp_proxy tunnels each client address to, as an
//!   HTTP/1.1 POST whose chunked body carries RFC 9297 capsules ([`UdpTunnel`]);
//! - `vmesh_dns_tcp`: the TCP DNS listener itself, RFC 1035 §4.2.2 framing ([`Tunnel`]).
//!
//! Answers leave as soon as they exist. A forwarded query is sent to the shim; its answer
//! comes back in a callout callback, where there is no read buffer to replace unless the last
//! read callback returned Pause: Envoy keeps the buffer handle only then. So while forwards
//! are in flight every read returns Pause (after consuming the bytes), and answers ready
//! meanwhile are pushed to echo by resuming the connection right away. A callout result is
//! written into the (empty) read buffer and sent the same way. Resuming does not end the pause
//! for later callouts: the handle stays until a read returns Continue, which the filter does
//! only when nothing is in flight.
//!
//! udp_proxy ends a tunnel after a short idle time (vm-sidecar.yaml), so that clients asking
//! from a fresh port per lookup do not hold sessions for long. A forward can take longer than
//! that, so while one is in flight the tunnel is listed in [`Worker::keepalive`] and the UDP
//! root's tick writes a [`udp_tunnel::KEEPALIVE`] into it ([`send_keepalives`]), which restarts
//! udp_proxy's idle timer and is dropped by its capsule filter.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType};
use vmesh_core::framing::Framing;
use vmesh_core::names::NameIndex;
use vmesh_core::tunnel::{Counts, ForwardJob, Tunnel};
use vmesh_core::udp_tunnel::{self, UdpTunnel};

use crate::callout;
use crate::dns::Worker;

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

pub struct DnsConn {
    worker: Rc<Worker>,
    /// This connection's context id, the one the root's tick makes effective to write to it.
    id: u32,
    /// Whether `id` is in the worker's keepalive list.
    listed: bool,
    pipe: Pipe,
    /// (callout token, slot of the query it answers). A few at a time, so a list: a hash map
    /// here linked a second hash table implementation (and SipHash) into the module.
    callouts: Vec<(u32, usize)>,
    /// Set once the connection was refused; later bytes are ignored.
    closed: bool,
}

impl DnsConn {
    pub fn new(worker: Rc<Worker>, id: u32, carrier: Carrier) -> Self {
        DnsConn {
            worker,
            id,
            listed: false,
            pipe: match carrier {
                Carrier::UdpTunnel => Pipe::Udp(UdpTunnel::new()),
                Carrier::Tcp => Pipe::Tcp(Tunnel::new(Framing::Tcp)),
            },
            callouts: Vec::new(),
            closed: false,
        }
    }

    fn transport(&self) -> &'static str {
        match self.pipe {
            Pipe::Udp(_) => "udp",
            Pipe::Tcp(_) => "tcp",
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
        // else); the continue runs after this callback returns. A callout answer for a closed
        // connection never gets here: the SDK drops it with the connection's context.
        let _ = hostcalls::resume_downstream();
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
    /// writes). Otherwise the connection is closed. Later bytes are dropped.
    fn refuse(&mut self, buffered: usize, why: &str) -> Action {
        log::debug!("DNS connection refused: {why}");
        self.closed = true;
        self.callouts.clear();
        let rejection = match &self.pipe {
            Pipe::Udp(p) => p.rejection(),
            Pipe::Tcp(_) => None,
        };
        match rejection {
            Some(reply) => Self::write(buffered, reply),
            None => {
                Self::write(buffered, &[]);
                // A live connection's context gets Ok (the SDK panics on anything else).
                let _ = hostcalls::close_downstream();
            }
        }
        self.sync_keepalive();
        Action::Continue
    }
}

impl Drop for DnsConn {
    /// A closed connection's context goes away; the tick must not write to its id again.
    fn drop(&mut self) {
        self.closed = true;
        self.sync_keepalive();
    }
}

/// Writes a keepalive into every UDP tunnel of `worker` that has a forward in flight, then
/// makes the root (`root_id`) the effective context again. Called from the UDP root's tick.
///
/// Each listed connection's last read returned Pause (it is listed only while a forward is in
/// flight, and then every read pauses), so Envoy still holds its read buffer for the filter, as
/// for a callout answer: the keepalive goes into that buffer and resuming hands it to echo.
/// That invariant is load-bearing: the SDK's `set_buffer` panics on any status but Ok, and
/// Envoy answers BadArgument for a connection whose buffer it no longer holds. The context must
/// be made effective first, since hostcalls act on the effective context; a connection that is
/// gone (Envoy refuses its id) is skipped, though its context unlists itself when dropped.
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
        match hostcalls::set_buffer(BufferType::DownstreamData, 0, 0, udp_tunnel::KEEPALIVE) {
            Ok(()) => DnsConn::push(),
            Err(e) => log::warn!("keepalive not written to connection {id}: {e:?}"),
        }
    }
    if let Err(e) = hostcalls::set_effective_context(root_id) {
        log::warn!("keepalive: root context {root_id} not restored: {e:?}");
    }
}

impl Context for DnsConn {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(at) = self.callouts.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, slot) = self.callouts.swap_remove(at);
        let reply = callout::response(headers, body_size);
        let body = (reply.status == Some(200)).then_some(reply.body);
        self.pipe.complete(slot, body.as_deref());
        let out = self.pipe.take_output();
        if !out.is_empty() {
            // Every read since the forward left returned Pause after emptying the buffer.
            Self::write(0, &out);
            Self::push();
        }
        self.flush_counts();
        self.sync_keepalive();
    }
}

impl StreamContext for DnsConn {
    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        if self.closed {
            Self::write(data_size, &[]);
            return Action::Continue;
        }
        let bytes = hostcalls::get_buffer(BufferType::DownstreamData, 0, data_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let worker = Rc::clone(&self.worker);
        let table = worker.table();
        let mut rotation = worker.rotation.get();
        let domain = &worker.config.cluster_domain;
        let fed = self
            .pipe
            .feed(&bytes, table.as_deref(), domain, &mut rotation);
        worker.rotation.set(rotation);
        let jobs = match fed {
            Ok(jobs) => jobs,
            Err(why) => return self.refuse(data_size, &why),
        };
        let transport = self.transport();
        for job in jobs {
            match callout::forward(&worker.config, &job.query, Some(transport)) {
                Some(token) => self.callouts.push((token, job.slot)),
                None => self.pipe.complete(job.slot, None),
            }
        }
        let out = self.pipe.take_output();
        Self::write(data_size, &out);
        self.flush_counts();
        self.sync_keepalive();
        if !self.pipe.is_waiting() {
            return Action::Continue;
        }
        // Keep the buffer handle for the callouts; what is ready goes out now all the same.
        if !out.is_empty() {
            Self::push();
        }
        Action::Pause
    }
}
