"""From the list of run records to medians, same-run ratios, target verdicts and markdown.

A run record is a dict written by the harness: size, mix, transport, kind ("max", "latency"
or "light"), rep, server, qps, lost, p50/p99 (latency runs), discarded (a run repeated because
other processes used too much CPU during it; kept for the record, left out of medians).
"""

from __future__ import annotations

import statistics
from pathlib import Path

SERVERS = ("vmesh", "native", "dnsmasq")
TARGET_UDP_RATIO = 0.6
TARGET_P99_RATIO = 2.0
# One budget for the filter's size, read by scripts/test.sh too: 250 KiB.
TARGET_WASM_BYTES = int((Path(__file__).resolve().parents[3] / "filter" / "wasm-size-budget").read_text())


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _kept(runs):
    return [r for r in runs if not r.get("discarded")]


def cells(runs, kind):
    """Ordered distinct (size, mix, transport) of runs of `kind`."""
    seen = []
    for r in _kept(runs):
        key = (r["size"], r["mix"], r["transport"])
        if r["kind"] == kind and key not in seen:
            seen.append(key)
    return seen


def cell_stats(runs, kind, key):
    """Per server: medians of qps/p50/p99, lost summed, reps counted, for one cell."""
    size, mix, transport = key
    out = {}
    for server in SERVERS:
        rs = [r for r in _kept(runs) if r["kind"] == kind and r["size"] == size
              and r["mix"] == mix and r["transport"] == transport and r["server"] == server]
        if not rs:
            continue
        out[server] = {
            "qps": median([r["qps"] for r in rs]),
            "p50": median([r.get("p50") for r in rs]),
            "p99": median([r.get("p99") for r in rs]),
            "owned_p50": median([r.get("owned_p50") for r in rs]),
            "owned_p99": median([r.get("owned_p99") for r in rs]),
            "lost": sum(r["lost"] for r in rs),
            "sent": sum(r["sent"] for r in rs),
            "reps": len(rs),
            "qps_all": [r["qps"] for r in rs],
            "offered": rs[0].get("offered_qps"),
            "cpu_us": {name: median([r.get("cpu_us_per_query", {}).get(name) for r in rs])
                       for name in rs[0].get("cpu_us_per_query", {})},
            "bad_rcodes": sum(v for r in rs for k, v in r["rcodes"].items() if k != "NOERROR"),
        }
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def rep_ratios(runs, kind, key, field):
    """vmesh/native of `field` within each repetition (the two ran minutes apart at most)."""
    by_rep = {}
    for r in _kept(runs):
        if r["kind"] == kind and (r["size"], r["mix"], r["transport"]) == key:
            by_rep.setdefault(r["rep"], {})[r["server"]] = r.get(field)
    out = [ratio(x.get("vmesh"), x.get("native")) for _, x in sorted(by_rep.items())]
    return [round(v, 3) for v in out if v is not None]


def _spread(values):
    return f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""


KINDS = ("max", "latency", "light", "fresh")


def summarize(runs):
    summary = {kind: [] for kind in KINDS}
    for kind in KINDS:
        for key in cells(runs, kind):
            st = cell_stats(runs, kind, key)
            v, n, d = (st.get(s, {}) for s in SERVERS)
            field = "qps" if kind == "max" else "p99"
            per_rep = rep_ratios(runs, kind, key, field)
            summary[kind].append({
                "size": key[0], "mix": key[1], "transport": key[2], "servers": st,
                "rep_ratios_vmesh_over_native": per_rep,
                "vmesh_over_native": ratio(v.get(field), n.get(field)),
                "vmesh_over_dnsmasq": ratio(v.get(field), d.get(field)),
                "p50_vmesh_over_native": ratio(v.get("p50"), n.get("p50")),
            })
    return summary


def targets(summary, runs, wasm_bytes):
    """Each issue target with the numbers that decide it."""
    out = []
    for c in summary["max"]:
        if c["mix"] == "owned" and c["transport"] == "udp" and c["vmesh_over_native"]:
            r = c["vmesh_over_native"]
            out.append((f"owned UDP throughput >= {TARGET_UDP_RATIO}x native, {c['size']} names",
                        f"{r:.2f}x", r >= TARGET_UDP_RATIO))
    for kind, where in (("latency", "at 0.5x native max"), ("light", "at the light rate"),
                        ("fresh", "one query at a time, new source port each")):
        for c in summary.get(kind, []):
            if c["transport"] == "udp" and c["vmesh_over_native"]:
                r = c["vmesh_over_native"]
                out.append((f"{c['mix']} UDP p99 <= {TARGET_P99_RATIO:g}x native, "
                            f"{c['size']} names, {where}", f"{r:.2f}x", r <= TARGET_P99_RATIO))
    vm = [r for r in _kept(runs) if r["server"] == "vmesh"]
    for kind, label in (("max", "at max load"), ("latency", "at 0.5x native max"),
                        ("light", "at the light rate"), ("fresh", "from fresh source ports")):
        rs = [r for r in vm if r["kind"] == kind]
        if not rs:
            continue
        lost, sent = sum(r["lost"] for r in rs), sum(r["sent"] for r in rs)
        where = sorted({f"{r['size']}/{r['mix']}/{r['transport']}" for r in rs if r["lost"]})
        detail = f"{lost} of {sent}" + (f" ({', '.join(where)})" if where else "")
        out.append((f"no lost vmesh queries {label}", detail, lost == 0))
    out.append((f"vmesh_filter.wasm <= {TARGET_WASM_BYTES // 1024} KiB",
                f"{wasm_bytes} bytes", wasm_bytes <= TARGET_WASM_BYTES))
    return out


def _q(v):
    return "–" if v is None else f"{v:,.0f}"


def _us(v):
    return "–" if v is None else f"{v * 1e6:,.0f}"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def _lost(st):
    return " / ".join(str(st[s]["lost"]) if s in st else "–" for s in SERVERS)


def latency_table(rows):
    L = ["| names | mix | transport | rate q/s | vmesh p50 / p99 | native p50 / p99 "
         "| dnsmasq p50 / p99 | p50 v/n | p99 v/n | p99 v/d | lost v / n / d |",
         "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in rows:
        st = c["servers"]

        def pp(s):
            x = st.get(s)
            if not x:
                return "–"
            # A server that could not keep up with the offered rate measured its own queue.
            behind = x["offered"] and x["qps"] < 0.95 * x["offered"]
            text = f"{_us(x['p50'])} / {_us(x['p99'])}" + (" †" if behind else "")
            if x.get("owned_p50") is not None:
                text += f" [{_us(x['owned_p50'])} / {_us(x['owned_p99'])}]"
            return text
        offered = next((x["offered"] for x in st.values() if x.get("offered")), None)
        L.append(f"| {c['size']:,} | {c['mix']} | {c['transport'].upper()} | {_q(offered)} "
                 f"| {pp('vmesh')} | {pp('native')} | {pp('dnsmasq')} "
                 f"| {_x(c['p50_vmesh_over_native'])} | {_x(c['vmesh_over_native'])}"
                 f"{_spread(c['rep_ratios_vmesh_over_native'])} "
                 f"| {_x(c['vmesh_over_dnsmasq'])} | {_lost(st)} |")
    return L


def markdown(meta, summary, target_rows, runs=()):
    L = []
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Machine: {meta['nproc']} CPUs, {meta['cpu_model']}, kernel {meta['kernel']}  ")
    L.append(f"Versions: {meta['versions']}  ")
    L.append(f"vmesh: git {meta['git']}, vmesh_filter.wasm {meta['wasm_bytes']} bytes  ")
    L.append(f"Envoy --concurrency {meta['concurrency']} (both Envoys). dnsperf: "
             f"{meta['load']}  ")
    L.append(f"Load average at start / end: {meta['load_start']} / {meta.get('load_end', '?')}; "
             f"CPU used by other processes during the kept runs: median "
             f"{meta.get('other_cpu_median', '?')}, max {meta.get('other_cpu_max', '?')} of the "
             f"machine; runs repeated for interference: {meta.get('discarded', 0)} "
             f"(waited {meta.get('waited_s', 0)} s for a quieter machine)  ")
    if meta.get("failed"):
        L.append(f"**Incomplete run: {meta['failed']}**  ")
    L.append("")
    L.append("### Maximum throughput (queries/s, median of "
             f"{meta['reps']} interleaved runs of {meta['max_seconds']:g} s; in brackets the "
             "range of the vmesh/native ratio within each repetition)")
    L.append("")
    L.append("| names | mix | transport | vmesh | native dns_filter | dnsmasq "
             "| vmesh/native | vmesh/dnsmasq | lost v / n / d |")
    L.append("|---:|---|---|---:|---:|---:|---:|---:|---|")
    for c in summary["max"]:
        st = c["servers"]
        L.append(f"| {c['size']:,} | {c['mix']} | {c['transport'].upper()} "
                 f"| {_q(st.get('vmesh', {}).get('qps'))} | {_q(st.get('native', {}).get('qps'))} "
                 f"| {_q(st.get('dnsmasq', {}).get('qps'))} | {_x(c['vmesh_over_native'])}"
                 f"{_spread(c['rep_ratios_vmesh_over_native'])} "
                 f"| {_x(c['vmesh_over_dnsmasq'])} | {_lost(st)} |")
    L.append("")
    L.append("### CPU time per answered query at maximum throughput (µs, median)")
    L.append("")
    L.append("Per process, from /proc/<pid>/stat over each run. `upstream` is the dnsmasq that "
             "knows the forwarded names; dnsperf (the client) shares the same 2 cores.")
    L.append("")
    L.append("| names | mix | transport | vmesh: Envoy + shim + upstream | native: Envoy + "
             "upstream | dnsmasq: dnsmasq + upstream | dnsperf per query v / n / d |")
    L.append("|---:|---|---|---:|---:|---:|---|")
    for c in summary["max"]:
        st = c["servers"]

        def parts(server, names):
            x = st.get(server)
            if not x:
                return "–"
            vals = [x["cpu_us"].get(n) for n in names]
            shown = [f"{v:.1f}" for v in vals if v is not None]
            total = sum(v for v in vals if v is not None)
            return " + ".join(shown) + (f" = {total:.1f}" if len(shown) > 1 else "")

        def client(server):
            x = st.get(server)
            v = x and x["cpu_us"].get("dnsperf")
            return "–" if v is None else f"{v:.1f}"
        up = ["upstream-dnsmasq"] if c["mix"] != "owned" else []
        L.append(f"| {c['size']:,} | {c['mix']} | {c['transport'].upper()} "
                 f"| {parts('vmesh', ['vmesh-envoy', 'vmesh-shim'] + up)} "
                 f"| {parts('native', ['native-envoy'] + up)} "
                 f"| {parts('dnsmasq', ['dnsmasq'] + up)} "
                 f"| {' / '.join(client(s) for s in SERVERS)} |")
    L.append("")
    L.append(f"### Latency at a fixed rate (µs, median of {meta['reps']} runs of "
             f"{meta['latency_seconds']:g} s; rate = {meta['latency_fraction']:g} x the native "
             "UDP maximum of the same names and mix)")
    L.append("")
    L += latency_table(summary["latency"])
    if summary.get("light"):
        L.append("")
        L.append(f"### Latency at a light fixed rate (µs, median of {meta['reps']} runs of "
                 f"{meta['latency_seconds']:g} s at {meta.get('light_qps')} q/s)")
        L.append("")
        L += latency_table(summary["light"])
    if summary.get("fresh"):
        L.append("")
        L.append(f"### Latency of one query at a time, each from a new source port (µs, median "
                 f"of {meta['reps']} runs of {meta.get('fresh_queries')} queries; like a glibc "
                 "stub resolver)")
        L.append("")
        L += latency_table(summary["fresh"])
    L.append("")
    L.append("† the server answered under 95 % of the offered rate: its latency includes its own "
             "queue.  ")
    if any(c["mix"] == "mixed" for k in ("latency", "light") for c in summary.get(k, [])):
        L.append("mixed: 10 % forwarded names; in brackets the p50 / p99 of the mesh-name "
                 "answers alone.")
    L.append("")
    checks = []
    for server in SERVERS:
        seen = [r["upstream_answered"] / r["completed"] for r in _kept(runs)
                if r["server"] == server and r.get("upstream_answered") is not None
                and r["completed"] and r["mix"] == "forwarded"]
        if seen:
            checks.append(f"{server} {median(seen):.2f}")
    if checks:
        L.append("No cache in front of the upstream: UDP queries the upstream answered per "
                 "forwarded query completed (median; 1.00 = every query really forwarded): "
                 + ", ".join(checks) + ".")
        L.append("")
    L.append("### Targets")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for what, value, ok in target_rows:
        L.append(f"| {what} | {value} | {'yes' if ok else '**no**'} |")
    return "\n".join(L) + "\n"
