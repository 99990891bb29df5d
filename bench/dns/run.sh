#!/usr/bin/env bash
# vmesh DNS benchmark: vmesh (Envoy + vmesh_filter.wasm + vmesh-shim) vs Envoy's native UDP
# dns_filter vs dnsmasq, same names, interleaved dnsperf runs. See docs/benchmarks.md.
#   bench/dns/run.sh [--quick] [--concurrency N] [--no-build] [more: --help]
# Results: bench/dns/results/dns-<time>-c<N>.{json,md}; the markdown also goes to stdout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

build=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-build" ]; then build=0; else args+=("$a"); fi
done

for tool in envoy dnsperf dig setpriv python3 /usr/sbin/dnsmasq; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/setup.sh" >&2; exit 1; }
done

if [ "$build" = 1 ]; then
  cargo build --release --target wasm32-wasip1 -p vmesh-filter >&2
  cargo build --release -p vmesh-shim >&2
fi

# The harness stops every server it started on exit, error, Ctrl-C or SIGTERM (and each server
# carries a parent-death signal, so even a killed harness leaves nothing running).
exec env PYTHONPATH="$repo/bench/dns" python3 -m dnsbench "${args[@]}"
