//! vmesh-demo: the seed's multi-network scenario, written once. `scripts/demo.sh` runs the
//! binary to show it; `tests/tests/mesh_demo.rs` runs [`run`] in [`Mode::Check`] and asserts
//! on the [`Report`].
//!
//! Flow: two networks of network namespaces ([`topology`]) -> the control plane in network A,
//! the seed's Istio config applied -> the east-west gateway with a leg in each network -> VMs
//! (two `python-http` replicas and httpbin in A, a client in B), each with its app, the shim
//! from its VM bundle, Envoy with `vmesh_filter.wasm` and the shim's traffic capture -> the
//! auto-registered WorkloadEntries -> mesh names and requests from the client -> one replica's
//! Envoy stopped -> teardown. Every program, rule, interface and namespace is removed when
//! [`run`] returns, also after a failure or Ctrl-C ([`interrupt`]).

pub mod interrupt;
pub mod scenario;
pub mod topology;

pub use scenario::{run, Mode, Options, Report};

/// Why the scenario stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Not root with CAP_NET_ADMIN, or no iptables: the only reasons the test may skip.
    #[error("cannot run here: {0}")]
    Unavailable(String),
    /// A program or artifact the scenario needs is missing.
    #[error("missing: {0}")]
    Missing(String),
    /// A step did not show what it should.
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}
