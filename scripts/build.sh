#!/usr/bin/env bash
# Builds the filter (wasm32-wasip1) and the native binaries in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-wasip1 -p vmesh-filter

# binaryen's optimizer on the filter: about a fifth smaller than rustc alone (254.5 -> 206.1 KB
# at e5191c2), which is what makes room for the traffic roots under filter/wasm-size-budget.
# -O3 (speed) rather than -Oz (199.7 KB): the DNS path is measured against Envoy's native filter.
# The feature flags are exactly what rustc's wasm32-wasip1 output uses, so the optimizer adds
# nothing Envoy's V8 might not run. The result replaces the file rather than its content:
# cargo's copy is a hard link to the one under deps/, and cargo copies that one again on every
# build of the filter (so a plain `cargo build` gives the unoptimized module, which works too).
wasm=target/wasm32-wasip1/release/vmesh_filter.wasm
wasm-opt -O3 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
  --enable-mutable-globals "$wasm" -o "$wasm.opt"
mv "$wasm.opt" "$wasm"

cargo build --release -p vmesh-shim -p vmesh-control
