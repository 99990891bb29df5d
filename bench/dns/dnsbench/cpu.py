"""How much CPU something other than this benchmark used during a measurement.

The machine is shared (other engineers compile on it), so every run records the CPU time the
whole machine spent in user+system (/proc/stat) minus what the benchmark's own processes spent
(/proc/<pid>/stat for the servers, os.times() for the harness and the dnsperf it waited for).
The rest is "other" CPU: a direct measure of interference, better than the load average, which
counts the benchmark itself. It is approximate (the kernel attributes some packet work to
whichever process happens to run); hypervisor steal is reported separately.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def parse_proc_stat(text: str) -> tuple[float, float]:
    """(busy seconds, steal seconds) summed over all CPUs, from /proc/stat. Busy is
    user+nice+system+irq+softirq: softirq work (loopback packet processing) done in a
    process's context is charged to that process's stime too, so leaving it out would make
    the benchmark's own processes look bigger than the machine's busy time."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]] + [0] * 8
            user, nice, system, irq, softirq, steal = f[0], f[1], f[2], f[5], f[6], f[7]
            return (user + nice + system + irq + softirq) / TICK, steal / TICK
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_pid_stat(text: str) -> float:
    """utime+stime+cutime+cstime seconds of one process (its reaped children included)."""
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    return sum(int(x) for x in fields[11:15]) / TICK


def pids_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes (each with its reaped children)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                total += parse_pid_stat(f.read())
        except (OSError, ValueError):
            pass  # exited between listing and reading
    return total


def children_cpu() -> float:
    """CPU of this harness's reaped children (dnsperf runs)."""
    t = os.times()
    return t.children_user + t.children_system


@dataclass
class Sample:
    busy: float
    steal: float
    ours: float


def sample(pids: list[int]) -> Sample:
    with open("/proc/stat") as f:
        busy, steal = parse_proc_stat(f.read())
    ours = pids_cpu(pids)
    t = os.times()
    ours += t.user + t.system + t.children_user + t.children_system
    return Sample(busy, steal, ours)


def interference(before: Sample, after: Sample, wall: float, ncpu: int) -> dict:
    """Other processes' and steal CPU as fractions of the machine's capacity over `wall`."""
    cap = max(wall * ncpu, 1e-9)
    other = max(0.0, (after.busy - before.busy) - (after.ours - before.ours))
    return {"other_cpu": round(other / cap, 3),
            "steal": round((after.steal - before.steal) / cap, 3),
            "ours_cpu": round((after.ours - before.ours) / cap, 3)}
