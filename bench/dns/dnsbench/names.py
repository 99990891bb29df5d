"""The names under test and every server's view of them, as pure functions.

One generated list of mesh names (Kubernetes services and ServiceEntry hosts) is rendered
three ways: the vmesh name table JSON the shim serves, the inline table of Envoy's native
`dns_filter`, and a hosts file for dnsmasq. Forwarded names live only in the upstream
dnsmasq's hosts file. Query files for dnsperf pick names at random (fixed seed) from a list.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CLUSTER_DOMAIN = "cluster.local"
VM_NAMESPACE = "vm-apps"
# The TTL all three servers answer mesh names with (vmesh's fixed MESH_TTL).
MESH_TTL = 30
FORWARDED_SUFFIX = "corp.test"

_SERVICES = (
    "reviews", "ratings", "details", "productpage", "checkout", "cart", "payments", "auth",
    "search", "inventory", "orders", "shipping", "catalog", "users", "gateway", "frontend",
    "notifications", "billing", "recommend", "ledger",
)
_VENDORS = ("stripe", "partner", "legacy-erp", "saas", "billing-provider", "maps", "mail")


@dataclass(frozen=True)
class MeshName:
    fqdn: str
    ips: tuple[str, ...]
    registry: str  # "Kubernetes" or "External", as the vmesh table spells it
    shortname: str = ""
    namespace: str = ""


def mesh_names(count: int, seed: int = 1) -> list[MeshName]:
    """`count` names: about 80 % Kubernetes services (one ClusterIP each) spread over
    count/20 namespaces, the rest ServiceEntry hosts with one to three addresses."""
    rng = random.Random(seed)
    namespaces = [VM_NAMESPACE] + [f"team-{i:03d}" for i in range(max(1, count // 20) - 1)]
    out: list[MeshName] = []
    for i in range(count):
        if i % 5 == 4:
            vendor = _VENDORS[i % len(_VENDORS)]
            n_ips = rng.choice((1, 1, 2, 3))
            ips = tuple(f"240.240.{(i * 3 + k) // 250 % 250}.{(i * 3 + k) % 250 + 1}"
                        for k in range(n_ips))
            out.append(MeshName(f"api-{i}.{vendor}.example.com", ips, "External"))
        else:
            svc = f"{_SERVICES[i % len(_SERVICES)]}-{i}"
            ns = namespaces[i % len(namespaces)]
            ip = f"10.96.{i // 250 % 250}.{i % 250 + 1}"
            out.append(MeshName(f"{svc}.{ns}.svc.{CLUSTER_DOMAIN}", (ip,), "Kubernetes", svc, ns))
    return out


def forwarded_names(count: int) -> list[tuple[str, str]]:
    """Names only the upstream resolver knows: (fqdn, address)."""
    return [(f"host-{i}.{FORWARDED_SUFFIX}", f"198.18.{i // 250 % 250}.{i % 250 + 1}")
            for i in range(count)]


def vmesh_table(names: list[MeshName], version: str) -> dict:
    """The name table document the shim serves (shape of core/src/names/table.rs)."""
    entries = {}
    for n in names:
        info: dict = {"ips": list(n.ips), "registry": n.registry}
        if n.shortname:
            info["shortname"] = n.shortname
            info["namespace"] = n.namespace
        entries[n.fqdn] = info
    return {
        "version": version,
        "namespace": VM_NAMESPACE,
        "domain": CLUSTER_DOMAIN,
        "searchDomains": [f"{VM_NAMESPACE}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}",
                          CLUSTER_DOMAIN],
        "names": entries,
    }


def hosts_file(entries) -> str:
    """/etc/hosts format, one address per line; `entries` is (fqdn, ips) pairs."""
    lines = []
    for fqdn, ips in entries:
        for ip in ips:
            lines.append(f"{ip} {fqdn}")
    return "\n".join(lines) + "\n"


def query_file(fqdns: list[str], lines: int, seed: int) -> str:
    """dnsperf input: `lines` A queries, each for a name drawn uniformly from `fqdns`."""
    rng = random.Random(seed)
    return "".join(f"{rng.choice(fqdns)} A\n" for _ in range(lines))


def mixed_query_file(owned: list[str], forwarded: list[str], forwarded_share: float,
                     lines: int, seed: int) -> str:
    """dnsperf input where each query is for a forwarded name with probability
    `forwarded_share`, else for a mesh name (uniformly within each list)."""
    rng = random.Random(seed)
    return "".join(
        f"{rng.choice(forwarded if rng.random() < forwarded_share else owned)} A\n"
        for _ in range(lines))


def is_forwarded(fqdn: str) -> bool:
    return fqdn.rstrip(".").endswith("." + FORWARDED_SUFFIX)


def native_envoy_config(names: list[MeshName], admin: int, dns: int, upstream: int) -> str:
    """Envoy bootstrap (JSON, which Envoy reads as YAML) with the native UDP dns_filter
    answering `names` inline and resolving every other name through c-ares at `upstream`."""
    domains = [{
        "name": n.fqdn,
        "endpoint": {"address_list": {"address": list(n.ips)}},
        "answer_ttl": f"{MESH_TTL}s",
    } for n in names]
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "dns_udp",
            "address": {"socket_address": {"protocol": "UDP", "address": "127.0.0.1",
                                           "port_value": dns}},
            "listener_filters": [{
                "name": "envoy.filters.udp.dns_filter",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
                    "stat_prefix": "dns",
                    "server_config": {"inline_dns_table": {"virtual_domains": domains}},
                    "client_config": {
                        "resolver_timeout": "5s",
                        "max_pending_lookups": 4096,
                        "typed_dns_resolver_config": {
                            "name": "envoy.network.dns_resolver.cares",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.network."
                                         "dns_resolver.cares.v3.CaresDnsResolverConfig",
                                "resolvers": [{"socket_address": {
                                    "address": "127.0.0.1", "port_value": upstream}}],
                                "dns_resolver_options": {"use_tcp_for_dns_lookups": False,
                                                         "no_default_search_domain": True},
                            },
                        },
                    },
                },
            }],
        }]},
    }
    return json.dumps(config, indent=1)


# What tests/src/support/envoy.rs substitutes in envoy-configs/vm-sidecar.yaml.
SIDECAR_WASM = "target/wasm32-wasip1/release/vmesh_filter.wasm"
SIDECAR_PORTS = {"admin": 15000, "dns": 15053, "doh": 15054, "shim": 15020}


def render_sidecar(text: str, wasm: str, ports: dict[str, int]) -> str:
    """The real sidecar config with the wasm path and the well-known ports replaced, exactly
    as the end-to-end tests do it. Fails loudly if the config no longer has a port."""
    out = text.replace(SIDECAR_WASM, wasm)
    for role, default in SIDECAR_PORTS.items():
        needle = f"port_value: {default}}}"
        if needle not in out:
            raise ValueError(f"vm-sidecar.yaml no longer has {needle!r}")
        out = out.replace(needle, f"port_value: {ports[role]}}}")
    return out
