//! The `vmesh_gateway` root: a network filter on an east-west gateway's 15443 listener.
//!
//! Envoy's TLS inspector (a listener filter) has read the client's SNI by the time
//! `on_new_connection` runs; [`vmesh_core::gateway::route`] turns it into an endpoint of the
//! gateway's own network, and the decision goes out as `wasm.*` filter state for
//! `set_filter_state` and `tcp_proxy`, as on the VM's outbound listener. The client's TLS is
//! passed through untouched (Istio's `AUTO_PASSTHROUGH`). A connection the gateway cannot place
//! goes to the endpoint-less cluster, which closes it at once, and is counted by reason.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, MetricType};
use vmesh_api::traffic::{clusters, state};
use vmesh_core::gateway::{route, Refusal};

use crate::routes::WorkerRoutes;

/// The gateway's counters (Envoy shows them as `wasmcustom.NAME`).
const CX_TOTAL: &str = "vmesh_gateway_cx_total";
const CX_ROUTED: &str = "vmesh_gateway_cx_routed";
/// Refused connections, one counter per [`Refusal`]: `vmesh_gateway_refused_REASON`.
const REFUSALS: [Refusal; 4] = [
    Refusal::UnknownSni,
    Refusal::NoTable,
    Refusal::UnknownService,
    Refusal::NoEndpoint,
];

pub struct GatewayWorker {
    pub routes: RefCell<WorkerRoutes>,
    total: Option<u32>,
    routed: Option<u32>,
    refused: [Option<u32>; 4],
    rand: Cell<u64>,
}

fn counter(name: &str) -> Option<u32> {
    match hostcalls::define_metric(MetricType::Counter, name) {
        Ok(id) => Some(id),
        Err(e) => {
            log::warn!("metric {name} not defined: {e:?}");
            None
        }
    }
}

fn bump(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

impl GatewayWorker {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            seed = crate::liveness::nanos(
                hostcalls::get_current_time().unwrap_or(std::time::UNIX_EPOCH),
            )
            .to_le_bytes();
        }
        GatewayWorker {
            routes: RefCell::new(WorkerRoutes::default()),
            total: counter(CX_TOTAL),
            routed: counter(CX_ROUTED),
            refused: REFUSALS.map(|r| counter(&format!("vmesh_gateway_refused_{}", r.as_str()))),
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
}

impl Default for GatewayWorker {
    fn default() -> Self {
        Self::new()
    }
}

pub struct GatewayConn {
    worker: Rc<GatewayWorker>,
}

impl GatewayConn {
    pub fn new(worker: Rc<GatewayWorker>) -> Self {
        GatewayConn { worker }
    }
}

impl Context for GatewayConn {}

impl StreamContext for GatewayConn {
    fn on_new_connection(&mut self) -> Action {
        let w = &self.worker;
        bump(w.total);
        let sni = hostcalls::get_property(vec!["connection", "requested_server_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let index = w.routes.borrow().get();
        let (cluster, upstream, host, port) = match route(index.as_deref(), &sni, w.next_rand()) {
            Ok(d) => {
                bump(w.routed);
                (d.cluster, d.upstream, d.dynamic_host, d.dynamic_port)
            }
            Err(r) => {
                log::debug!("gateway: {sni:?} refused: {}", r.as_str());
                if let Some(i) = REFUSALS.iter().position(|x| *x == r) {
                    bump(w.refused.get(i).copied().flatten());
                }
                (clusters::NO_ENDPOINT, String::new(), String::new(), 0)
            }
        };
        let port = port.to_string();
        // Always every value, so the copies `set_filter_state` makes never read a missing one.
        for (name, value) in [
            (state::CLUSTER, cluster),
            (state::UPSTREAM, upstream.as_str()),
            (state::DYNAMIC_HOST, host.as_str()),
            (state::DYNAMIC_PORT, port.as_str()),
        ] {
            if let Err(e) = hostcalls::set_property(vec![name], Some(value.as_bytes())) {
                log::warn!("filter state {name} not set: {e:?}");
            }
        }
        Action::Continue
    }
}
