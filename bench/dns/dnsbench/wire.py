"""Just enough DNS wire format to check, before measuring, that a server gives the right
answers: build an A query, read the rcode and the A records of a response."""

from __future__ import annotations

import socket
import struct


def query(name: str, qid: int, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD set, one question
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def _skip_name(msg: bytes, off: int) -> int:
    while True:
        if off >= len(msg):
            raise ValueError("name runs past the message")
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def parse(msg: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A-record addresses) of a response."""
    if len(msg) < 12:
        raise ValueError("short DNS message")
    qid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    addrs = []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(msg[off:off + 4]))
        off += rdlen
    return qid, flags & 0xF, addrs


def ask(port: int, name: str, tcp: bool = False, timeout: float = 2.0,
        qid: int = 0x4242) -> tuple[int, list[str]]:
    """Asks 127.0.0.1:`port` for `name` A; returns (rcode, addresses). Raises on timeout.
    Over TCP the write side stays open until the answer is read."""
    q = query(name, qid)
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            raw = b""
            while len(raw) < 2 or len(raw) < 2 + struct.unpack("!H", raw[:2])[0]:
                chunk = s.recv(65535)
                if not chunk:
                    raise ConnectionError("TCP connection closed before the answer")
                raw += chunk
            msg = raw[2:2 + struct.unpack("!H", raw[:2])[0]]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(q, ("127.0.0.1", port))
            msg = s.recv(65535)
    rid, rcode, addrs = parse(msg)
    if rid != qid:
        raise ValueError(f"answer id {rid:#x} for query id {qid:#x}")
    return rcode, addrs
