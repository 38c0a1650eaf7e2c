"""Process containment for workers: their own session, death with the harness, nothing left behind.

Worker side (``lead_own_session``): the worker starts a new session, so its process group is
its own (a plugin's ``os.killpg(0, ...)`` reaches only the point's processes); it asks the
kernel to kill it when its parent, the fork server, dies (the fork server exits when the
harness does); and it forks a guard that kills the whole group once the worker is gone, so
that processes a plugin started die with the worker even when the harness was killed.

Harness side: the harness becomes a child subreaper, so a process that escaped the worker (a
new session, a double fork) is re-parented to it rather than to init; after each round
``end_point_processes`` stops and kills the worker's whole tree of processes and such escapees,
pass after pass until none is left, and counts what the point had left running; the same tree
gives the point's CPU time. Linux only; elsewhere workers run without these guarantees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnbench.support.confinement import set_dumpable

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
GUARD_NAME = b"attnbench-guard"  # /proc/<pid>/comm keeps 15 characters: this is 15
ENDING_S = 10.0  # how long the harness keeps killing what a point started
PROC = Path("/proc")


def _prctl(option: int, value: int | bytes) -> bool:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "prctl"):
        return False
    return libc.prctl(option, value, 0, 0, 0) == 0


def lead_own_session() -> None:
    """Called first thing in a worker (see the module's docstring)."""
    if not hasattr(os, "setsid"):
        return
    os.setsid()
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the fork server died before the request took effect
        os._exit(1)
    worker = os.getpid()
    if os.fork() == 0:
        _guard(worker)


def _guard(worker: int) -> None:
    """Waits for the worker to die, then kills its process group (itself included). Never returns.

    It watches the worker through a pidfd (Linux >= 5.3), not by the parent-death signal: that
    signal would come from the worker, which Landlock's signal scoping stops from signalling
    anything outside itself once it is confined."""
    try:
        os.closerange(0, 1024)  # holds none of the worker's pipes open
        set_dumpable(False)  # the worker it watches, confined after this fork, cannot ptrace it
        _prctl(PR_SET_NAME, GUARD_NAME)
        try:
            watched = os.pidfd_open(worker)
        except (AttributeError, OSError):  # an older kernel: the signal, where no scoping stops it either
            signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != worker:
                os.killpg(0, signal.SIGKILL)
            while True:
                signal.pause()
        select.select([watched], [], [])  # readable once the worker has exited
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


# Every process that ever escaped a point here: it can never pass for a child of the harness's own.
_escaped: set[int] = set()


def become_subreaper() -> None:
    """Orphaned descendants of this process come back to it instead of to init (Linux >= 3.4)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def own_children() -> set[int]:
    """This process's children now (a worker's snapshot, to tell later orphans from them), less
    any that escaped an earlier point (one that outlived its point's killing is still a point's)."""
    me = os.getpid()
    return {process.pid for process in _processes() if process.parent == me} - _escaped


@dataclass(frozen=True)
class _Process:
    pid: int
    parent: int
    group: int
    session: int
    name: str
    zombie: bool
    cpu_ticks: int  # user and system time, with its reaped children's


def _processes() -> list[_Process]:
    """Every process on the machine (read several times a round: plain os calls, not pathlib)."""
    found = []
    for entry in os.listdir(PROC) if PROC.exists() else ():
        if not entry.isdigit():
            continue
        try:
            handle = os.open(f"{PROC}/{entry}/stat", os.O_RDONLY)
            try:
                text = os.read(handle, 4096)
            finally:
                os.close(handle)
        except OSError:  # gone meanwhile
            continue
        name_ends = text.rindex(b")")
        name = text[text.index(b"(") + 1: name_ends].decode(errors="replace")
        fields = text[name_ends + 2:].split()
        found.append(_Process(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), name,
                              fields[0] == b"Z", sum(int(value) for value in fields[11:15])))
    return found


def point_processes(worker: int, known: set[int]) -> list[_Process]:
    """The worker, every process descended from it, and whatever escaped to this process (a child
    in another session than this one's, not among ``known``, its children when the worker
    started) with its descendants: all of it the point's, whatever sessions or groups it made."""
    processes = _processes()
    me, session = os.getpid(), os.getsid(0)
    children: dict[int, list[_Process]] = defaultdict(list)
    for process in processes:
        children[process.parent].append(process)
    roots = [p for p in processes if p.pid == worker or (p.parent == me and p.session != session
                                                           and p.pid not in known)]
    found, queue = {}, list(roots)
    while queue:
        process = queue.pop()
        if process.pid not in found:
            found[process.pid] = process
            queue.extend(children.get(process.pid, ()))
    return list(found.values())


def point_cpu_seconds(worker: int, known: set[int]) -> float | None:
    """The CPU time of the point's processes (``point_processes``), read from /proc: every thread,
    and the children they reaped. None where /proc is missing."""
    if not PROC.exists():
        return None
    return sum(process.cpu_ticks for process in point_processes(worker, known)) / os.sysconf("SC_CLK_TCK")


def end_point_processes(worker: int, known: set[int], wait_for_worker: Callable[[], None]) -> int:
    """Kill every process of the point (``point_processes``): each pass stops them all first (so
    none can fork meanwhile), then kills them, until a pass finds none left (at most ENDING_S).
    The number of processes other than the worker and its guard that were there (0 for a
    well-behaved point). ``wait_for_worker``: returns once the worker is gone."""
    if not PROC.exists():
        wait_for_worker()
        return 0
    guard = GUARD_NAME.decode()
    left: set[int] | None = None
    deadline = time.monotonic() + ENDING_S
    while True:
        processes = point_processes(worker, known)
        if left is None:
            left = {p.pid for p in processes if p.pid != worker and p.name != guard and not p.zombie}
        for process in processes:
            if process.zombie:
                _reap(process.pid)  # (ours only: the others' parents reap them, or leave them to us)
        alive = [p for p in processes if not p.zombie]
        if not alive or time.monotonic() > deadline:
            break
        _escaped.update(process.pid for process in alive if process.pid != worker)
        for process in alive:
            _signal(process.pid, signal.SIGSTOP)
        for process in alive:
            _signal(process.pid, signal.SIGKILL)
        time.sleep(0.001)
    wait_for_worker()
    return len(left)


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
