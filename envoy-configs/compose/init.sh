#!/bin/sh
# vmesh-init (compose.yaml): once the control plane answers, applies the seed's Istio config
# and writes a VM bundle per WorkloadGroup into the shared bundles volume, which the shims read.
# Paths and addresses come from the environment (compose.yaml sets them), so the same script
# runs in the container and in tests/tests/compose.rs.
#
#   VMESH_CONTROL_DATA_DIR, VMESH_CONTROL_SERVER  vmesh-control's own: the admin credential and
#                                                 root certificate, the server to talk to
#   VMESH_MESH_CONFIG   the Istio YAML to apply
#   VMESH_BUNDLES       where the bundles go, one directory per group
#   VMESH_GATEWAY_B     the east-west gateway's address in network-b
set -eu

vmesh-control apply -f "$VMESH_MESH_CONFIG"

# Like `istioctl x workload entry configure`: cluster.env, mesh.yaml, root-cert.pem,
# istio-token and a hosts file naming the control plane's address.
for spec in python-http:vm-services httpbin:default client:vm-services \
            istio-eastwestgateway:istio-system; do
  group=${spec%%:*}
  vmesh-control vm-bundle --group "$group" -n "${spec#*:}" -o "$VMESH_BUNDLES/$group"
done

# The client is in network-b, which has no route to the control plane: its shim dials the
# control plane's name, and its hosts file sends that to the gateway (15012 passed through).
echo "$VMESH_GATEWAY_B istiod.istio-system.svc" > "$VMESH_BUNDLES/client/hosts"
echo "bundles written to $VMESH_BUNDLES"
