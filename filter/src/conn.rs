//! UDP and TCP DNS on worker threads: a network filter in front of Envoy's echo filter.
//!
//! proxy-wasm cannot write to a connection, but it can replace what it read: the filter turns
//! the queries in the read buffer into answers and echo writes them back. Two listeners use
//! it, told apart by root id:
//! - `vmesh_dns_udp`: the internal listener udp_proxy tunnels each client address to, as an
//!   HTTP/1.1 POST whose chunked body carries RFC 9297 capsules ([`UdpTunnel`]);
//! - `vmesh_dns_tcp`: the TCP DNS listener itself, RFC 1035 §4.2.2 framing ([`Tunnel`]).
//!
//! A forwarded query pauses the connection: Envoy keeps the read bytes (queries) in its buffer
//! while the shim answers, later bytes pile up behind them, and when the last forward returns
//! the whole buffer is replaced with the answers in query order and reading resumes.

use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType};
use vmesh_core::framing::Framing;
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

pub struct DnsConn {
    worker: Rc<Worker>,
    pipe: Pipe,
    /// Callout token -> slot of the query it answers.
    callouts: HashMap<u32, usize>,
    /// Whether Envoy holds the read buffer for us (we returned Pause). While it does, each
    /// callback sees the whole held buffer, of which `parsed` bytes are already fed.
    held: bool,
    parsed: usize,
    /// Set once the connection was refused; later bytes are ignored.
    closed: bool,
}

impl DnsConn {
    pub fn new(worker: Rc<Worker>, carrier: Carrier) -> Self {
        DnsConn {
            worker,
            pipe: match carrier {
                Carrier::UdpTunnel => Pipe::Udp(UdpTunnel::new()),
                Carrier::Tcp => Pipe::Tcp(Tunnel::new(Framing::Tcp)),
            },
            callouts: HashMap::new(),
            held: false,
            parsed: 0,
            closed: false,
        }
    }

    fn transport(&self) -> &'static str {
        match self.pipe {
            Pipe::Udp(_) => "udp",
            Pipe::Tcp(_) => "tcp",
        }
    }

    fn is_waiting(&self) -> bool {
        match &self.pipe {
            Pipe::Udp(p) => p.is_waiting(),
            Pipe::Tcp(p) => p.is_waiting(),
        }
    }

    fn complete(&mut self, slot: usize, answer: Option<&[u8]>) {
        match &mut self.pipe {
            Pipe::Udp(p) => p.complete(slot, answer),
            Pipe::Tcp(p) => p.complete(slot, answer),
        }
    }

    /// Replaces the `buffered` read bytes (the queries seen so far) with the answers.
    fn release(&mut self, buffered: usize) {
        let out = match &mut self.pipe {
            Pipe::Udp(p) => p.take_output(),
            Pipe::Tcp(p) => p.take_output(),
        };
        if let Err(e) = hostcalls::set_buffer(BufferType::DownstreamData, 0, buffered, &out) {
            log::warn!("answers not written to the connection: {e:?}");
        }
        self.held = false;
        self.parsed = 0;
    }

    fn flush_counts(&mut self) {
        let counts = match &mut self.pipe {
            Pipe::Udp(p) => p.take_counts(),
            Pipe::Tcp(p) => p.take_counts(),
        };
        if counts != Counts::default() {
            self.worker.metrics.add_counts(&counts);
        }
    }

    /// Refuses a connection that does not carry what this listener expects.
    fn refuse(&mut self, buffered: usize, why: &str) -> Action {
        log::debug!("DNS connection refused: {why}");
        let reply = match self.pipe {
            Pipe::Udp(_) => udp_tunnel::REJECTION,
            Pipe::Tcp(_) => &[],
        };
        let _ = hostcalls::set_buffer(BufferType::DownstreamData, 0, buffered, reply);
        self.closed = true;
        self.callouts.clear();
        // Envoy answers Ok for a live connection, and a context only exists while its
        // connection does (the SDK would panic on any other status).
        let _ = hostcalls::close_downstream();
        Action::Continue
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
        let Some(slot) = self.callouts.remove(&token) else {
            return;
        };
        let reply = callout::response(headers, body_size);
        let body = (reply.status == Some(200)).then_some(reply.body);
        self.complete(slot, body.as_deref());
        if self.held && !self.is_waiting() {
            self.release(self.parsed);
            // Callouts of a closed connection are cancelled with it, so the connection is
            // live here and Envoy answers Ok (the SDK would panic on any other status).
            let _ = hostcalls::resume_downstream();
        }
        self.flush_counts();
    }
}

impl StreamContext for DnsConn {
    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        if self.closed {
            return Action::Continue;
        }
        let start = if self.held { self.parsed } else { 0 };
        let new = data_size.saturating_sub(start);
        let bytes = if new == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::DownstreamData, start, new)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let worker = Rc::clone(&self.worker);
        let table = worker.table();
        let mut rotation = worker.rotation.get();
        let domain = &worker.config.cluster_domain;
        let fed: Result<Vec<ForwardJob>, String> = match &mut self.pipe {
            Pipe::Udp(p) => p
                .feed(&bytes, table.as_deref(), domain, &mut rotation)
                .map_err(|e| e.to_string()),
            Pipe::Tcp(p) => p
                .feed(&bytes, table.as_deref(), domain, &mut rotation)
                .map_err(|e| e.to_string()),
        };
        worker.rotation.set(rotation);
        let jobs = match fed {
            Ok(jobs) => jobs,
            Err(why) => return self.refuse(data_size, &why),
        };
        let transport = self.transport();
        for job in jobs {
            match callout::forward(&worker.config, &job.query, Some(transport)) {
                Some(token) => {
                    self.callouts.insert(token, job.slot);
                }
                None => self.complete(job.slot, None),
            }
        }
        let action = if self.is_waiting() {
            self.held = true;
            self.parsed = data_size;
            Action::Pause
        } else {
            self.release(data_size);
            Action::Continue
        };
        self.flush_counts();
        action
    }
}
