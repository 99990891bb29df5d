//! Test support for vmesh.
//!
//! [`wasm_host`] runs the built filter module (`vmesh_filter.wasm`) under a wasmtime
//! proxy-wasm host that plays Envoy, so tests in `tests/wasm_*.rs` drive its callbacks in
//! Envoy's order and assert on the host calls it makes.

pub mod wasm_host;
