//! The `vmesh_outbound` root: a network filter on the VM's outbound listener (15001).
//!
//! In `on_new_connection` it reads the connection's original destination
//! (`destination.address`, restored by Envoy's `original_dst` listener filter), asks the
//! routing index (`vmesh_core::routes`) where it goes, and writes the decision as `wasm.*`
//! filter state; `envoy.filters.network.set_filter_state`, next in the chain, copies it into
//! what `tcp_proxy` and the upstream TLS read (`vmesh_api::traffic`). It always writes a
//! decision, pass-through to the original destination when nothing else applies (no table
//! yet, unknown destination), so the copies never see a missing value.
//!
//! At the end of a connection ([`StreamContext::on_log`]) it counts it: per service port and
//! in total, with bytes, and as failed when no upstream connection was made.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, MetricType};
use vmesh_api::traffic::{clusters, outbound_stat, state};
use vmesh_core::routes::Decision;

use crate::metrics::{Counter, Metrics};
use crate::routes::WorkerRoutes;

/// Service ports with stats of their own, per VM: stats live as long as Envoy, so a table
/// with many services (or one that keeps changing) must not grow them without end. Past it,
/// connections count in the totals only.
pub const MAX_SERVICE_STATS: usize = 128;

pub struct OutboundWorker {
    pub metrics: Metrics,
    pub routes: RefCell<WorkerRoutes>,
    /// (`host_port`, ids); searched linearly: at most [`MAX_SERVICE_STATS`], and a map would
    /// cost the `.wasm` more code than the search costs time.
    stats: RefCell<Vec<(String, ServiceStats)>>,
    rand: Cell<u64>,
}

/// One service port's metric ids: connections, failed, bytes sent, bytes received.
#[derive(Debug, Clone, Copy)]
struct ServiceStats([Option<u32>; 4]);

const SERVICE_STATS: [&str; 4] = ["cx_total", "cx_failed", "bytes_sent", "bytes_received"];

impl OutboundWorker {
    pub fn new(metrics: Metrics) -> Self {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            seed = crate::liveness::nanos(
                hostcalls::get_current_time().unwrap_or(std::time::UNIX_EPOCH),
            )
            .to_le_bytes();
        }
        OutboundWorker {
            metrics,
            routes: RefCell::new(WorkerRoutes::default()),
            stats: RefCell::new(Vec::new()),
            // xorshift must not start at 0.
            rand: Cell::new(u64::from_le_bytes(seed) | 1),
        }
    }

    /// xorshift64*: the endpoint choice needs spread, not secrecy.
    fn next_rand(&self) -> u64 {
        let mut x = self.rand.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rand.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn service_stats(&self, host: &str, port: u16) -> Option<ServiceStats> {
        let key = format!("{host}_{port}");
        let mut stats = self.stats.borrow_mut();
        if let Some((_, s)) = stats.iter().find(|(k, _)| *k == key) {
            return Some(*s);
        }
        if stats.len() >= MAX_SERVICE_STATS {
            return None;
        }
        let mut ids = [None; 4];
        for (slot, what) in ids.iter_mut().zip(SERVICE_STATS) {
            let name = outbound_stat(host, port, what);
            match hostcalls::define_metric(MetricType::Counter, &name) {
                Ok(id) => *slot = Some(id),
                Err(e) => log::warn!("metric {name} not defined: {e:?}"),
            }
        }
        let s = ServiceStats(ids);
        stats.push((key, s));
        Some(s)
    }
}

pub struct OutboundConn {
    worker: Rc<OutboundWorker>,
    service: Option<ServiceStats>,
    refused: bool,
    sent: u64,
    received: u64,
}

impl OutboundConn {
    pub fn new(worker: Rc<OutboundWorker>) -> Self {
        OutboundConn {
            worker,
            service: None,
            refused: false,
            sent: 0,
            received: 0,
        }
    }

    fn decide(&mut self) -> Decision {
        let dst = hostcalls::get_property(vec!["destination", "address"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<SocketAddr>().ok());
        let Some(dst) = dst else {
            // Envoy always knows a TCP connection's local address; without it there is
            // nowhere to pass through to.
            log::warn!("outbound connection without a destination address: refused");
            return Decision {
                cluster: clusters::NO_ENDPOINT,
                upstream: String::new(),
                dynamic_host: String::new(),
                dynamic_port: 0,
                sni: String::new(),
                san: String::new(),
                service: None,
            };
        };
        // A version check (one small shared-data read) per connection rather than only on
        // the tick: a connection right after the agent published a table is routed by it.
        // Before any table, connections pass through, which on a loopback test bed would
        // dial the listener itself; tests wait for the publication, never for a tick.
        self.worker.routes.borrow_mut().refresh();
        let Some(index) = self.worker.routes.borrow().get() else {
            return Decision::passthrough(dst);
        };
        let decision = index.outbound(dst, self.worker.next_rand());
        if let Some((host, port)) = decision.service.and_then(|id| index.service_port(id)) {
            self.service = self.worker.service_stats(host, port);
        }
        decision
    }
}

impl Context for OutboundConn {}

/// Envoy's response flags that mean tcp_proxy never got an upstream connection: no healthy
/// upstream (UH), connect failure (UF; a failed TLS handshake or SAN check included),
/// overflow (UO), retry limit (URX), no such cluster (NC). Values from Envoy's
/// `StreamInfo::ResponseFlag`.
const NOT_CONNECTED: u64 = 0x2 | 0x20 | 0x80 | 0x8000 | 0x0100_0000;

/// Whether the connection ended without an upstream connection. Envoy records the upstream
/// host before connecting (so `upstream.address` alone says nothing); the response flags and
/// the transport failure reason say how it went.
fn upstream_failed() -> bool {
    let flags = hostcalls::get_property(vec!["response", "flags"])
        .ok()
        .flatten()
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let tls_failed = matches!(
        hostcalls::get_property(vec!["upstream", "transport_failure_reason"]),
        Ok(Some(reason)) if !reason.is_empty()
    );
    let connected = matches!(
        hostcalls::get_property(vec!["upstream", "address"]),
        Ok(Some(a)) if !a.is_empty()
    );
    flags & NOT_CONNECTED != 0 || tls_failed || !connected
}

impl StreamContext for OutboundConn {
    fn on_new_connection(&mut self) -> Action {
        let d = self.decide();
        self.refused = d.cluster == clusters::NO_ENDPOINT;
        let port = d.dynamic_port.to_string();
        for (name, value) in [
            (state::CLUSTER, d.cluster),
            (state::UPSTREAM, d.upstream.as_str()),
            (state::SNI, d.sni.as_str()),
            (state::SAN, d.san.as_str()),
            (state::DYNAMIC_HOST, d.dynamic_host.as_str()),
            (state::DYNAMIC_PORT, port.as_str()),
        ] {
            if let Err(e) = hostcalls::set_property(vec![name], Some(value.as_bytes())) {
                log::warn!("filter state {name} not set: {e:?}");
            }
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.sent = self.sent.saturating_add(data_size as u64);
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.received = self.received.saturating_add(data_size as u64);
        Action::Continue
    }

    fn on_log(&mut self) {
        let failed = self.refused || upstream_failed();
        let m = &self.worker.metrics;
        m.add(Counter::OutboundCx, 1);
        m.add(Counter::OutboundFailed, u64::from(failed));
        m.add(Counter::OutboundBytesSent, self.sent);
        m.add(Counter::OutboundBytesReceived, self.received);
        if let Some(ServiceStats(ids)) = self.service {
            for (id, n) in ids
                .iter()
                .zip([1, u64::from(failed), self.sent, self.received])
            {
                if let (Some(id), true) = (id, n > 0) {
                    let _ = hostcalls::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }
}
