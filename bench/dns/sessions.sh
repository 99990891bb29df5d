#!/usr/bin/env bash
# What fresh-source-port DNS clients cost vmesh's Envoy in heap and udp_proxy sessions, and what
# persistent clients get in throughput, for one or more sidecar variants side by side.
# See docs/benchmarks.md ("UDP sessions").
#   bench/dns/sessions.sh [--no-build] [--variant NAME=SIDECAR[,WASM]]... [more: --help]
#   bench/dns/sessions.sh --no-build --report FILE.json   # an earlier run's tables again
# Results: bench/dns/results/sessions-<time>-c<N>.{json,md}; the markdown also goes to stdout.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

build=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-build" ]; then build=0; else args+=("$a"); fi
done

for tool in envoy dnsperf setpriv python3 /usr/sbin/dnsmasq; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/setup.sh" >&2; exit 1; }
done

if [ "$build" = 1 ]; then
  ./scripts/build.sh >&2
fi

exec env PYTHONPATH="$repo/bench/dns" python3 -m dnsbench.sessions "${args[@]}"
