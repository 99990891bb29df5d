"""Starting the servers under test on 127.0.0.1 and checking their answers before measuring.

- upstream: dnsmasq knowing only the forwarded names (the VM's "system resolver");
- vmesh: Envoy with envoy-configs/vm-sidecar.yaml on free ports, plus vmesh-shim serving the
  generated name table and forwarding to the upstream;
- native: Envoy with only the native UDP `dns_filter`, same names inline, c-ares forwarding to
  the upstream;
- dnsmasq: the same names from a hosts file, every other name forwarded to the upstream.
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import names as N
from . import wire
from .procs import Proc, Procs, Ports, eventually, http_get

DNSMASQ = "/usr/sbin/dnsmasq"


@dataclass
class Server:
    name: str  # "vmesh", "native", "dnsmasq"
    port: int
    transports: tuple[str, ...]
    procs: list[Proc]
    admin: int | None = None
    # dnsmasq closes a TCP connection after 100 queries (its TCP_MAX_QUERIES) and drops what
    # is pipelined behind; a client talking to it must reconnect that often.
    tcp_queries_per_conn: int | None = None


def _dnsmasq_argv(port: int, log: Path, extra: list[str]) -> list[str]:
    return [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--port={port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--pid-file=",
            f"--log-facility={log}", *extra]


def start_upstream(procs: Procs, ports: Ports, work: Path, forwarded) -> Server:
    hosts = work / "upstream.hosts"
    hosts.write_text(N.hosts_file((f, (ip,)) for f, ip in forwarded))
    port = ports.take()
    # --local=/#/: unknown names get NXDOMAIN here instead of going anywhere else. Answers carry
    # dnsmasq's default local TTL of 0, so no forwarder in front can serve them from a cache.
    p = procs.start("upstream-dnsmasq", _dnsmasq_argv(
        port, work / "upstream-dnsmasq.log",
        [f"--addn-hosts={hosts}", "--local=/#/", "--dns-forward-max=1000"]),
        work / "upstream-dnsmasq.out")
    s = Server("upstream", port, ("udp", "tcp"), [p])
    name, ip = forwarded[0]
    eventually("upstream dnsmasq answers", lambda: _expect(s.port, name, {ip}, False), proc=p)
    return s


def start_dnsmasq(procs: Procs, ports: Ports, work: Path, mesh, upstream: Server) -> Server:
    hosts = work / "mesh.hosts"
    hosts.write_text(N.hosts_file((n.fqdn, n.ips) for n in mesh))
    port = ports.take()
    # cache-size=0: like the two Envoys, forward every non-mesh query (hosts entries stay).
    p = procs.start("dnsmasq", _dnsmasq_argv(
        port, work / "dnsmasq.log",
        [f"--addn-hosts={hosts}", f"--server=127.0.0.1#{upstream.port}", "--cache-size=0",
         f"--local-ttl={N.MESH_TTL}", "--dns-forward-max=1000"]),
        work / "dnsmasq.out")
    s = Server("dnsmasq", port, ("udp", "tcp"), [p], tcp_queries_per_conn=100)
    eventually("dnsmasq answers", lambda: _expect(port, mesh[0].fqdn, set(mesh[0].ips), False),
               proc=p)
    return s


def _envoy_argv(config: Path, concurrency: int) -> list[str]:
    return ["envoy", "-c", str(config), "--concurrency", str(concurrency),
            "--disable-hot-restart", "-l", "warning"]


def _wait_live(admin: int, proc: Proc, patience: float = 60.0):
    def live():
        status, body = http_get(admin, "/ready")
        if status != 200 or body.strip() != "LIVE":
            raise RuntimeError(f"/ready: {status} {body.strip()}")
    eventually("envoy is LIVE", live, patience, proc)


def start_native(procs: Procs, ports: Ports, work: Path, mesh, upstream: Server,
                 concurrency: int) -> Server:
    admin, dns = ports.take(), ports.take()
    config = work / "native-envoy.json"
    config.write_text(N.native_envoy_config(mesh, admin, dns, upstream.port))
    p = procs.start("native-envoy", _envoy_argv(config, concurrency),
                    work / "native-envoy.log")
    _wait_live(admin, p)
    return Server("native", dns, ("udp",), [p], admin)


def start_vmesh(procs: Procs, ports: Ports, work: Path, repo: Path, mesh, upstream: Server,
                concurrency: int, wasm: Path, shim_bin: Path, sidecar: Path | None = None,
                name: str = "vmesh") -> Server:
    """`sidecar` replaces envoy-configs/vm-sidecar.yaml (to compare configurations); `name`
    tells several vmesh instances of one run apart."""
    admin, dns, doh, shim_port = ports.take(), ports.take(), ports.take(), ports.take()
    table = work / f"{name}-names.json"
    table.write_text(json.dumps(N.vmesh_table(mesh, f"bench-{len(mesh)}")))
    shim = procs.start(f"{name}-shim", [
        str(shim_bin), "--listen", f"127.0.0.1:{shim_port}", "--static-names", str(table),
        "--upstream", f"127.0.0.1:{upstream.port}", "--self-addr", f"127.0.0.1:{dns}",
        "--log-level", "warn"], work / f"{name}-shim.log")

    def healthz():
        status, _ = http_get(shim_port, "/healthz")
        if status != 200:
            raise RuntimeError(f"/healthz {status}")
    eventually("shim /healthz", healthz, proc=shim)

    config = work / f"{name}-envoy.yaml"
    text = (sidecar or repo / "envoy-configs" / "vm-sidecar.yaml").read_text()
    # The sidecar reads the VM's certificate through SDS files the shim writes in control-plane
    # mode; Envoy refuses to start without them, and the DNS path needs none: empty stand-ins
    # in the work dir, as the end-to-end tests make (tests/src/support/envoy.rs).
    certs = work / f"{name}-certs"
    certs.mkdir(exist_ok=True)
    for f in ("sds-default.yaml", "sds-rootca.yaml"):
        (certs / f).touch()
    text = text.replace("/var/lib/vmesh/certs", str(certs))
    config.write_text(N.render_sidecar(text, str(wasm),
                                       {"admin": admin, "dns": dns, "doh": doh,
                                        "shim": shim_port}))
    envoy = procs.start(f"{name}-envoy", _envoy_argv(config, concurrency),
                        work / f"{name}-envoy.log")
    _wait_live(admin, envoy)
    s = Server(name, dns, ("udp", "tcp"), [envoy, shim], admin)

    # The table reaches each worker VM separately, and each DNS root of a VM takes it on its
    # own tick (the UDP root may tick faster than the TCP root): ask over both transports from
    # many source ports, since the kernel spreads clients over the workers' sockets by
    # address hash.
    probe = mesh[len(mesh) // 2]

    def every_worker():
        for i in range(4 * max(concurrency, 1)):
            for tcp in (False, True):
                _expect(dns, probe.fqdn, set(probe.ips), tcp, qid=i + 1)
    eventually("the name table reaches every vmesh worker", every_worker, 60.0, envoy)
    return s


def _expect(port: int, name: str, ips: set[str], tcp: bool, qid: int = 0x4242):
    rcode, got = wire.ask(port, name, tcp, timeout=1.0, qid=qid)
    if rcode != 0 or set(got) != ips:
        raise RuntimeError(f"{name}: rcode {rcode} {sorted(got)}, want {sorted(ips)}")


def verify(server: Server, mesh, forwarded, samples: int = 40) -> None:
    """Every transport of `server` answers a sample of mesh and forwarded names correctly."""
    step = max(1, len(mesh) // samples)
    for tcp in [t == "tcp" for t in server.transports]:
        for n in mesh[::step]:
            _expect(server.port, n.fqdn, set(n.ips), tcp)
        for f, ip in forwarded[:: max(1, len(forwarded) // 10)]:
            _expect(server.port, f, {ip}, tcp)


def dnsmasq_udp_answered(proc: Proc) -> int | None:
    """The parent dnsmasq's 'queries answered locally' counter (UDP only: TCP queries are
    answered in forked children, whose counters die with them), via SIGUSR1 to its log."""
    log = Path(re.sub(r"^--log-facility=", "", next(
        a for a in proc.popen.args if a.startswith("--log-facility="))))
    before = log.read_text(errors="replace") if log.exists() else ""
    proc.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 2.0
    pattern = re.compile(r"queries answered locally (\d+)")
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = pattern.findall(text[len(before):])
        if found:
            return int(found[-1])
        time.sleep(0.05)
    return None
