"""Process containment for workers: their own session, death with the harness, nothing left behind.

Worker side (``lead_own_session``): the worker starts a new session, so its process group is
its own (a plugin's ``os.killpg(0, ...)`` reaches only the point's processes); it asks the
kernel to kill it when its parent, the fork server, dies (the fork server exits when the
harness does); and it forks a guard that kills the whole group once the worker is gone, so
that processes a plugin started die with the worker even when the harness was killed.

Harness side: the harness becomes a child subreaper, so a process that escaped the group (a
new session, a double fork) is re-parented to it rather than to init; after each round
``end_point_processes`` kills the worker's group and such escapees, and counts what the point
had left running. Linux only; elsewhere workers run without these guarantees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnbench.support.confinement import set_dumpable

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
GUARD_NAME = b"attnbench-guard"  # /proc/<pid>/comm keeps 15 characters: this is 15
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
    """Waits for the worker to die, then kills its process group (itself included). Never returns."""
    try:
        os.closerange(0, 1024)  # holds none of the worker's pipes open
        set_dumpable(False)  # the worker it watches, confined after this fork, cannot ptrace it
        signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
        _prctl(PR_SET_NAME, GUARD_NAME)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != worker:
            os.killpg(0, signal.SIGKILL)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def become_subreaper() -> None:
    """Orphaned descendants of this process come back to it instead of to init (Linux >= 3.4)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


@dataclass(frozen=True)
class _Process:
    pid: int
    parent: int
    group: int
    session: int
    name: str
    zombie: bool


def _processes() -> list[_Process]:
    found = []
    for entry in PROC.iterdir() if PROC.exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name = text[text.index("(") + 1: text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        found.append(_Process(int(entry.name), int(fields[1]), int(fields[2]), int(fields[3]), name,
                              fields[0] == "Z"))
    return found


def own_children() -> set[int]:
    """This process's children now (to tell later orphans from them)."""
    me = os.getpid()
    return {process.pid for process in _processes() if process.parent == me}


def end_point_processes(worker: int, known_children: set[int], wait_for_worker: Callable[[], None]) -> int:
    """Kill the worker's process group and the processes it let escape; the number of processes
    other than the worker and its guard that were still there (0 for a well-behaved point).

    ``known_children``: this process's children before the worker started (never touched);
    ``wait_for_worker``: returns once the worker is gone (its own children are re-parented then).
    """
    if not PROC.exists():
        wait_for_worker()
        return 0
    guard = GUARD_NAME.decode()
    left = {p.pid for p in _processes() if p.group == worker and p.pid != worker and p.name != guard and not p.zombie}
    try:
        os.killpg(worker, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    wait_for_worker()
    return len(left | _kill_escapees(worker, known_children))


def _kill_escapees(worker: int, known_children: set[int]) -> set[int]:
    """Children re-parented to us from another session since the point started: killed and reaped.
    Each death in the point's group re-parents that process's children, so look until the group
    is gone (at most 2 s)."""
    me, session, guard = os.getpid(), os.getsid(0), GUARD_NAME.decode()
    found: set[int] = set()
    deadline = time.monotonic() + 2.0
    while True:
        processes = _processes()
        orphans = [p for p in processes if p.parent == me and p.pid not in known_children and p.session != session]
        for orphan in orphans:
            if not orphan.zombie:
                _kill(orphan.pid)
                if orphan.name != guard:
                    found.add(orphan.pid)
            _reap(orphan.pid)
        group_alive = any(p.group == worker and not p.zombie for p in processes)
        if not group_alive and all(orphan.zombie for orphan in orphans) or time.monotonic() > deadline:
            return found
        time.sleep(0.002)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
