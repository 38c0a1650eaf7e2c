"""How busy other work kept the CPUs while a point was timed.

The load average lags by a minute and counts the measurement itself; instead, the worker reads
the machine's busy CPU time (/proc/stat, steal included: a hypervisor's neighbours count) and
its own CPU time (every thread, and its children) at both ends of the timed calls. The
difference is what everything else used.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuClock:
    wall_s: float
    machine_busy_s: float | None  # all CPUs together; None where /proc/stat is missing
    own_s: float


def read_clock() -> CpuClock:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_s = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return CpuClock(time.perf_counter(), machine_busy_s(), own_s)


def other_load(start: CpuClock, end: CpuClock) -> float | None:
    """The average number of CPUs other processes kept busy between the two readings."""
    wall = end.wall_s - start.wall_s
    if start.machine_busy_s is None or end.machine_busy_s is None or wall <= 0:
        return None
    others = (end.machine_busy_s - start.machine_busy_s) - (end.own_s - start.own_s)
    return round(max(0.0, others / wall), 3)


def machine_busy_s() -> float | None:
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")
