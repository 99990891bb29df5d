#!/usr/bin/env bash
# Builds the filter (wasm32-wasip1) and the native binaries in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-wasip1 -p vmesh-filter

# binaryen's optimizer on the filter, for size: -Oz takes about a fifth off what rustc makes
# (322.3 -> 253.8 KB with the traffic roots), which keeps it under filter/wasm-size-budget.
# Size rather than speed (-O3: 261.4 KB) because the Wasm code is 2-3.5 % of Envoy's CPU on the
# DNS path (../shared/reference/envoy-1.40-experiments/q8-grpc-stream) and the DNS suites and
# benchmarks run on this output. The feature flags are exactly what rustc's wasm32-wasip1 output
# uses, so the optimizer adds nothing Envoy's V8 might not run. The result replaces the file
# rather than its content: cargo's copy is a hard link to the one under deps/, and cargo copies
# that one again on every build of the filter (a plain `cargo build` gives the unoptimized
# module, which works too, but is over the budget).
wasm=target/wasm32-wasip1/release/vmesh_filter.wasm
wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
  --enable-mutable-globals "$wasm" -o "$wasm.opt"
mv "$wasm.opt" "$wasm"

cargo build --release -p vmesh-shim -p vmesh-control
