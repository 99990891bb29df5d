"""Latency as a glibc-style stub resolver sees it: one query at a time, each from a new UDP
socket (a new source port), so every query is a new client address to the server.

dnsperf keeps its sockets, so on vmesh every dnsperf query after the first rides an existing
udp_proxy session; a stub resolver's query instead opens a session (a tunnel connection and
its request head) inside Envoy first. The time measured runs from just before the send to
just after the answer is received; creating the socket is outside it. The client is Python:
its own cost per query is the same for every server and inflates all figures alike.
"""

from __future__ import annotations

import random
import socket
import time

from . import wire


def run(port: int, names: list[str], count: int, seed: int, timeout: float = 2.0) -> dict:
    """`count` sequential A queries for names drawn from `names`. Returns latencies in
    seconds (answered queries only), the number lost, and queries per second."""
    rng = random.Random(seed)
    latencies: list[float] = []
    lost = 0
    wrong = 0
    started = time.monotonic()
    for i in range(count):
        qid = (seed * 7919 + i) & 0xFFFF
        q = wire.query(rng.choice(names), qid)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            t0 = time.perf_counter()
            s.sendto(q, ("127.0.0.1", port))
            try:
                msg = s.recv(65535)
            except socket.timeout:
                lost += 1
                continue
            elapsed = time.perf_counter() - t0
        rid, rcode, _ = wire.parse(msg)
        if rid != qid or rcode != 0:
            wrong += 1
        latencies.append(elapsed)
    return {"latencies": latencies, "lost": lost, "wrong": wrong,
            "qps": count / max(time.monotonic() - started, 1e-9)}
