#!/usr/bin/env bash
# The one-VM demo on loopback: a VM joins the mesh by itself, and leaves it (the README's main
# demo is scripts/demo.sh, the multi-network mesh).
#
#   control plane up -> Istio config applied -> VM bundle written -> the VM's app, Envoy with
#   vmesh_filter.wasm and the shim started from the bundle -> the auto-registered WorkloadEntry
#   -> mesh names resolved through the VM's Envoy -> the probe failing and recovering ->
#   Envoy killed: unhealthy at once, the entry deleted after the grace period.
#
# Sets the machine up and builds first. Everything stays on 127.0.0.1 (the VM's mesh address,
# 198.18.0.10, is a test address it registers with; nothing is sent to it). Pass --keep to
# leave it running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0; [ "${1:-}" = "--keep" ] && keep=1

./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/build.sh

ports=(8080 15000 15012 15020 15053 15054 15353)
for port in "${ports[@]}"; do
  if ss -Hltun "sport = :$port" | grep -q .; then
    echo "port $port is in use on this machine; stop what uses it and run again" >&2
    exit 1
  fi
done

run=$(mktemp -d /tmp/vmesh-demo.XXXXXX)
declare -A pid
cleanup() {
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
if [ "$keep" = 0 ]; then trap cleanup EXIT; fi

CONTROL=target/release/vmesh-control
SHIM=target/release/vmesh-shim
ctl() { "$CONTROL" --server https://127.0.0.1:15012 --data-dir "$run/cp" "$@"; }
step() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }
show() {
  printf '\033[1m$ %s\033[0m\n' "$*"
  "$@" 2>&1 | grep -Ev '^(; <<>>|;; global options|;; Got answer|$|;; (Query time|SERVER|WHEN|MSG SIZE))' || true
}
# wait_for WHAT SECONDS COMMAND...: polls until COMMAND succeeds.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "gave up waiting: $what (logs: $run)" >&2; exit 1; fi
    sleep 0.2
  done
}
entry_json() { ctl get workloadentries python-http-198.18.0.10 -n vm-namespace -o json; }
# health_is True|False: the entry's Healthy condition.
health_is() {
  entry_json | python3 -c 'import json,sys
e = json.load(sys.stdin)
c = [c for c in e.get("status", {}).get("conditions", []) if c["type"] == "Healthy"]
sys.exit(0 if c and c[0]["status"] == sys.argv[1] else 1)' "$1"
}
entry_gone() { ! entry_json; }
dig_() { dig @127.0.0.1 -p 15053 +tries=1 +time=2 "$@"; }

step "1. The control plane (vmesh-control serve on 127.0.0.1:15012)"
echo "heartbeats every 1 s, a silent VM is disconnected after 3 s and its entry deleted 5 s later"
"$CONTROL" serve --data-dir "$run/cp" --listen 127.0.0.1:15012 \
  --heartbeat-interval 1s --liveness-timeout 3s --grace-period 5s >"$run/control.log" 2>&1 &
pid[control]=$!
wait_for "the control plane" 20 ctl get workloadgroups -A

step "2. Istio config, as an Istio user writes it"
cat >"$run/mesh.yaml" <<'EOF'
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: python-http
  namespace: vm-namespace
spec:
  metadata:
    labels:
      app: python-http
  template:
    serviceAccount: vm-sa
  probe:
    periodSeconds: 1
    httpGet:
      port: 8080
      path: /ready
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: vm-workload-svc
  namespace: vm-namespace
spec:
  hosts: [vmservice.example.com]
  location: MESH_INTERNAL
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 9090}
  resolution: STATIC
  workloadSelector:
    labels:
      app: python-http
---
apiVersion: v1
kind: Service
metadata:
  name: mysqldb
  namespace: vm
spec:
  clusterIP: 10.96.0.20
  ports:
  - {port: 3306, name: tcp}
  selector:
    app: mysqldb
EOF
show ctl apply -f "$run/mesh.yaml"

step "3. The VM bundle (what istioctl x workload entry configure writes)"
show ctl vm-bundle --group python-http -n vm-namespace -o "$run/bundle"
show grep -E '^(ISTIO_META_AUTO_REGISTER_GROUP|POD_NAMESPACE|SERVICE_ACCOUNT)=' "$run/bundle/cluster.env"

step "4. The VM: its app, the shim started from the bundle, Envoy with vmesh_filter.wasm"
python3 scripts/demo/app.py --port 8080 --unready "$run/unready" --name vm-1 >"$run/app.log" 2>&1 &
pid[app]=$!
# The VM's system resolver, for names outside the mesh (a local dnsmasq: nothing leaves this
# machine), and its resolv.conf search domain.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=15353 --listen-address=127.0.0.1 \
  --bind-interfaces --user=root --pid-file= --local=/#/ \
  --address=/www.example.org/198.18.0.80 >"$run/dnsmasq.log" 2>&1 &
pid[dnsmasq]=$!
printf 'search corp.example\nnameserver 127.0.0.1\n' >"$run/resolv.conf"
echo "\$ ISTIO_SVC_IP=198.18.0.10 $SHIM --bundle $run/bundle --state-dir $run/state --upstream 127.0.0.1:15353 &"
ISTIO_SVC_IP=198.18.0.10 "$SHIM" --bundle "$run/bundle" --state-dir "$run/state" \
  --upstream 127.0.0.1:15353 --resolv-conf "$run/resolv.conf" >"$run/shim.log" 2>&1 &
pid[shim]=$!
echo "\$ envoy -c envoy-configs/vm-sidecar.yaml &"
envoy -c envoy-configs/vm-sidecar.yaml --disable-hot-restart -l warning >"$run/envoy.log" 2>&1 &
pid[envoy]=$!
started=$SECONDS
wait_for "the VM's WorkloadEntry" 30 entry_json
echo "registered $((SECONDS - started)) s after Envoy started, without anyone touching the control plane"

step "5. The auto-registered WorkloadEntry"
wait_for "the first healthy probe" 20 health_is True
show ctl get workloadentries -n vm-namespace
show ctl get workloadentries python-http-198.18.0.10 -n vm-namespace -o yaml
show "$SHIM" status

step "6. Mesh names, answered by the filter inside the VM's Envoy"
show dig_ vmservice.example.com                 # ServiceEntry host: its auto-allocated VIP
show dig_ +short mysqldb.vm                     # a Service as name.namespace
show dig_ +short mysqldb.vm.corp.example        # with the VM's own search domain appended
show dig_ +short www.example.org                # not a mesh name: the VM's resolver answers

step "7. The probe fails (the app's /ready answers 503), then recovers"
touch "$run/unready"
wait_for "Healthy=False" 20 health_is False
show ctl get workloadentries -n vm-namespace
rm -f "$run/unready"
wait_for "Healthy=True" 20 health_is True
show ctl get workloadentries -n vm-namespace

step "8. Envoy is killed: the data plane stops reporting"
kill -9 "${pid[envoy]}"; unset 'pid[envoy]'
killed=$SECONDS
wait_for "Healthy=False" 10 health_is False
echo "unhealthy $((SECONDS - killed)) s after the kill:"
show ctl get workloadentries -n vm-namespace
show "$SHIM" status
echo "the shim stopped heartbeating; the control plane disconnects the entry, then deletes it after the grace period"
wait_for "the entry to be deleted" 30 entry_gone
echo "deleted $((SECONDS - killed)) s after the kill:"
show ctl get workloadentries -n vm-namespace

echo
echo "logs: $run"
if [ "$keep" = 1 ]; then
  echo "still running (pids ${pid[*]}); restart Envoy and the VM registers again:"
  echo "  envoy -c envoy-configs/vm-sidecar.yaml --disable-hot-restart &"
fi
