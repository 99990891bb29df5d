//! vmesh-core: the pure logic every vmesh part shares.
//!
//! Bytes flow through it like this: a DNS query (from Envoy via the filter, or from a test) is
//! decoded by [`dns::Query::parse`]; [`responder::respond`] looks its name up in a compiled
//! [`names::NameIndex`] and either builds the answer with [`dns::ResponseBuilder`] or says the
//! query must be forwarded; [`framing`] splits and joins the capsule and TCP streams the
//! queries arrive in. The name table arrives as JSON ([`names::NameTable`]) and is compiled once
//! into a flat, position-independent byte image that worker threads share. The agent's
//! readiness probe (schedule, thresholds, what an answer means) is [`probe`].
//!
//! Istio's semantics (config model, validation, WorkloadEntry lifecycle, name-table assembly)
//! are not here but in `vmesh-istio`, which only the control plane uses: this crate is linked
//! into the filter and stays free of serde_json.
//!
//! Nothing here does I/O, allocates per byte, or panics on input: it runs inside Envoy's Wasm
//! VMs, where a panic takes down every plugin on the worker.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod dns;
pub mod doh;
pub mod framing;
/// The east-west gateway's SNI routing.
pub mod gateway;
/// The filter's end of the forwarding stream to the shim.
pub mod link;
/// The serde-free JSON reader, shared with the filter and the shim through `vmesh-api`.
pub use vmesh_api::json;
pub mod names;
pub mod probe;
pub mod responder;
pub mod routes;
pub mod tunnel;
pub mod udp_tunnel;
