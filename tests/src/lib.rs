//! Test support for vmesh.
//!
//! - [`support`]: end-to-end fixtures with real processes (Envoy with the built
//!   `vmesh_filter.wasm`, `vmesh-shim`, dnsmasq as the "system resolver"), real sockets on
//!   127.0.0.1, per-test ports and temp dirs, and waiting for conditions instead of sleeps
//!   (`vmesh-test-support`). Every process dies with the test thread that started it
//!   (`vmesh_test_support::process`).
//! - [`istio`]: checks against Istio's CRD schemas (`tests/schemas/`) and a stand-in for
//!   istiod applying EnvoyFilters and WasmPlugins to a proxy's config (`tests/istio.rs`).
//! - [`wasm_host`]: a wasmtime proxy-wasm host that plays Envoy, so `tests/wasm_*.rs` drive the
//!   built module's callbacks in Envoy's order and assert on the host calls it makes.

pub mod istio;
pub mod support;
pub mod wasm_host;
