#!/usr/bin/env bash
# Builds the filter (wasm32-wasip1) and the native binaries in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --target wasm32-wasip1 -p vmesh-filter
cargo build --release -p vmesh-shim -p vmesh-control
