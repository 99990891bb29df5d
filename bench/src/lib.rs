//! Benchmarks live in `benches/` (criterion) and `dns/` (dnsperf harness).
