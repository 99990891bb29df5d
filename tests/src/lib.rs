//! Test support for vmesh's end-to-end tests: real processes (Envoy with the built
//! `vmesh_filter.wasm`, `vmesh-shim`, dnsmasq as the "system resolver"), real sockets on
//! 127.0.0.1, per-test ports and temp dirs, and `assert_eventually!` instead of sleeps.
//!
//! Every process is started through `setpriv --pdeathsig KILL`, so it dies with the test
//! thread that started it even if the test process is killed; `Drop` kills it otherwise.

pub mod support;
