"""Sustained fresh-source-port load: `rate` lookups a second for `seconds`, each from a new UDP
socket, the way programs using glibc's stub resolver ask (one socket per lookup, closed after
the answer). `fresh.py` asks one query at a time for latency; this keeps a fixed rate whatever
the answers do (open loop), so the server sees a steady stream of new client addresses.

Every lookup's socket is registered with a selector until its answer arrives or `timeout`
passes (then it counts as lost). Latency runs from just before the send to the receive.
"""

from __future__ import annotations

import random
import resource
import selectors
import socket
import time

from . import wire


def schedule(rate: float, seconds: float) -> list[float]:
    """Send times, relative to the start, of `rate` lookups a second for `seconds`."""
    n = int(round(rate * seconds))
    return [i / rate for i in range(n)]


def raise_fd_limit(wanted: int) -> None:
    """Outstanding lookups each hold a socket; lift the soft limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(port: int, names: list[str], rate: float, seconds: float, seed: int,
        timeout: float = 2.0) -> dict:
    """Drives the load. Returns counts, latencies (seconds, answered lookups only), the rate
    really achieved and the most lookups outstanding at once."""
    raise_fd_limit(int(rate * timeout * 2) + 256)
    rng = random.Random(seed)
    sel = selectors.DefaultSelector()
    times = schedule(rate, seconds)
    latencies: list[float] = []
    lost = wrong = send_errors = 0
    peak_outstanding = 0
    # socket -> (query id, send time)
    outstanding: dict[socket.socket, tuple[int, float]] = {}
    start = time.monotonic()
    last_send = 0.0
    i = 0

    def close(s):
        sel.unregister(s)
        del outstanding[s]
        s.close()

    while i < len(times) or outstanding:
        now = time.monotonic() - start
        while i < len(times) and times[i] <= now:
            qid = (seed * 7919 + i) & 0xFFFF
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            t0 = time.perf_counter()
            try:
                s.sendto(wire.query(rng.choice(names), qid), ("127.0.0.1", port))
            except OSError:
                send_errors += 1
                s.close()
                i += 1
                continue
            outstanding[s] = (qid, t0)
            sel.register(s, selectors.EVENT_READ)
            last_send = time.monotonic() - start
            i += 1
        peak_outstanding = max(peak_outstanding, len(outstanding))
        wait = (times[i] - (time.monotonic() - start)) if i < len(times) else 0.05
        for key, _ in sel.select(timeout=max(0.0, min(wait, 0.05))):
            s = key.fileobj
            try:
                msg = s.recv(65535)
            except OSError:
                continue
            elapsed = time.perf_counter() - outstanding[s][1]
            try:
                rid, rcode, _ = wire.parse(msg)
            except ValueError:
                rid, rcode = -1, -1
            if rid != outstanding[s][0] or rcode != 0:
                wrong += 1
            latencies.append(elapsed)
            close(s)
        # Sent in time order and dicts keep insertion order: the oldest come first.
        deadline = time.perf_counter() - timeout
        expired = []
        for s, (_, t0) in outstanding.items():
            if t0 >= deadline:
                break
            expired.append(s)
        for s in expired:
            lost += 1
            close(s)
    wall = time.monotonic() - start
    sel.close()
    return {"sent": len(times) - send_errors, "answered": len(latencies), "lost": lost,
            "wrong": wrong, "send_errors": send_errors, "latencies": latencies,
            "rate": (len(times) - 1) / last_send if last_send > 0 else 0.0,
            "peak_outstanding": peak_outstanding, "wall": wall}
