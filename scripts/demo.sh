#!/usr/bin/env bash
# The demo: the seed's mesh across two networks, end to end.
#
#   two networks of network namespaces (198.18.1.0/24 and 198.18.2.0/24, no route between
#   them) -> the control plane in network-a, the seed's Istio config applied -> the east-west
#   gateway with a leg in each -> two python-http VMs and httpbin in network-a, a client VM in
#   network-b, each with its app, the shim from its VM bundle, Envoy with vmesh_filter.wasm and
#   the shim's traffic capture -> the auto-registered WorkloadEntries -> curl
#   vmservice.example.com from the client (which entry answered) and httpbin through the
#   east-west gateway -> one replica's Envoy stopped: it leaves the answers -> everything
#   removed (also on Ctrl-C or a failure).
#
# The scenario is written once, in Rust (demo/, `vmesh-demo`); tests/tests/mesh_demo.rs runs
# the same in checking mode. Needs root (namespaces, iptables). Sets the machine up and
# builds first. The one-VM demo on loopback is scripts/demo-vm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/build.sh
# The debug profile: the release profile aborts on a panic, which would skip the teardown.
cargo build -q -p vmesh-demo
exec target/debug/vmesh-demo
