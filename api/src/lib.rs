//! vmesh-api: the one definition of how vmesh's parts talk to each other.
//!
//! ```text
//!  filter (in Envoy) ──HTTP/2──► shim (127.0.0.1:15020) ──HTTPS──► control plane (:15012)
//!     gRPC Forwarder/Forward,            /v1/register, /v1/heartbeat, /v1/health,
//!     /v1/name-table, /v1/agent/report   /v1/deregister, /v1/name-table
//!     (/dns-query for DoH clients)
//! ```
//!
//! - [`paths`]: every path, header name and content type, used by all three parts;
//! - [`names`]: the name table (what DNS answers and the data plane routes with);
//! - [`control`]: the VM calls of the control plane's API (`docs/protocol.md`);
//! - `ca` (native only): the workload-certificate call, Istio's `IstioCertificateService`;
//! - [`agent`]: the filter's agent talking to the shim (registration, liveness reports, probes);
//! - [`forward`]: the gRPC stream that carries forwarded DNS queries from each Envoy worker to
//!   the shim, and their answers back;
//! - [`probe`]: a WorkloadGroup's readiness probe;
//! - [`json`]: the serde-free JSON reader (and a small writer) the filter uses, because serde_json
//!   costs the `.wasm` too much; native code uses serde on the same types, and tests check both
//!   agree;
//! - [`traffic`]: mesh traffic routing: the filter roots, filter-state names and clusters the
//!   filter and the Envoy configs share, and Istio's `outbound_.PORT_._.HOST` SNI;
//! - [`time`]: RFC 3339 timestamps as Kubernetes and Istio write them (the health report's
//!   `probeTime`, WorkloadEntry annotations and conditions).
//!
//! The default feature `native` adds what only native code uses: serde_json
//! ([`control::ApiError::from_response`], [`names::NameTable::to_json`]) and form_urlencoded
//! (`paths::query::param`), and prost for the CA messages (`ca`). The filter and `vmesh-core` turn it off, so nothing the filter links
//! pulls serde_json.
//!
//! Nothing here does I/O; it runs inside Envoy's Wasm VMs too, so nothing panics on input.
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
#[cfg(feature = "native")]
pub mod ca;
pub mod control;
pub mod forward;
pub mod json;
pub mod names;
pub mod paths;
pub mod probe;
pub mod time;
pub mod traffic;
