#!/usr/bin/env bash
# The demo: sets the machine up, builds vmesh, runs Envoy with vmesh_filter.wasm, the shim and
# a sample name table on this machine's loopback, and shows what the VM's DNS now answers.
# Everything stays on 127.0.0.1. Pass --keep to leave it running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0; [ "${1:-}" = "--keep" ] && keep=1

./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/build.sh

run=$(mktemp -d /tmp/vmesh-demo.XXXXXX)
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null && wait "${pids[@]}" 2>/dev/null || true
}
if [ "$keep" = 0 ]; then trap cleanup EXIT; fi

for port in 15000 15020 15053 15054 15353; do
  if ss -Hltun "sport = :$port" | grep -q .; then
    echo "port $port is in use on this machine; stop what uses it and run again" >&2
    exit 1
  fi
done

# The VM's "system resolver" for names outside the mesh: a local dnsmasq, so the demo never
# sends a query off this machine.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=15353 --listen-address=127.0.0.1 \
  --bind-interfaces --user=root --pid-file= --local=/#/ \
  --address=/www.example.org/198.18.0.80 --txt-record=vmservice.example.com,"served by the system resolver" \
  >"$run/dnsmasq.log" 2>&1 &
pids+=($!)
target/release/vmesh-shim --static-names envoy-configs/sample-names.json --upstream 127.0.0.1:15353 \
  >"$run/shim.log" 2>&1 &
pids+=($!)
envoy -c envoy-configs/vm-sidecar.yaml --disable-hot-restart -l warning >"$run/envoy.log" 2>&1 &
pids+=($!)

printf 'waiting for the name table to reach Envoy'
for _ in $(seq 1 100); do
  if [ "$(dig @127.0.0.1 -p 15053 +short +tries=1 +time=1 vmservice.example.com 2>/dev/null)" = "240.240.0.1" ]; then
    break
  fi
  printf '.'; sleep 0.2
done
echo

show() {
  printf '\n\033[1m$ %s\033[0m\n' "$*"
  "$@" 2>&1 | grep -Ev '^(; <<>>|;; global options|;; Got answer|$|;; (Query time|SERVER|WHEN|MSG SIZE))' || true
}
echo "== Mesh names are answered by the Wasm filter inside Envoy (authoritative, TTL 30) =="
show dig @127.0.0.1 -p 15053 vmservice.example.com
show dig @127.0.0.1 -p 15053 +short details                     # short name, VM's own namespace
show dig @127.0.0.1 -p 15053 +short helloworld.sample           # name.namespace
show dig @127.0.0.1 -p 15053 +short reviews.vm-namespace.svc    # three addresses, rotated
show dig @127.0.0.1 -p 15053 +short api.internal.example.com    # ServiceEntry wildcard host
show dig @127.0.0.1 -p 15053 vmservice.example.com AAAA         # v4-only: NOERROR, no answer
show dig @127.0.0.1 -p 15053 +tcp +short details AAAA           # DNS over TCP
echo; echo "== Everything else goes to the system resolver through the shim =="
show dig @127.0.0.1 -p 15053 +short www.example.org
show dig @127.0.0.1 -p 15053 +short vmservice.example.com TXT   # other types for mesh names too
echo; echo "== DNS over HTTP (RFC 8484) on 15054 =="
q=$(printf '\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x09vmservice\x07example\x03com\x00\x00\x01\x00\x01' \
    | base64 -w0 | tr '+/' '-_' | tr -d '=')
show sh -c "curl -s -D - -o /dev/null 'http://127.0.0.1:15054/dns-query?dns=$q' | grep -Ei '^(HTTP|content-type|cache-control)'"
echo; echo "== The filter's counters (Envoy admin, 127.0.0.1:15000/stats) =="
curl -s 'http://127.0.0.1:15000/stats?filter=wasmcustom' | grep -v ': 0$'

echo
echo "logs: $run"
if [ "$keep" = 1 ]; then
  echo "still running (pids ${pids[*]}); try: dig @127.0.0.1 -p 15053 details"
fi
