"""The DNS benchmark run: servers up, cells measured with servers interleaved, results out.

For each table size the three servers (vmesh, native dns_filter, dnsmasq) run side by side,
idle except for the one being measured. Each cell (size x mix x transport) is measured `reps`
times, servers interleaved within each repetition (the starting server rotates per repetition
so none is always first), first at maximum throughput, then at a fixed rate for latency.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cpu, dnsperf, fresh, report, servers
from . import names as N
from .procs import Ports, Procs

QUERY_LINES = 100_000
FORWARDED_NAMES = 1_000


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/dns/run.sh", description=__doc__,
        epilog="bench/dns/run.sh --no-build --report FILE.json prints an earlier run's "
               "markdown again.")
    p.add_argument("--quick", action="store_true",
                   help="1,000 names only, shorter runs (about 5 minutes)")
    p.add_argument("--concurrency", type=int, default=2, help="Envoy --concurrency (both)")
    p.add_argument("--sizes", default=None, help="name table sizes (default 10,1000,10000)")
    p.add_argument("--mixes", default="owned,forwarded",
                   help="owned, forwarded, mixed (10 %% forwarded: shows what a pending "
                        "forward does to mesh answers on the same client socket)")
    p.add_argument("--light-qps", type=int, default=2000,
                   help="extra latency runs at this fixed, light rate (0 = none)")
    p.add_argument("--light-sizes", default="1000",
                   help="table sizes that get the light-rate latency runs")
    p.add_argument("--fresh-queries", type=int, default=2000,
                   help="queries per run of the fresh-source-port latency runs, one at a time "
                        "from a new UDP socket each, like a glibc stub resolver (0 = none; "
                        "run for the --light-sizes tables)")
    p.add_argument("--transports", default="udp,tcp")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="dnsperf -l of a throughput run (default 5, quick 3)")
    p.add_argument("--latency-seconds", type=float, default=None,
                   help="dnsperf -l of a latency run (default 3, quick 2)")
    p.add_argument("--latency-fraction", type=float, default=0.5,
                   help="latency runs offer this fraction of the native UDP maximum")
    p.add_argument("--clients", type=int, default=16, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--threads", type=int, default=1, help="dnsperf -T")
    p.add_argument("--queries-per-conn", type=int, default=None,
                   help="TCP: dnsperf -O num-queries-per-conn for every server (default: "
                        "100 against dnsmasq, which closes a connection after 100 queries "
                        "and drops what is pipelined behind; never for the Envoys)")
    p.add_argument("--noise-limit", type=float, default=0.25,
                   help="repeat a run if other processes used more than this fraction of "
                        "the machine's CPU during it")
    p.add_argument("--retries", type=int, default=2, help="repeats per run for interference")
    p.add_argument("--wait-budget", type=float, default=None,
                   help="seconds the whole run may spend waiting for a quiet machine; once "
                        "spent, noisy runs are kept (and their noise reported)")
    p.add_argument("--out", default=None, help="results directory (default bench/dns/results)")
    p.add_argument("--keep-work", action="store_true", help="keep configs and logs")
    a = p.parse_args(argv)
    a.sizes = [int(x) for x in (a.sizes or ("1000" if a.quick else "10,1000,10000")).split(",")]
    a.mixes = a.mixes.split(",")
    a.light_sizes = [int(x) for x in a.light_sizes.split(",") if x]
    a.transports = a.transports.split(",")
    a.max_seconds = a.max_seconds or (3.0 if a.quick else 5.0)
    a.latency_seconds = a.latency_seconds or (2.0 if a.quick else 3.0)
    if a.wait_budget is None:
        a.wait_budget = 60.0 if a.quick else 150.0
    return a


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_meta_basic(repo: Path, argv, prog: str) -> dict:
    """The machine, tool versions and git state a run measured."""
    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu_model = m.group(1) if m else cpu_model
    envoy = re.search(r"version: \w+/(\d+\.\d+\.\d+)/", _run(["envoy", "--version"]))
    dnsperf_v = re.search(r"Version (\S+)", _run(["sh", "-c", "dnsperf -h 2>&1"]))
    dnsmasq_v = re.search(r"version (\S+)", _run([servers.DNSMASQ, "--version"]))
    git = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    if _run(["git", "-C", str(repo), "status", "--porcelain", "--", "core", "filter", "shim",
             "envoy-configs"]):
        git += " (+ uncommitted changes)"
    return {
        "command": prog + ("" if not argv else " " + shlex.join(argv)),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "versions": (f"Envoy {envoy.group(1) if envoy else '?'}, "
                     f"dnsperf {dnsperf_v.group(1) if dnsperf_v else '?'}, "
                     f"dnsmasq {dnsmasq_v.group(1) if dnsmasq_v else '?'}, "
                     f"{_run(['rustc', '--version'])}"),
        "git": git,
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_meta(repo: Path, wasm: Path, args, argv) -> dict:
    return {
        **machine_meta_basic(repo, argv, "bench/dns/run.sh"),
        "wasm_bytes": wasm.stat().st_size,
        "concurrency": args.concurrency,
        "reps": args.reps,
        "max_seconds": args.max_seconds,
        "latency_seconds": args.latency_seconds,
        "latency_fraction": args.latency_fraction,
        "light_qps": args.light_qps,
        "fresh_queries": args.fresh_queries,
        "load": (f"-c {args.clients} -T {args.threads} -q {args.outstanding}, TCP "
                 + (f"with -O num-queries-per-conn={args.queries_per_conn}"
                    if args.queries_per_conn is not None else
                    "connections kept open, except -O num-queries-per-conn=100 against "
                    "dnsmasq") + ", "
                 f"throughput runs without -Q, latency runs with -Q and -v"),
    }


def upstream_of(server, upstream, record) -> list:
    """The upstream's process when this run forwards through it."""
    return upstream.procs if upstream and record["mix"] != "owned" else []


class Bench:
    def __init__(self, args, repo: Path, work: Path):
        self.args = args
        self.repo = repo
        self.work = work
        self.procs = Procs()
        self.ports = Ports()
        self.runs: list[dict] = []
        self.ncpu = os.cpu_count() or 1
        self.waited = 0.0
        self.upstream = None
        self.dnsperf_failures = 0

    def pids(self):
        return [pid for p in self.procs.running for pid in p.group_pids()]

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def budget_left(self) -> float:
        return self.args.wait_budget - self.waited

    def wait_quiet(self, max_wait: float = 90.0) -> float:
        """Waits (within the run's wait budget) until other processes use less than the noise
        limit, measured over 2 s windows. Returns the last window's other-CPU fraction."""
        start = time.monotonic()
        try:
            while True:
                s0 = cpu.sample(self.pids())
                time.sleep(2.0)
                f = cpu.interference(s0, cpu.sample(self.pids()), 2.0, self.ncpu)
                spent = time.monotonic() - start
                if f["other_cpu"] < self.args.noise_limit:
                    return f["other_cpu"]
                if spent > max_wait or self.waited + spent > self.args.wait_budget:
                    self.log(f"machine still busy (other CPU {f['other_cpu']:.0%}); going on")
                    return f["other_cpu"]
                if spent < 2.5 or int(spent) % 20 < 2:
                    self.log(f"other processes use {f['other_cpu']:.0%} of the CPU; waiting")
        finally:
            self.waited += time.monotonic() - start

    def measure(self, server, datafile: Path, load: dnsperf.Load, record: dict,
                upstream=None) -> dict:
        """One dnsperf run. Repeated (the noisy run kept but marked discarded) when other
        processes used more CPU than the noise limit, and when dnsperf itself failed."""
        attempt = -1
        while True:
            attempt += 1
            out = self.work / "dnsperf.out"
            count_before = (servers.dnsmasq_udp_answered(upstream.procs[0])
                            if upstream else None)
            watched = server.procs + (upstream_of(server, self.upstream, record))
            per0 = {p.name: cpu.pids_cpu(p.group_pids()) for p in watched}
            client0 = cpu.children_cpu()
            s0, t0 = cpu.sample(self.pids()), time.monotonic()
            with open(out, "w") as f:
                subprocess.run(dnsperf.command(server.port, str(datafile), load), stdout=f,
                               stderr=subprocess.STDOUT, check=False,
                               timeout=load.seconds + load.timeout + 60)
            wall = time.monotonic() - t0
            noise = cpu.interference(s0, cpu.sample(self.pids()), wall, self.ncpu)
            client = cpu.children_cpu() - client0
            # A dnsmasq TCP child that exited during the run took its CPU time with it unless
            # dnsmasq reaped it (then it is in dnsmasq's cutime): the TCP figures are a floor.
            per = {p.name: cpu.pids_cpu(p.group_pids()) - per0[p.name] for p in watched}
            text = out.read_text(errors="replace")
            try:
                summary = dnsperf.parse_summary(text)
            except dnsperf.ParseError as e:
                # dnsperf 2.10 in TCP mode sometimes dies on its own reconnect ("failed to
                # receive packet: Bad file descriptor") when the server closes at the same
                # moment; such a run has no result. Try again, a few times.
                self.dnsperf_failures += 1
                errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
                self.log(f"  dnsperf against {server.name} gave no result ({errors or e}); "
                         "running it again")
                if self.dnsperf_failures > 20:
                    raise RuntimeError(f"dnsperf keeps failing: {e}\n{text[-2000:]}")
                continue
            lat = sorted(dnsperf.latencies(text)) if load.verbose else []
            owned_lat = (sorted(dnsperf.latencies(text, lambda n: not N.is_forwarded(n)))
                         if load.verbose and record["mix"] == "mixed" else [])
            run = dict(record, server=server.name, attempt=attempt, qps=round(summary.qps, 1),
                       sent=summary.sent, completed=summary.completed, lost=summary.lost,
                       interrupted=summary.interrupted, rcodes=summary.rcodes,
                       avg=summary.avg_latency, max_latency=summary.max_latency,
                       offered_qps=load.qps, tcp_queries_per_conn=load.queries_per_conn,
                       load1=round(os.getloadavg()[0], 2), **noise)
            if summary.completed:
                # CPU time per answered query, by process: where the cost is.
                run["cpu_us_per_query"] = {
                    name: round(sec / summary.completed * 1e6, 2)
                    for name, sec in {**per, "dnsperf": client}.items()}
            if lat:
                run.update(p50=dnsperf.percentile(lat, 50), p90=dnsperf.percentile(lat, 90),
                           p99=dnsperf.percentile(lat, 99), p999=dnsperf.percentile(lat, 99.9))
            if owned_lat:
                run.update(owned_p50=dnsperf.percentile(owned_lat, 50),
                           owned_p99=dnsperf.percentile(owned_lat, 99))
            if upstream and count_before is not None:
                after = servers.dnsmasq_udp_answered(upstream.procs[0])
                run["upstream_answered"] = None if after is None else after - count_before
            bad = {k: v for k, v in summary.rcodes.items() if k != "NOERROR"}
            if bad:
                self.log(f"  !! {server.name} answered {bad}: the setup is wrong")
            noisy_runs = sum(1 for r in self.runs if r["discarded"] and all(
                r[k] == record[k] for k in record) and r["server"] == server.name)
            retry = (noise["other_cpu"] > self.args.noise_limit
                     and noisy_runs < self.args.retries and self.budget_left() > 0)
            run["discarded"] = retry
            self.runs.append(run)
            p = (f" p50 {run['p50'] * 1e6:.0f}us p99 {run['p99'] * 1e6:.0f}us"
                 if lat else "")
            self.log(f"  {record['kind']:7} {record['size']:>5} {record['mix']:9} "
                     f"{record['transport']} rep{record['rep']} {server.name:7} "
                     f"{summary.qps:9.0f} q/s lost {summary.lost}{p} "
                     f"(other CPU {noise['other_cpu']:.0%}{', repeating' if retry else ''})")
            if not retry:
                return run
            self.wait_quiet()

    def cell(self, kind, size, mix, transport, servers_here, datafile, qps, upstream):
        a = self.args
        seconds = a.max_seconds if kind == "max" else a.latency_seconds
        for rep in range(a.reps):
            k = rep % len(servers_here)
            for server in servers_here[k:] + servers_here[:k]:
                per_conn = (a.queries_per_conn if a.queries_per_conn is not None
                            else server.tcp_queries_per_conn)
                load = dnsperf.Load(transport, seconds, a.clients, a.outstanding, a.threads,
                                    qps=qps, verbose=(kind != "max"),
                                    queries_per_conn=per_conn or None)
                record = {"kind": kind, "size": size, "mix": mix, "transport": transport,
                          "rep": rep}
                self.measure(server, datafile, load, record,
                             upstream if (mix != "owned" and transport == "udp") else None)

    def fresh_cell(self, size, mix, servers_here, names):
        """Fresh-source-port latency runs, servers interleaved like the dnsperf cells."""
        for rep in range(self.args.reps):
            k = rep % len(servers_here)
            for server in servers_here[k:] + servers_here[:k]:
                s0, t0 = cpu.sample(self.pids()), time.monotonic()
                got = fresh.run(server.port, names, self.args.fresh_queries, seed=rep + 1)
                noise = cpu.interference(s0, cpu.sample(self.pids()), time.monotonic() - t0,
                                         self.ncpu)
                lat = sorted(got["latencies"])
                run = {"kind": "fresh", "size": size, "mix": mix, "transport": "udp",
                       "rep": rep, "server": server.name, "attempt": 0,
                       "qps": round(got["qps"], 1), "sent": self.args.fresh_queries,
                       "completed": len(lat), "lost": got["lost"], "discarded": False,
                       "rcodes": {"NOERROR": len(lat) - got["wrong"], "WRONG": got["wrong"]},
                       "load1": round(os.getloadavg()[0], 2), **noise}
                if got["wrong"]:
                    self.log(f"  !! {server.name} gave {got['wrong']} wrong answers")
                if lat:
                    run.update(p50=dnsperf.percentile(lat, 50), p90=dnsperf.percentile(lat, 90),
                               p99=dnsperf.percentile(lat, 99),
                               p999=dnsperf.percentile(lat, 99.9))
                self.runs.append(run)
                self.log(f"  fresh   {size:>5} {mix:9} udp rep{rep} {server.name:7} "
                         f"p50 {run.get('p50', 0) * 1e6:.0f}us p99 {run.get('p99', 0) * 1e6:.0f}us"
                         f" lost {got['lost']}")

    def native_max(self, size, mix):
        qps = [r["qps"] for r in self.runs if r["kind"] == "max" and r["size"] == size
               and r["mix"] == mix and r["server"] == "native" and not r["discarded"]]
        if not qps:
            qps = [r["qps"] for r in self.runs if r["kind"] == "max" and r["size"] == size
                   and r["mix"] == mix and not r["discarded"]]
        return report.median(qps)

    def run(self, wasm: Path, shim: Path):
        a = self.args
        forwarded = N.forwarded_names(FORWARDED_NAMES)
        fwd_queries = self.work / "forwarded.queries"
        fwd_queries.write_text(N.query_file([f for f, _ in forwarded], QUERY_LINES, seed=7))
        upstream = servers.start_upstream(self.procs, self.ports, self.work, forwarded)
        self.upstream = upstream
        for size in a.sizes:
            mesh = N.mesh_names(size)
            owned_queries = self.work / f"owned-{size}.queries"
            owned_queries.write_text(N.query_file([n.fqdn for n in mesh], QUERY_LINES, seed=3))
            mixed_queries = self.work / f"mixed-{size}.queries"
            mixed_queries.write_text(N.mixed_query_file(
                [n.fqdn for n in mesh], [f for f, _ in forwarded], 0.1, QUERY_LINES, seed=5))
            self.log(f"{size} names: starting vmesh, native dns_filter and dnsmasq")
            started = []
            try:
                started.append(servers.start_vmesh(self.procs, self.ports, self.work, self.repo,
                                                   mesh, upstream, a.concurrency, wasm, shim))
                started.append(servers.start_native(self.procs, self.ports, self.work, mesh,
                                                    upstream, a.concurrency))
                started.append(servers.start_dnsmasq(self.procs, self.ports, self.work, mesh,
                                                     upstream))
                for s in started:
                    servers.verify(s, mesh, forwarded)
                self.log(f"{size} names: every server answers correctly; other CPU "
                         f"{self.wait_quiet():.0%}")
                for mix in a.mixes:
                    data = {"owned": owned_queries, "forwarded": fwd_queries,
                            "mixed": mixed_queries}[mix]
                    for transport in a.transports:
                        here = [s for s in started if transport in s.transports]
                        self.cell("max", size, mix, transport, here, data, None, upstream)
                    base = self.native_max(size, mix)
                    rate = int(base * a.latency_fraction) if base else None
                    for transport in a.transports:
                        here = [s for s in started if transport in s.transports]
                        self.cell("latency", size, mix, transport, here, data, rate, upstream)
                    if a.light_qps and size in a.light_sizes:
                        for transport in a.transports:
                            here = [s for s in started if transport in s.transports]
                            self.cell("light", size, mix, transport, here, data, a.light_qps,
                                      upstream)
                    if a.fresh_queries and size in a.light_sizes and mix != "mixed":
                        names = ([n.fqdn for n in mesh] if mix == "owned"
                                 else [f for f, _ in forwarded])
                        self.fresh_cell(size, mix, started, names)
            finally:
                for s in started:
                    for p in s.procs:
                        self.procs.stop(p)


def rerender(path: Path) -> int:
    """Prints the markdown of an earlier results file again (after a report change)."""
    data = json.loads(path.read_text())
    summary = report.summarize(data["runs"])
    rows = report.targets(summary, data["runs"], data["meta"]["wasm_bytes"])
    md = report.markdown(data["meta"], summary, rows, data["runs"])
    print(md)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--report":
        return rerender(Path(argv[1]))
    args = parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    repo = here.parent.parent
    wasm = repo / "target/wasm32-wasip1/release/vmesh_filter.wasm"
    shim = repo / "target/release/vmesh-shim"
    for path, build in ((wasm, "cargo build --release --target wasm32-wasip1 -p vmesh-filter"),
                        (shim, "cargo build --release -p vmesh-shim")):
        if not path.exists():
            sys.exit(f"{path} is missing: {build}")
    out_dir = Path(args.out) if args.out else here / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine_meta(repo, wasm, args, argv)
    work = Path(tempfile.mkdtemp(prefix="vmesh-dnsbench-"))
    bench = Bench(args, repo, work)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    started = time.monotonic()
    failed = None
    try:
        bench.run(wasm, shim)
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as e:  # reported below with whatever was measured
        failed = f"{type(e).__name__}: {e}"
    finally:
        bench.procs.stop_all()
        if not args.keep_work:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["minutes"] = round((time.monotonic() - started) / 60, 1)
    kept = [r for r in bench.runs if not r["discarded"]]
    others = sorted(r["other_cpu"] for r in kept)
    if others:
        meta["other_cpu_median"] = f"{report.median(others):.0%}"
        meta["other_cpu_max"] = f"{others[-1]:.0%}"
    meta["discarded"] = len(bench.runs) - len(kept)
    meta["waited_s"] = round(bench.waited)
    meta["dnsperf_failures"] = bench.dnsperf_failures
    if failed:
        meta["failed"] = failed
    summary = report.summarize(bench.runs)
    target_rows = report.targets(summary, bench.runs, meta["wasm_bytes"])
    md = report.markdown(meta, summary, target_rows, bench.runs)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"dns-{stamp}-c{args.concurrency}{'-quick' if args.quick else ''}"
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "targets": target_rows, "runs": bench.runs},
        indent=1) + "\n")
    base.with_suffix(".md").write_text(md)
    print(md)
    bench.log(f"results: {base}.json and .md ({meta['minutes']} min)"
              + (f"; work dir kept: {work}" if args.keep_work else ""))
    if failed:
        bench.log(f"FAILED: {failed}")
        return 1
    return 0
