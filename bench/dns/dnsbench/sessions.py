"""What fresh-source-port clients cost vmesh's Envoy in memory, and what persistent clients
get in throughput: `bench/dns/sessions.sh`.

Each udp_proxy session is an internal HTTP/1.1 tunnel inside Envoy, held until the session has
been idle for udp_proxy's `idle_timeout`. A glibc-style client asks every lookup from a new
socket, so every lookup is a new session. This drives `--rate` such lookups a second for
`--seconds` (`freshload.py`) and reads Envoy's admin endpoint twice a second meanwhile: heap
(`/memory` "allocated") before, at its peak and after the sessions have expired, and the
session counters. Then dnsperf's 16 kept sockets measure what a persistent client gets
(queries a second, and how many sessions it needed).

Several variants (a sidecar config and a filter build each, `--variant`) run side by side,
each its own Envoy + shim, idle while another is measured; every measurement is interleaved
across variants, the starting variant rotating per repetition. The first variant is the
baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import cpu, dnsperf, envoyadmin, freshload, servers
from . import names as N
from .main import machine_meta_basic
from .procs import Ports, Procs

QUERY_LINES = 100_000
# The bound: heap growth at 1,000 fresh-port lookups a second sustained for a minute.
TARGET_GROWTH_BYTES = 64_000_000


@dataclass(frozen=True)
class Variant:
    name: str
    sidecar: Path
    wasm: Path


def parse_variant(text: str, repo: Path, default_wasm: Path) -> Variant:
    """`NAME=SIDECAR[,WASM]`: a sidecar config (and optionally a filter build) to measure."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: want NAME=SIDECAR[,WASM]")
    sidecar, _, wasm = rest.partition(",")
    resolve = (lambda p: Path(p) if Path(p).is_absolute() else repo / p)
    return Variant(name, resolve(sidecar), resolve(wasm) if wasm else default_wasm)


def describe(v: Variant, repo: Path) -> str:
    where = lambda p: p.relative_to(repo) if p.is_relative_to(repo) else p  # noqa: E731
    return f"`{where(v.sidecar)}`, filter `{where(v.wasm)}` ({v.wasm.stat().st_size:,} bytes)"


def parse_args(argv, repo: Path, default_wasm: Path):
    p = argparse.ArgumentParser(prog="bench/dns/sessions.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=SIDECAR[,WASM] (repeatable; paths relative to the repo; default "
                        "current=envoy-configs/vm-sidecar.yaml with the built filter). The "
                        "first is the baseline of the ratios.")
    p.add_argument("--rate", type=float, default=1000.0, help="fresh-port lookups a second")
    p.add_argument("--seconds", type=float, default=60.0, help="length of a fresh-port run")
    p.add_argument("--mixes", default="owned,forwarded",
                   help="fresh-port runs for mesh names (owned) and/or upstream names "
                        "(forwarded); empty for none (only the persistent-client runs)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dnsperf-runs", type=int, default=2,
                   help="persistent-client dnsperf runs per variant per repetition")
    p.add_argument("--dnsperf-seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=16, help="dnsperf -c (sockets kept open)")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--concurrency", type=int, default=2, help="Envoy --concurrency")
    p.add_argument("--names", type=int, default=1000, help="mesh names in the table")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="a fresh-port lookup unanswered this long counts as lost")
    p.add_argument("--drain-patience", type=float, default=40.0,
                   help="seconds to wait for a run's sessions to expire")
    p.add_argument("--noise-limit", type=float, default=0.25,
                   help="before each measurement, wait until other processes use less than "
                        "this fraction of the machine's CPU")
    p.add_argument("--wait-budget", type=float, default=900.0,
                   help="seconds the whole run may spend waiting for a quiet machine; then "
                        "it measures anyway (each run records how busy the machine was)")
    p.add_argument("--out", default=None, help="results directory (default bench/dns/results)")
    a = p.parse_args(argv)
    a.mixes = [m for m in a.mixes.split(",") if m]
    if any(m not in ("owned", "forwarded") for m in a.mixes):
        p.error(f"--mixes {a.mixes}: owned and/or forwarded (empty: persistent runs only)")
    specs = a.variant or [f"current=envoy-configs/vm-sidecar.yaml,{default_wasm}"]
    a.variants = [parse_variant(v, repo, default_wasm) for v in specs]
    if len({v.name for v in a.variants}) != len(a.variants):
        p.error("variant names must differ")
    return a


class Sampler:
    """Reads Envoy's admin endpoint every `period` seconds on its own thread (so the load's
    pacing does not wait for it) until stopped."""

    def __init__(self, admin: int, pid: int | None, period: float = 0.5):
        self.admin, self.pid, self.period = admin, pid, period
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def _loop(self):
        while not self._stop.is_set():
            self.take()
            self._stop.wait(self.period)

    def take(self) -> dict:
        s = envoyadmin.sample(self.admin, self.pid)
        s["t"] = round(time.monotonic() - self._t0, 2)
        self.samples.append(s)
        return s

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak(samples: list[dict]) -> dict:
    """The sample with the most heap allocated."""
    return max(samples, key=lambda s: s["memory"]["allocated"])


def fresh_record(before: dict, samples: list[dict], after: dict, got: dict) -> dict:
    """One fresh-port run's figures from its samples and the load's result (pure)."""
    top = peak(samples + [after])
    lat = sorted(got["latencies"])
    alloc = lambda s: s["memory"]["allocated"]  # noqa: E731
    sess = lambda s, k: s["sessions"][k]  # noqa: E731
    rec = {
        "sent": got["sent"], "answered": got["answered"], "lost": got["lost"],
        "wrong": got["wrong"], "rate": round(got["rate"], 1),
        "heap_before": alloc(before), "heap_peak": alloc(top), "heap_after": alloc(after),
        "growth": alloc(top) - alloc(before), "left_after": alloc(after) - alloc(before),
        "peak_sessions": max(sess(s, "active") for s in samples + [after]),
        "sessions_created": sess(after, "total") - sess(before, "total"),
        "sessions_expired": sess(after, "idle_timeout") - sess(before, "idle_timeout"),
        "tunnel_overflow": sess(after, "tunnel_overflow") - sess(before, "tunnel_overflow"),
        "rss_before": before.get("rss"), "rss_peak": max((s.get("rss") or 0) for s in samples),
        "peak_outstanding": got["peak_outstanding"],
        "timeline": [(s["t"], alloc(s), sess(s, "active")) for s in samples],
    }
    if lat:
        rec.update(p50=dnsperf.percentile(lat, 50), p99=dnsperf.percentile(lat, 99),
                   p999=dnsperf.percentile(lat, 99.9))
    grown = rec["peak_sessions"] - sess(before, "active")
    if grown > 0:
        rec["bytes_per_session"] = round(rec["growth"] / grown)
    return rec


class Bench:
    def __init__(self, args, repo: Path, work: Path):
        self.args, self.repo, self.work = args, repo, work
        self.procs, self.ports = Procs(), Ports()
        self.runs: list[dict] = []
        self.ncpu = os.cpu_count() or 1
        self.waited = 0.0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def pids(self):
        return [pid for p in self.procs.running for pid in p.group_pids()]

    def wait_quiet(self) -> None:
        """Waits (within the run's budget) until other processes use less than the noise
        limit over a 2 s window: another engineer's build halves what a run measures."""
        start = time.monotonic()
        try:
            while self.waited + (time.monotonic() - start) < self.args.wait_budget:
                s0 = cpu.sample(self.pids())
                time.sleep(2.0)
                other = cpu.interference(s0, cpu.sample(self.pids()), 2.0, self.ncpu)
                if other["other_cpu"] < self.args.noise_limit:
                    return
                self.log(f"  other processes use {other['other_cpu']:.0%} of the CPU; waiting")
            self.log("  wait budget spent; measuring on a busy machine")
        finally:
            self.waited += time.monotonic() - start

    def wait_drained(self, server, what: str) -> dict:
        """Waits until the server holds no UDP sessions (those of a previous run expired)."""
        deadline = time.monotonic() + self.args.drain_patience
        while True:
            s = envoyadmin.sample(server.admin, server.procs[0].server_pid())
            if s["sessions"]["active"] == 0 or time.monotonic() > deadline:
                if s["sessions"]["active"]:
                    self.log(f"  {server.name}: {s['sessions']['active']} sessions still "
                             f"live {what}")
                return s
            time.sleep(0.25)

    def fresh(self, server, mix: str, names: list[str], rep: int) -> None:
        a = self.args
        pid = server.procs[0].server_pid()
        self.wait_drained(server, "before the run")
        self.wait_quiet()
        before = self.wait_drained(server, "before the run")
        envoy0 = cpu.pids_cpu(server.procs[0].group_pids())
        s0, t0 = cpu.sample(self.pids()), time.monotonic()
        with Sampler(server.admin, pid) as sampler:
            got = freshload.run(server.port, names, a.rate, a.seconds, seed=rep + 1,
                                timeout=a.timeout)
            noise = cpu.interference(s0, cpu.sample(self.pids()), time.monotonic() - t0,
                                     self.ncpu)
            envoy_cpu = cpu.pids_cpu(server.procs[0].group_pids()) - envoy0
            after = self.wait_drained(server, "after the run")
        rec = fresh_record(before, sampler.samples, after, got)
        rec.update(kind="fresh", mix=mix, rep=rep, server=server.name, **noise)
        if got["answered"]:
            rec["envoy_cpu_us"] = round(envoy_cpu / got["answered"] * 1e6, 1)
        self.runs.append(rec)
        self.log(f"  fresh {mix:9} rep{rep} {server.name:8} heap {rec['heap_before'] / 1e6:.1f}"
                 f" -> peak {rec['heap_peak'] / 1e6:.1f} -> {rec['heap_after'] / 1e6:.1f} MB, "
                 f"peak {rec['peak_sessions']} sessions, p50 {rec.get('p50', 0) * 1e6:.0f}us "
                 f"p99 {rec.get('p99', 0) * 1e6:.0f}us, lost {rec['lost']} "
                 f"(other CPU {noise['other_cpu']:.0%})")

    def persistent(self, server, datafile: Path, rep: int) -> None:
        a = self.args
        load = dnsperf.Load("udp", a.dnsperf_seconds, a.clients, a.outstanding)
        self.wait_quiet()
        before = envoyadmin.sample(server.admin, None)["sessions"]
        s0, t0 = cpu.sample(self.pids()), time.monotonic()
        out = subprocess.run(dnsperf.command(server.port, str(datafile), load),
                             capture_output=True, text=True, check=False,
                             timeout=a.dnsperf_seconds + 60).stdout
        noise = cpu.interference(s0, cpu.sample(self.pids()), time.monotonic() - t0, self.ncpu)
        after = envoyadmin.sample(server.admin, None)["sessions"]
        summary = dnsperf.parse_summary(out)
        rec = {"kind": "persistent", "rep": rep, "server": server.name,
               "qps": round(summary.qps, 1), "sent": summary.sent,
               "completed": summary.completed, "lost": summary.lost, "rcodes": summary.rcodes,
               "sessions_created": after["total"] - before["total"], **noise}
        self.runs.append(rec)
        self.log(f"  dnsperf rep{rep} {server.name:8} {summary.qps:9.0f} q/s, lost "
                 f"{summary.lost}, {rec['sessions_created']} new sessions "
                 f"(other CPU {noise['other_cpu']:.0%})")

    def run(self, shim: Path):
        a = self.args
        forwarded = N.forwarded_names(1000)
        mesh = N.mesh_names(a.names)
        upstream = servers.start_upstream(self.procs, self.ports, self.work, forwarded)
        started = []
        for v in a.variants:
            self.log(f"starting {v.name}: {v.sidecar} with {v.wasm}")
            s = servers.start_vmesh(self.procs, self.ports, self.work, self.repo, mesh,
                                    upstream, a.concurrency, v.wasm, shim, sidecar=v.sidecar,
                                    name=v.name)
            servers.verify(s, mesh, forwarded)
            started.append(s)
        owned = self.work / "owned.queries"
        owned.write_text(N.query_file([n.fqdn for n in mesh], QUERY_LINES, seed=3))
        names = {"owned": [n.fqdn for n in mesh], "forwarded": [f for f, _ in forwarded]}
        for rep in range(a.reps):
            k = rep % len(started)
            order = started[k:] + started[:k]
            for mix in a.mixes:
                for s in order:
                    self.fresh(s, mix, names[mix], rep)
            for i in range(a.dnsperf_runs):
                for s in (order if i % 2 == 0 else order[::-1]):
                    self.persistent(s, owned, rep)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Medians per variant (and mix), and each variant's persistent throughput over the
    first's, with the range of that ratio over the runs paired by repetition and order."""
    fresh = {}
    mixes = list(dict.fromkeys(r["mix"] for r in runs if r["kind"] == "fresh"))
    for v in variants:
        for mix in mixes:
            rs = [r for r in runs if r["kind"] == "fresh" and r["server"] == v
                  and r["mix"] == mix]
            if not rs:
                continue
            fresh[(v, mix)] = {
                k: median([r.get(k) for r in rs])
                for k in ("growth", "left_after", "heap_before", "heap_peak", "peak_sessions",
                          "sessions_created", "bytes_per_session", "p50", "p99", "rate",
                          "envoy_cpu_us")}
            fresh[(v, mix)].update(
                growth_max=max(r["growth"] for r in rs), runs=len(rs),
                lost=sum(r["lost"] for r in rs), sent=sum(r["sent"] for r in rs),
                wrong=sum(r["wrong"] for r in rs))
    persistent = {}
    base = variants[0]
    for v in variants:
        rs = [r for r in runs if r["kind"] == "persistent" and r["server"] == v]
        if not rs:
            continue
        entry = {"qps": median([r["qps"] for r in rs]), "runs": len(rs),
                 "lost": sum(r["lost"] for r in rs),
                 "sessions_created": median([r["sessions_created"] for r in rs])}
        b = [r for r in runs if r["kind"] == "persistent" and r["server"] == base]
        if v != base and b:
            paired = [x["qps"] / y["qps"] for x, y in zip(rs, b) if y["qps"]]
            entry["ratio"] = entry["qps"] / persistent[base]["qps"]
            entry["ratio_range"] = (min(paired), max(paired)) if paired else None
        persistent[v] = entry
    return {"fresh": fresh, "persistent": persistent}


def markdown(meta: dict, summary: dict, variants: list[str]) -> str:
    out = [f"### Fresh-port sessions ({meta['date']}, git {meta['git']})", "",
           f"`{meta['command']}`; {meta['nproc']} CPUs ({meta['cpu_model']}), "
           f"{meta['versions']}; Envoy --concurrency {meta['concurrency']}. "
           + (f"Fresh-port runs: {meta['rate']:g} lookups/s for {meta['seconds']:g} s, each "
              f"from a new UDP socket. " if summary["fresh"] else "")
           + f"{meta['reps']} repetitions, variants interleaved. Other processes used a median of {meta.get('other_cpu_median', '?')} of the CPU "
           f"(max {meta.get('other_cpu_max', '?')}).", ""]
    for v in variants:
        out.append(f"- **{v}**: {meta['variants'][v]}")
    if summary["fresh"]:
        out += fresh_table(summary)
    out += ["", f"Persistent clients (dnsperf -c {meta['clients']} -q {meta['outstanding']}, "
            f"{meta['dnsperf_seconds']:g} s runs without a rate limit, mesh names, UDP):", "",
            f"| variant | q/s (median) | vs {variants[0]} (range over paired runs) | runs | "
            "lost | new sessions per run |", "|---|---:|---:|---:|---:|---:|"]
    for v, c in summary["persistent"].items():
        ratio = (f"{c['ratio']:.2f}x ({c['ratio_range'][0]:.2f}–{c['ratio_range'][1]:.2f})"
                 if c.get("ratio") and c.get("ratio_range") else "–")
        out.append(f"| {v} | {c['qps']:,.0f} | {ratio} | {c['runs']} | {c['lost']} | "
                   f"{c['sessions_created']:g} |")
    if summary["fresh"]:
        out += ["", "| target | variant | measured | met |", "|---|---|---|---|"]
        for (v, mix), c in summary["fresh"].items():
            out.append(f"| heap growth <= 64 MB at {meta['rate']:g} fresh ports/s for "
                       f"{meta['seconds']:g} s, {mix} | {v} | {c['growth_max'] / 1e6:.1f} MB "
                       f"(worst run) | "
                       f"{'yes' if c['growth_max'] <= TARGET_GROWTH_BYTES else '**no**'} |")
    if meta.get("failed"):
        out += ["", f"**The run failed**: {meta['failed']}"]
    return "\n".join(out) + "\n"


def fresh_table(summary: dict) -> list[str]:
    mb = lambda b: "–" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
    us = lambda s: "–" if s is None else f"{s * 1e6:.0f}"  # noqa: E731
    out = ["", "| variant | names | heap before MB | peak MB | growth MB (max) | after − "
            "before MB | peak sessions | bytes/session | sessions created | p50 / p99 µs | "
            "lost / sent | Envoy CPU µs/lookup |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (v, mix), c in summary["fresh"].items():
        out.append(
            f"| {v} | {mix} | {mb(c['heap_before'])} | {mb(c['heap_peak'])} | "
            f"{mb(c['growth'])} ({mb(c['growth_max'])}) | {mb(c['left_after'])} | "
            f"{c['peak_sessions']:,.0f} | {c['bytes_per_session'] or 0:,.0f} | "
            f"{c['sessions_created']:,.0f} | {us(c['p50'])} / {us(c['p99'])} | "
            f"{c['lost']} / {c['sent']:,} | {c['envoy_cpu_us'] or '–'} |")
    out += ["", "Medians over the repetitions. Heap is `/memory` \"allocated\" (bytes Envoy's "
            "code holds), read twice a second; \"after\" is read once the run's sessions have "
            "expired."]
    return out


def rerender(path: Path) -> int:
    """Prints the markdown of an earlier results file again (after a report change)."""
    data = json.loads(path.read_text())
    variants = list(data["meta"]["variants"])
    print(markdown(data["meta"], summarize(data["runs"], variants), variants), end="")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--report":
        return rerender(Path(argv[1]))
    here = Path(__file__).resolve().parent.parent
    repo = here.parent.parent
    wasm = repo / "target/wasm32-wasip1/release/vmesh_filter.wasm"
    shim = repo / "target/release/vmesh-shim"
    args = parse_args(argv, repo, wasm)
    for path in [shim] + [v.wasm for v in args.variants] + [v.sidecar for v in args.variants]:
        if not path.exists():
            sys.exit(f"{path} is missing (build with scripts/build.sh)")
    out_dir = Path(args.out) if args.out else here / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine_meta_basic(repo, argv, "bench/dns/sessions.sh")
    meta.update(concurrency=args.concurrency, reps=args.reps, rate=args.rate,
                seconds=args.seconds, clients=args.clients, outstanding=args.outstanding,
                dnsperf_seconds=args.dnsperf_seconds,
                variants={v.name: describe(v, repo) for v in args.variants})
    work = Path(tempfile.mkdtemp(prefix="vmesh-sessions-"))
    bench = Bench(args, repo, work)
    failed = None
    try:
        bench.run(shim)
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as e:  # reported with whatever was measured
        failed = f"{type(e).__name__}: {e}"
    finally:
        bench.procs.stop_all()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    others = sorted(r["other_cpu"] for r in bench.runs)
    if others:
        meta["other_cpu_median"] = f"{median(others):.0%}"
        meta["other_cpu_max"] = f"{others[-1]:.0%}"
    meta["waited_s"] = round(bench.waited)
    if failed:
        meta["failed"] = failed
    names = [v.name for v in args.variants]
    summary = summarize(bench.runs, names)
    md = markdown(meta, summary, names)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"sessions-{stamp}-c{args.concurrency}"
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": {"fresh": {f"{v} {m}": c for (v, m), c in
                                             summary["fresh"].items()},
                                   "persistent": summary["persistent"]},
         "runs": bench.runs}, indent=1) + "\n")
    base.with_suffix(".md").write_text(md)
    print(md)
    bench.log(f"results: {base}.json and .md")
    if failed:
        bench.log(f"FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
