"""Child processes that cannot outlive the benchmark.

Each server runs in its own process group (dnsmasq forks a child per TCP connection, and those
must go too), started by a small `sh` that holds a parent-death signal and, when it gets it,
kills its whole group. A plain `setpriv --pdeathsig` on the server is not enough: dnsmasq
changes its credentials at start, which clears the parent-death signal. So even a SIGKILLed
harness leaves nothing behind. `Procs.stop_all` ends every group this harness started, by id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path):
        self.name = name
        self.log = log
        self._out = open(log, "wb")
        # The guard shell is the group leader; TERM (from us, or as parent-death signal) makes
        # it kill the group, the server and any children it forked included.
        guard = 'trap "kill -KILL 0" TERM INT HUP; "$@" & wait'
        self.popen = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", "sh", "-c", guard, "sh", *argv],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session: the guard shell leads the group

    def group_pids(self) -> list[int]:
        """Every live process of this server's group (the server, its forked children)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == self.pgid:
                pids.append(int(entry))
        return pids

    def alive(self) -> bool:
        return self.popen.poll() is None

    def server_pid(self) -> int | None:
        """The server itself: the guard shell's child."""
        try:
            with open(f"/proc/{self.pgid}/task/{self.pgid}/children") as f:
                kids = f.read().split()
            return int(kids[0]) if kids else None
        except OSError:
            return None

    def signal(self, sig: int) -> None:
        pid = self.server_pid()
        if pid:
            os.kill(pid, sig)

    def stop(self, grace: float = 3.0) -> None:
        pgid = self.pgid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
                # Forked TCP children of dnsmasq may still be in the group.
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process started, stopped in reverse order."""

    def __init__(self):
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], log: Path) -> Proc:
        p = Proc(name, argv, log)
        self.running.append(p)
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.running:
            self.running.remove(p)

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1])


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


class Ports:
    """Distinct free ports for one run (a port handed out once is never handed out again)."""

    def __init__(self):
        self.used: set[int] = set()

    def take(self) -> int:
        while True:
            p = free_port()
            if p not in self.used:
                self.used.add(p)
                return p


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def eventually(what: str, check, patience: float = 30.0, proc: Proc | None = None):
    """Retries `check()` (returns a value or raises) until it succeeds or `patience` runs out."""
    deadline = time.monotonic() + patience
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for: {what}\n{proc.tail()}")
        try:
            return check()
        except Exception as e:  # the reason is reported if patience runs out
            last = e
            time.sleep(0.1)
    tail = f"\n--- {proc.name} log ---\n{proc.tail()}" if proc else ""
    raise RuntimeError(f"timed out waiting for: {what} (last: {last}){tail}")
