"""dnsperf: how it is invoked and what its output means (pure; running it is elsewhere).

dnsperf 2.10 prints a summary (queries sent/completed/lost, rcodes, queries per second, average
latency). It has no percentile option, so the latency runs use `-v`, which prints one line per
completed query (`> NOERROR name A 0.000123`), and percentiles are computed from those lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Load:
    """One dnsperf invocation's shape."""
    transport: str  # "udp" or "tcp"
    seconds: float
    clients: int
    outstanding: int
    threads: int = 1
    qps: int | None = None  # None: as fast as the outstanding window allows
    verbose: bool = False
    timeout: int = 5
    # TCP: open a new connection after this many queries (dnsmasq closes a connection after
    # 100 queries and the pipelined rest would count as lost).
    queries_per_conn: int | None = None


def command(port: int, datafile: str, load: Load) -> list[str]:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", datafile,
            "-m", load.transport, "-l", f"{load.seconds:g}", "-c", str(load.clients),
            "-T", str(load.threads), "-q", str(load.outstanding), "-t", str(load.timeout)]
    if load.qps:
        argv += ["-Q", str(load.qps)]
    if load.verbose:
        argv.append("-v")
    if load.transport == "tcp" and load.queries_per_conn:
        argv += ["-O", f"num-queries-per-conn={load.queries_per_conn}"]
    return argv


@dataclass
class Summary:
    sent: int
    completed: int
    lost: int
    qps: float
    avg_latency: float | None
    min_latency: float | None
    max_latency: float | None
    stddev: float | None
    rcodes: dict[str, int] = field(default_factory=dict)
    interrupted: int = 0


class ParseError(ValueError):
    pass


def _int(pattern: str, text: str, required: bool = True) -> int:
    m = re.search(pattern, text, re.M)
    if not m:
        if required:
            raise ParseError(f"dnsperf output has no {pattern!r}")
        return 0
    return int(m.group(1))


def _float(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def parse_summary(text: str) -> Summary:
    rcodes = {}
    m = re.search(r"^\s*Response codes:\s*(.*)$", text, re.M)
    if m:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", m.group(1)):
            rcodes[code] = int(count)
    qps = _float(r"^\s*Queries per second:\s*([\d.]+)", text)
    if qps is None:
        raise ParseError("dnsperf output has no 'Queries per second'")
    lat = re.search(r"^\s*Average Latency \(s\):\s*([\d.]+) \(min ([\d.]+), max ([\d.]+)\)",
                    text, re.M)
    return Summary(
        sent=_int(r"^\s*Queries sent:\s*(\d+)", text),
        completed=_int(r"^\s*Queries completed:\s*(\d+)", text),
        lost=_int(r"^\s*Queries lost:\s*(\d+)", text),
        interrupted=_int(r"^\s*Queries interrupted:\s*(\d+)", text, required=False),
        qps=qps,
        avg_latency=float(lat.group(1)) if lat else None,
        min_latency=float(lat.group(2)) if lat else None,
        max_latency=float(lat.group(3)) if lat else None,
        stddev=_float(r"^\s*Latency StdDev \(s\):\s*([\d.]+)", text),
        rcodes=rcodes,
    )


_VERBOSE_LINE = re.compile(r"^> [A-Z]+ (\S+) \S+ ([\d.]+)$")


def latencies(text: str, keep=None) -> list[float]:
    """Per-query latencies (seconds) of completed queries from `-v` output; with `keep`, only
    those whose query name `keep(name)` accepts."""
    out = []
    for line in text.splitlines():
        m = _VERBOSE_LINE.match(line)
        if m and (keep is None or keep(m.group(1))):
            out.append(float(m.group(2)))
    return out


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
