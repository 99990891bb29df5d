"""What the sessions benchmark reads from Envoy's admin endpoint: heap figures (`/memory`) and
the udp_proxy session counters (`/stats`). Parsing is pure; fetching is one GET each."""

from __future__ import annotations

import json
from urllib.parse import quote

from .procs import http_get

# `/memory` fields, all byte counts. "allocated" is what Envoy's code holds (tcmalloc's
# generic.current_allocated_bytes); heap_size also counts free pages tcmalloc keeps.
MEMORY_FIELDS = ("allocated", "heap_size", "pageheap_unmapped", "pageheap_free",
                 "total_thread_cache", "total_physical_bytes")

# udp_proxy's own stats (stat_prefix dns_udp in vm-sidecar.yaml) and the tunnel cluster's
# connection gauge: one tunnel connection per live session.
SESSION_STATS = {
    "active": "udp.dns_udp.downstream_sess_active",
    "total": "udp.dns_udp.downstream_sess_total",
    "idle_timeout": "udp.dns_udp.idle_timeout",
    "tunnel_cx_active": "cluster.vmesh_dns_udp_tunnel.upstream_cx_active",
    "tunnel_overflow": "cluster.vmesh_dns_udp_tunnel.upstream_cx_overflow",
}


def parse_memory(text: str) -> dict[str, int]:
    """`/memory` (JSON; proto3 renders uint64 as strings) -> the byte counts as ints."""
    data = json.loads(text)
    return {k: int(data[k]) for k in MEMORY_FIELDS if k in data}


def parse_stats(text: str, wanted: dict[str, str]) -> dict[str, int]:
    """Plain-text `/stats` ("name: value" lines) -> {short name: value} for `wanted`
    ({short: full stat name}); stats Envoy has not created yet read as 0."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            values[name.strip()] = value.strip()
    out = {}
    for short, full in wanted.items():
        try:
            out[short] = int(values.get(full, "0"))
        except ValueError:
            out[short] = 0
    return out


def stats_filter(wanted: dict[str, str]) -> str:
    """A `/stats?filter=` regex matching exactly the wanted stats."""
    return "|".join(f"^{name.replace('.', '[.]')}$" for name in wanted.values())


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sample(admin: int, pid: int | None) -> dict:
    """One reading: heap figures, session stats, and the process's resident size."""
    _, mem = http_get(admin, "/memory")
    _, stats = http_get(admin, "/stats?filter=" + quote(stats_filter(SESSION_STATS)))
    out = {"memory": parse_memory(mem), "sessions": parse_stats(stats, SESSION_STATS)}
    if pid is not None:
        out["rss"] = rss_bytes(pid)
    return out
