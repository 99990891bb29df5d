//! vmesh_filter.wasm: the vmesh data plane inside Envoy.
//!
//! One module, several roots, chosen by the plugin's `root_id`:
//! - `vmesh_agent` (bootstrap singleton, `envoy.bootstrap.wasm`): fetches the name table from
//!   the shim and publishes it to every worker ([`agent`], [`table`]); reports Envoy's
//!   readiness, the data path's counters and worker liveness ([`liveness`]) to the shim, and
//!   runs the probe the shim names through Envoy;
//! - `vmesh_dns_udp` / `vmesh_dns_tcp` (network filters in front of echo): answer UDP (through
//!   udp_proxy's tunnel) and TCP DNS from the table and forward the rest through the shim
//!   ([`conn`]), on one gRPC stream per worker that the DNS roots of a VM share ([`stream`]);
//! - `vmesh_dns` (HTTP filter on the DoH listener): the same for DNS over HTTPS ([`dns`]);
//! - `vmesh_outbound` (network filter on the outbound listener, 15001): routes each
//!   connection by its original destination from the routing table the agent publishes
//!   ([`outbound`], [`routes`]);
//! - `vmesh_gateway` (network filter on an east-west gateway's 15443 listener): routes each
//!   connection by its SNI to an endpoint of the gateway's own network, TLS passed through
//!   ([`gateway`]).
//!
//! Decisions live in `vmesh-core` and are tested natively; this crate moves bytes between
//! Envoy and them. A panic here would kill the worker's VM for every plugin, so host results
//! are handled, never unwrapped.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod agent;
pub mod callout;
pub mod config;
pub mod conn;
pub mod dns;
pub mod gateway;
pub mod liveness;
pub mod metrics;
pub mod outbound;
pub mod published;
pub mod routes;
pub mod stream;
pub mod table;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::agent::Agent;
use crate::config::{Config, Role};
use crate::conn::{Carrier, DnsConn};
use crate::dns::{DnsStream, Worker};
use crate::gateway::{GatewayConn, GatewayWorker};
use crate::metrics::Metrics;
use crate::outbound::{OutboundConn, OutboundWorker};
use crate::table::WorkerTable;

const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("VMESH_GIT_HASH"));

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root { id, role: RootRole::Unconfigured })
    });
}}

/// A root context: its own context id (the UDP root acts on its connections' contexts from
/// its tick and must return to its own afterwards) and what it runs.
struct Root {
    id: u32,
    role: RootRole,
}

enum RootRole {
    Unconfigured,
    Agent(Box<Agent>),
    /// DNS over HTTPS (an HTTP filter).
    Dns(Rc<Worker>),
    /// UDP or TCP DNS (a network filter).
    Conn(Rc<Worker>, Carrier),
    /// The outbound listener (a network filter).
    Outbound(Rc<OutboundWorker>),
    /// An east-west gateway's 15443 listener (a network filter).
    Gateway(Rc<GatewayWorker>),
}

impl Root {
    fn configure(&mut self) -> Result<(), String> {
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let role = Role::from_root_id(&root_id).map_err(|e| e.to_string())?;
        let bytes = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let config = Config::parse(&bytes).map_err(|e| e.to_string())?;
        proxy_wasm::set_log_level(match config.log_level {
            config::LogLevel::Trace => LogLevel::Trace,
            config::LogLevel::Debug => LogLevel::Debug,
            config::LogLevel::Info => LogLevel::Info,
            config::LogLevel::Warn => LogLevel::Warn,
            config::LogLevel::Error => LogLevel::Error,
        });
        let metrics = Metrics::define();
        self.role = match role {
            Role::Agent => RootRole::Agent(Box::new(Agent::new(config, metrics))),
            Role::Gateway => {
                let worker = GatewayWorker::new();
                worker.routes.borrow_mut().refresh();
                if let Err(e) =
                    hostcalls::set_tick_period(Duration::from_millis(config.table_check_ms))
                {
                    return Err(format!("cannot start the tick: {e:?}"));
                }
                RootRole::Gateway(Rc::new(worker))
            }
            Role::Outbound => {
                let worker = OutboundWorker::new(metrics);
                worker.routes.borrow_mut().refresh();
                if let Err(e) =
                    hostcalls::set_tick_period(Duration::from_millis(config.table_check_ms))
                {
                    return Err(format!("cannot start the tick: {e:?}"));
                }
                RootRole::Outbound(Rc::new(worker))
            }
            Role::Dns | Role::DnsUdp | Role::DnsTcp => {
                // The UDP root's tick also sends the tunnels' keepalives; the table check
                // is a small shared-data read, cheap at the faster of the two periods.
                let period = match role {
                    Role::DnsUdp => config.table_check_ms.min(config.udp_keepalive_ms),
                    _ => config.table_check_ms,
                };
                let worker = Worker {
                    config,
                    metrics,
                    table: RefCell::new(WorkerTable::default()),
                    rotation: Cell::new(0),
                    keepalive: RefCell::new(Vec::new()),
                };
                worker.table.borrow_mut().refresh();
                if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(period)) {
                    return Err(format!("cannot start the tick: {e:?}"));
                }
                stream::init(&worker.config, self.id);
                let worker = Rc::new(worker);
                match role {
                    Role::DnsUdp => RootRole::Conn(worker, Carrier::UdpTunnel),
                    Role::DnsTcp => RootRole::Conn(worker, Carrier::Tcp),
                    _ => RootRole::Dns(worker),
                }
            }
        };
        Ok(())
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if let RootRole::Agent(agent) = &mut self.role {
            agent.on_http_call_response(token, headers, body_size);
        }
    }

    fn on_grpc_stream_message(&mut self, token: u32, message_size: usize) {
        conn::begin_root_callback();
        stream::on_message(self.id, token, message_size);
    }

    fn on_grpc_stream_close(&mut self, token: u32, status_code: u32) {
        stream::on_close(token, status_code);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("vmesh filter {BUILD} starting");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match self.configure() {
            Ok(()) => true,
            Err(e) => {
                log::error!("vmesh filter configuration refused: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        conn::begin_root_callback();
        match &mut self.role {
            RootRole::Agent(agent) => agent.on_tick(),
            RootRole::Dns(worker) | RootRole::Conn(worker, Carrier::Tcp) => {
                worker.table.borrow_mut().refresh();
                liveness::record_worker_tick();
                stream::tick(self.id);
            }
            RootRole::Conn(worker, Carrier::UdpTunnel) => {
                worker.table.borrow_mut().refresh();
                liveness::record_worker_tick();
                stream::tick(self.id);
                conn::send_keepalives(worker, self.id);
            }
            RootRole::Outbound(worker) => {
                worker.routes.borrow_mut().refresh();
                liveness::record_worker_tick();
            }
            RootRole::Gateway(worker) => {
                worker.routes.borrow_mut().refresh();
                liveness::record_worker_tick();
            }
            RootRole::Unconfigured => {}
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None makes the SDK panic; a stream we do not serve gets a pass-through.
        Some(match &self.role {
            RootRole::Dns(worker) => Box::new(DnsStream::new(Rc::clone(worker), context_id)),
            RootRole::Agent(_)
            | RootRole::Conn(..)
            | RootRole::Outbound(_)
            | RootRole::Gateway(_)
            | RootRole::Unconfigured => Box::new(PassThrough),
        })
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(match &self.role {
            RootRole::Conn(worker, carrier) => {
                Box::new(DnsConn::new(Rc::clone(worker), context_id, *carrier))
            }
            RootRole::Outbound(worker) => Box::new(OutboundConn::new(Rc::clone(worker))),
            RootRole::Gateway(worker) => Box::new(GatewayConn::new(Rc::clone(worker))),
            RootRole::Agent(_) | RootRole::Dns(_) | RootRole::Unconfigured => Box::new(PassThrough),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(match self.role {
            RootRole::Conn(..) | RootRole::Outbound(_) | RootRole::Gateway(_) => {
                ContextType::StreamContext
            }
            RootRole::Agent(_) | RootRole::Dns(_) | RootRole::Unconfigured => {
                ContextType::HttpContext
            }
        })
    }
}

struct PassThrough;
impl Context for PassThrough {}
impl HttpContext for PassThrough {}
impl StreamContext for PassThrough {}
