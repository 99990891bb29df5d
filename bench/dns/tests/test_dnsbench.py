"""Unit tests of the harness's pure parts. Run: python3 -m unittest discover -s bench/dns/tests"""

import json
import socket
import sys
import threading
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsbench import cpu, dnsperf, envoyadmin, fresh, freshload, report, sessions, wire  # noqa: E402,E501
from dnsbench import names as N  # noqa: E402

REPO = Path(__file__).resolve().parents[3]

SUMMARY = """\
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         120000
  Queries completed:    119990 (99.99%)
  Queries lost:         10 (0.01%)

  Response codes:       NOERROR 119980 (99.99%), NXDOMAIN 10 (0.01%)
  Average packet size:  request 45, response 61
  Run time (s):         2.000229
  Queries per second:   59988.25

  Average Latency (s):  0.000125 (min 0.000012, max 0.004143)
  Latency StdDev (s):   0.000042
"""


class Names(unittest.TestCase):
    def test_mix_of_kubernetes_and_service_entries(self):
        names = N.mesh_names(1000)
        self.assertEqual(len({n.fqdn for n in names}), 1000)
        k8s = [n for n in names if n.registry == "Kubernetes"]
        self.assertEqual(len(k8s), 800)
        self.assertTrue(all(n.fqdn.endswith(".svc.cluster.local") and n.shortname for n in k8s))
        se = [n for n in names if n.registry == "External"]
        self.assertTrue(all(1 <= len(n.ips) <= 3 for n in se))
        self.assertEqual(N.mesh_names(1000), names, "deterministic")

    def test_every_server_gets_the_same_names(self):
        names = N.mesh_names(10)
        table = N.vmesh_table(names, "v1")
        native = json.loads(N.native_envoy_config(names, 1, 2, 3))
        inline = (native["static_resources"]["listeners"][0]["listener_filters"][0]
                  ["typed_config"]["server_config"]["inline_dns_table"]["virtual_domains"])
        hosts = N.hosts_file((n.fqdn, n.ips) for n in names)
        for n in names:
            self.assertEqual(table["names"][n.fqdn]["ips"], list(n.ips))
            self.assertIn({"name": n.fqdn, "endpoint": {"address_list": {"address": list(n.ips)}},
                           "answer_ttl": "30s"}, inline)
            for ip in n.ips:
                self.assertIn(f"{ip} {n.fqdn}\n", hosts)

    def test_forwarded_names_are_not_mesh_names(self):
        mesh = {n.fqdn for n in N.mesh_names(10000)}
        self.assertFalse(mesh & {f for f, _ in N.forwarded_names(1000)})

    def test_mixed_query_file_share(self):
        lines = N.mixed_query_file(["a.test"], ["b.corp.test"], 0.1, 10000, seed=1).splitlines()
        share = sum(1 for ln in lines if N.is_forwarded(ln.split()[0])) / len(lines)
        self.assertAlmostEqual(share, 0.1, delta=0.01)

    def test_query_file_draws_from_the_list(self):
        lines = N.query_file(["a.test", "b.test"], 100, seed=1).splitlines()
        self.assertEqual(len(lines), 100)
        self.assertEqual(set(lines), {"a.test A", "b.test A"})

    def test_sidecar_render_replaces_every_port_and_the_wasm(self):
        text = (REPO / "envoy-configs/vm-sidecar.yaml").read_text()
        out = N.render_sidecar(text, "/x/f.wasm",
                               {"admin": 1001, "dns": 1002, "doh": 1003, "shim": 1004})
        for port in (15000, 15053, 15054, 15020):
            self.assertNotIn(f"port_value: {port}}}", out)
        for port in (1001, 1002, 1003, 1004):
            self.assertIn(f"port_value: {port}}}", out)
        self.assertNotIn(N.SIDECAR_WASM, out)
        self.assertIn("/x/f.wasm", out)

    def test_sidecar_render_fails_when_a_port_is_gone(self):
        with self.assertRaises(ValueError):
            N.render_sidecar("port_value: 15000}", "w", {"admin": 1, "dns": 2, "doh": 3,
                                                         "shim": 4})


class Dnsperf(unittest.TestCase):
    def test_summary(self):
        s = dnsperf.parse_summary(SUMMARY)
        self.assertEqual((s.sent, s.completed, s.lost), (120000, 119990, 10))
        self.assertEqual(s.rcodes, {"NOERROR": 119980, "NXDOMAIN": 10})
        self.assertAlmostEqual(s.qps, 59988.25)
        self.assertEqual((s.avg_latency, s.min_latency, s.max_latency),
                         (0.000125, 0.000012, 0.004143))

    def test_summary_without_statistics_is_an_error(self):
        with self.assertRaises(dnsperf.ParseError):
            dnsperf.parse_summary("Error: socket: Too many open files\n")

    def test_verbose_latencies_of_some_names(self):
        text = "> NOERROR a.svc.cluster.local A 0.0001\n> NOERROR host-1.corp.test A 0.002\n"
        self.assertEqual(dnsperf.latencies(text, lambda n: not N.is_forwarded(n)), [0.0001])

    def test_verbose_latencies(self):
        text = ("[Status] Sending queries\n> NOERROR a.test A 0.000128\n"
                "> NXDOMAIN b.test A 0.001000\n[Timeout] Query timed out: msg id 3\n")
        self.assertEqual(dnsperf.latencies(text), [0.000128, 0.001])

    def test_percentile_nearest_rank(self):
        values = list(range(1, 101))
        self.assertEqual(dnsperf.percentile(values, 50), 50)
        self.assertEqual(dnsperf.percentile(values, 99), 99)
        self.assertEqual(dnsperf.percentile(values, 100), 100)
        self.assertEqual(dnsperf.percentile([7], 99), 7)
        self.assertIsNone(dnsperf.percentile([], 50))

    def test_command(self):
        load = dnsperf.Load("tcp", 5, 16, 200, qps=1000, verbose=True)
        argv = dnsperf.command(5353, "q.txt", load)
        self.assertEqual(argv[:3], ["dnsperf", "-s", "127.0.0.1"])
        for flag, value in (("-p", "5353"), ("-m", "tcp"), ("-l", "5"), ("-c", "16"),
                            ("-q", "200"), ("-Q", "1000")):
            self.assertEqual(argv[argv.index(flag) + 1], value)
        self.assertIn("-v", argv)


class Wire(unittest.TestCase):
    def test_query_and_answer(self):
        q = wire.query("a.test", 0x1234)
        self.assertEqual(q[:2], b"\x12\x34")
        # The query echoed back as an answer with one A record pointing at the question name.
        answer = (b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:]
                  + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x04\x0a\x00\x00\x01")
        self.assertEqual(wire.parse(answer), (0x1234, 0, ["10.0.0.1"]))


class Cpu(unittest.TestCase):
    def test_proc_stat(self):
        busy, steal = cpu.parse_proc_stat(
            "cpu  100 5 50 1000 0 0 3 7 0 0\ncpu0 50 2 25 500 0 0 1 3 0 0\n")
        self.assertAlmostEqual(busy, 158 / cpu.TICK)
        self.assertAlmostEqual(steal, 7 / cpu.TICK)

    def test_pid_stat_with_spaces_in_the_name(self):
        line = "42 (a b) S 1 42 42 0 -1 4194560 0 0 0 0 10 20 3 4 20 0 1 0 1 1 1"
        self.assertAlmostEqual(cpu.parse_pid_stat(line), 37 / cpu.TICK)

    def test_interference(self):
        f = cpu.interference(cpu.Sample(10, 0, 5), cpu.Sample(12, 0.5, 6), 2.0, 2)
        self.assertEqual(f, {"other_cpu": 0.25, "steal": 0.125, "ours_cpu": 0.25})


def run(server, qps, lost=0, kind="max", p99=None, size=10, mix="owned", transport="udp",
        discarded=False):
    return {"kind": kind, "size": size, "mix": mix, "transport": transport, "rep": 0,
            "server": server, "qps": qps, "lost": lost, "sent": 100, "rcodes": {"NOERROR": 100},
            "p50": p99 and p99 / 2, "p99": p99, "offered_qps": 500 if kind == "latency" else None,
            "discarded": discarded}


class Report(unittest.TestCase):
    RUNS = [run("vmesh", 60), run("native", 100), run("dnsmasq", 120),
            run("vmesh", 70), run("native", 90), run("dnsmasq", 110),
            run("vmesh", 1, discarded=True),
            run("vmesh", 500, lost=2, kind="latency", p99=0.0003),
            run("native", 500, kind="latency", p99=0.0001),
            run("dnsmasq", 500, kind="latency", p99=0.0002)]

    def test_medians_ratios_and_targets(self):
        s = report.summarize(self.RUNS)
        (cell,) = s["max"]
        self.assertEqual(cell["servers"]["vmesh"]["qps"], 65)
        self.assertAlmostEqual(cell["vmesh_over_native"], 65 / 95)
        self.assertAlmostEqual(cell["vmesh_over_dnsmasq"], 65 / 115)
        rows = report.targets(s, self.RUNS, 221_027)
        verdict = {what: ok for what, _, ok in rows}
        self.assertTrue(verdict["owned UDP throughput >= 0.6x native, 10 names"])
        self.assertFalse(verdict["owned UDP p99 <= 2x native, 10 names, at 0.5x native max"])
        self.assertTrue(verdict["no lost vmesh queries at max load"])
        self.assertFalse(verdict["no lost vmesh queries at 0.5x native max"])
        self.assertTrue(verdict["vmesh_filter.wasm <= 250 KiB"])

    def test_ratio_within_each_repetition(self):
        runs = [dict(run("vmesh", 50), rep=0), dict(run("native", 100), rep=0),
                dict(run("vmesh", 90), rep=1), dict(run("native", 100), rep=1)]
        self.assertEqual(report.rep_ratios(runs, "max", (10, "owned", "udp"), "qps"), [0.5, 0.9])

    def test_markdown_has_every_cell(self):
        meta = {"command": "c", "date": "d", "nproc": 2, "cpu_model": "m", "kernel": "k",
                "versions": "v", "git": "g", "wasm_bytes": 1, "concurrency": 2, "reps": 2,
                "max_seconds": 6, "latency_seconds": 4, "latency_fraction": 0.5, "load": "l",
                "load_start": "0"}
        s = report.summarize(self.RUNS)
        md = report.markdown(meta, s, report.targets(s, self.RUNS, 1))
        self.assertIn("| 10 | owned | UDP | 65 | 95 | 115 | 0.68x | 0.57x | 0 / 0 / 0 |", md)
        self.assertIn("mixed: 10 %", report.markdown(meta, report.summarize(
            [dict(r, mix="mixed") for r in self.RUNS]), []))
        self.assertIn("| 10 | owned | UDP | 500 | 150 / 300 | 50 / 100 | 100 / 200 |", md)


class LoopbackServer:
    """A tiny server on loopback that answers (or ignores) every query."""

    def serve(self, answer: bool):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        stop = threading.Event()
        ports = set()

        def loop():
            while not stop.is_set():
                try:
                    msg, peer = sock.recvfrom(512)
                except socket.timeout:
                    continue
                ports.add(peer[1])
                if answer:  # QR set, same ID and question, no records: NOERROR
                    sock.sendto(msg[:2] + bytes([msg[2] | 0x80]) + msg[3:], peer)
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.addCleanup(lambda: (stop.set(), t.join(), sock.close()))
        return sock.getsockname()[1], ports


class FreshPortTest(LoopbackServer, unittest.TestCase):
    """fresh.run: one query at a time, each from a new socket."""

    def test_every_query_comes_from_a_new_source_port_and_is_timed(self):
        port, ports = self.serve(answer=True)
        got = fresh.run(port, ["a.example", "b.example"], 20, seed=1)
        self.assertEqual((len(got["latencies"]), got["lost"], got["wrong"]), (20, 0, 0))
        self.assertEqual(len(ports), 20)

    def test_unanswered_queries_count_as_lost(self):
        port, _ = self.serve(answer=False)
        got = fresh.run(port, ["a.example"], 3, seed=1, timeout=0.05)
        self.assertEqual((got["latencies"], got["lost"]), ([], 3))


class FreshLoadTest(LoopbackServer, unittest.TestCase):
    """freshload.run: a fixed rate of lookups, each from a new socket, open loop."""

    def test_schedule_spreads_lookups_evenly(self):
        self.assertEqual(freshload.schedule(4, 1.5), [0, 0.25, 0.5, 0.75, 1.0, 1.25])
        self.assertEqual(freshload.schedule(1000, 60)[-1], 59.999)
        self.assertEqual(len(freshload.schedule(1000, 60)), 60_000)

    def test_keeps_the_rate_from_new_ports_and_times_every_answer(self):
        port, ports = self.serve(answer=True)
        got = freshload.run(port, ["a.example"], rate=200, seconds=0.5, seed=1)
        self.assertEqual((got["sent"], got["answered"], got["lost"], got["wrong"]),
                         (100, 100, 0, 0))
        self.assertEqual(len(got["latencies"]), 100)
        self.assertGreater(len(ports), 50, "a new socket, so (mostly) a new port, per lookup")
        self.assertAlmostEqual(got["rate"], 200, delta=20)

    def test_unanswered_lookups_are_lost_after_the_timeout_without_stopping_the_rate(self):
        port, _ = self.serve(answer=False)
        got = freshload.run(port, ["a.example"], rate=100, seconds=0.3, seed=1, timeout=0.1)
        self.assertEqual((got["sent"], got["answered"], got["lost"]), (30, 0, 30))
        self.assertLess(got["peak_outstanding"], 30, "timed-out sockets were closed")


MEMORY = """{
 "allocated": "12326840",
 "heap_size": "50331648",
 "pageheap_unmapped": "0",
 "pageheap_free": "1000",
 "total_thread_cache": "2000",
 "total_physical_bytes": "60000000"
}"""

STATS = """cluster.vmesh_dns_udp_tunnel.upstream_cx_active: 11
udp.dns_udp.downstream_sess_active: 11
udp.dns_udp.downstream_sess_total: 140
udp.dns_udp.idle_timeout: 129
"""


class EnvoyAdmin(unittest.TestCase):
    def test_memory_fields_are_numbers(self):
        m = envoyadmin.parse_memory(MEMORY)
        self.assertEqual(m["allocated"], 12_326_840)
        self.assertEqual(m["heap_size"], 50_331_648)

    def test_session_stats_with_missing_ones_as_zero(self):
        got = envoyadmin.parse_stats(STATS, envoyadmin.SESSION_STATS)
        self.assertEqual(got, {"active": 11, "total": 140, "idle_timeout": 129,
                               "tunnel_cx_active": 11, "tunnel_overflow": 0})

    def test_filter_matches_exactly_the_wanted_stats(self):
        import re
        pattern = re.compile(envoyadmin.stats_filter(envoyadmin.SESSION_STATS))
        for name in envoyadmin.SESSION_STATS.values():
            self.assertTrue(pattern.search(name), name)
        for other in ("udp.dns_udp.downstream_sess_active_x", "xudp.dns_udp.idle_timeout",
                      "udp.dns_udpXdownstream_sess_total"):
            self.assertFalse(pattern.search(other), other)

    def test_the_stat_prefix_is_the_sidecars(self):
        text = (REPO / "envoy-configs/vm-sidecar.yaml").read_text()
        self.assertIn("stat_prefix: dns_udp\n", text)
        self.assertIn("- name: vmesh_dns_udp_tunnel\n", text)


def sample(t, allocated, active, total, expired=0, rss=None):
    return {"t": t, "memory": {"allocated": allocated},
            "sessions": {"active": active, "total": total, "idle_timeout": expired,
                         "tunnel_cx_active": active, "tunnel_overflow": 0}, "rss": rss}


class Sessions(unittest.TestCase):
    def test_variant_spec(self):
        v = sessions.parse_variant("before=/tmp/old.yaml,/tmp/old.wasm", REPO, Path("/w"))
        self.assertEqual((v.name, v.sidecar, v.wasm),
                         ("before", Path("/tmp/old.yaml"), Path("/tmp/old.wasm")))
        v = sessions.parse_variant("after=envoy-configs/vm-sidecar.yaml", REPO, Path("/w"))
        self.assertEqual((v.sidecar, v.wasm), (REPO / "envoy-configs/vm-sidecar.yaml",
                                               Path("/w")))
        for bad in ("noequals", "=x.yaml", "name="):
            with self.assertRaises(ValueError):
                sessions.parse_variant(bad, REPO, Path("/w"))

    def test_fresh_record_peak_growth_and_what_is_left(self):
        before = sample(0, 10_000_000, 0, 100, 100)
        during = [sample(1, 30_000_000, 500, 600, 100), sample(2, 45_000_000, 1000, 1100, 150),
                  sample(3, 44_000_000, 990, 2100, 1110)]
        after = sample(5, 10_500_000, 0, 3100, 3100)
        got = {"sent": 3000, "answered": 3000, "lost": 0, "wrong": 0, "rate": 1000.0,
               "latencies": [0.001] * 3000, "peak_outstanding": 3}
        r = sessions.fresh_record(before, during, after, got)
        self.assertEqual((r["growth"], r["left_after"]), (35_000_000, 500_000))
        self.assertEqual((r["peak_sessions"], r["sessions_created"], r["sessions_expired"]),
                         (1000, 3000, 3000))
        self.assertEqual(r["bytes_per_session"], 35_000)
        self.assertEqual(r["p50"], 0.001)

    def test_summary_ratio_and_targets(self):
        def fresh_run(server, growth, rep):
            return {"kind": "fresh", "mix": "owned", "rep": rep, "server": server,
                    "growth": growth, "left_after": 0, "heap_before": 1, "heap_peak": growth,
                    "peak_sessions": 10, "sessions_created": 10, "bytes_per_session": 1,
                    "p50": 0.001, "p99": 0.002, "rate": 1000.0, "envoy_cpu_us": 300.0,
                    "lost": 0, "sent": 100, "wrong": 0}

        def dnsperf_run(server, qps, rep):
            return {"kind": "persistent", "rep": rep, "server": server, "qps": qps, "lost": 0,
                    "sessions_created": 16}

        runs = [fresh_run("before", 300e6, 0), fresh_run("after", 35e6, 0),
                fresh_run("before", 290e6, 1), fresh_run("after", 70e6, 1),
                dnsperf_run("before", 100, 0), dnsperf_run("after", 90, 0),
                dnsperf_run("before", 100, 1), dnsperf_run("after", 110, 1)]
        s = sessions.summarize(runs, ["before", "after"])
        self.assertEqual(s["fresh"][("after", "owned")]["growth"], 52.5e6)
        self.assertEqual(s["fresh"][("after", "owned")]["growth_max"], 70e6)
        self.assertAlmostEqual(s["persistent"]["after"]["ratio"], 1.0)
        self.assertEqual(s["persistent"]["after"]["ratio_range"], (0.9, 1.1))
        meta = {"date": "d", "git": "g", "command": "c", "nproc": 2, "cpu_model": "m",
                "versions": "v", "concurrency": 2, "rate": 1000, "seconds": 60, "reps": 2,
                "clients": 16, "outstanding": 200, "dnsperf_seconds": 5,
                "variants": {"before": "b", "after": "a"}}
        md = sessions.markdown(meta, s, ["before", "after"])
        self.assertIn("| after | 100 | 1.00x (0.90–1.10) | 2 | 0 | 16 |", md)
        self.assertIn("| before | 300.0 MB (worst run) | **no** |", md)
        self.assertIn("| after | 70.0 MB (worst run) | **no** |", md)


if __name__ == "__main__":
    unittest.main()
