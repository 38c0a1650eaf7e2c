"""A point's memory cap held by the kernel: a memory cgroup per worker, where the machine allows it.

An ``oom`` row must mean the point needed more memory than the cap. A memory cgroup counts what
that means: the pages the worker and every process it starts have touched (not address space
reserved, not pages the worker shares with the fork server it came from), and the kernel ends
the worker when they pass the cap. The harness makes one where it may write beneath its own
cgroup (root on cgroup v1, or a cgroup v2 subtree delegated with the memory controller); elsewhere
the worker's RLIMIT_DATA (address space, the worker alone) is the only limit, and the row says so.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from attnbench.support.units import format_bytes

_names = itertools.count()
_left: set[Path] = set()  # groups whose last process had not yet gone when the worker ended


@dataclass(frozen=True)
class Hierarchy:
    """Where this process may make memory cgroups: its own cgroup's folder, and the version."""

    folder: Path
    version: int  # 1 or 2

    def files(self) -> tuple[str, str, str]:
        """The files of a group's limit, swap limit and out-of-memory events."""
        if self.version == 1:
            return "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"
        return "memory.max", "memory.swap.max", "memory.events"


class MemoryGroup:
    """One worker's memory cgroup, capped at ``cap_bytes`` (swap included, where swap is counted)."""

    def __init__(self, hierarchy: Hierarchy, cap_bytes: int) -> None:
        self.hierarchy, self.cap_bytes = hierarchy, cap_bytes
        self.folder = hierarchy.folder / f"attnbench-{os.getpid()}-{next(_names)}"
        self.folder.mkdir()
        limit, swap, _ = hierarchy.files()
        try:
            (self.folder / limit).write_text(str(cap_bytes))
            if (self.folder / swap).exists():  # no swap beyond the cap: cgroup v1 counts memory and swap together
                (self.folder / swap).write_text(str(cap_bytes) if hierarchy.version == 1 else "0")
        except OSError:
            self.remove()
            raise

    def admit(self, pid: int) -> None:
        """Moves a process in: what it touches from now on counts against the cap (its children too)."""
        (self.folder / "cgroup.procs").write_text(str(pid))

    def ended_by_kernel(self) -> bool:
        """Whether the kernel's out-of-memory killer ended a process of this group."""
        try:
            events = (self.folder / self.hierarchy.files()[2]).read_text().split()
        except OSError:
            return False
        counts = dict(zip(events[::2], events[1::2], strict=False))
        return counts.get("oom_kill", "0") != "0"

    def remove(self) -> None:
        """Removes the group once its processes are gone (reaped a moment after they are killed)."""
        for _ in range(50):
            try:
                self.folder.rmdir()
                _left.discard(self.folder)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.002)
        _left.add(self.folder)


def memory_group(cap_bytes: int | None) -> MemoryGroup | None:
    """A new group for one worker, or None where the cap is off or no group can be made here."""
    hierarchy = writable_hierarchy()
    if cap_bytes is None or hierarchy is None:
        return None
    try:
        return MemoryGroup(hierarchy, cap_bytes)
    except OSError:
        return None


def enforcement(cap_bytes: int | None, device: str) -> str:
    """How a point's cap is held on ``device`` here, for its row."""
    if cap_bytes is None:
        return "no cap"
    cap = format_bytes(cap_bytes)
    if device.startswith("cuda"):
        return f"{cap} of the GPU's memory (torch.cuda.set_per_process_memory_fraction)"
    hierarchy = writable_hierarchy()
    if hierarchy is not None:
        return (f"{cap} in use by the worker and the processes it starts (a memory cgroup v{hierarchy.version} per "
                f"worker; address space limited to {format_bytes(ADDRESS_SPACE_FACTOR * cap_bytes)} more)")
    return (f"{cap} of address space beyond the worker's start (RLIMIT_DATA; no memory cgroup can be made here, "
            "so processes the point starts are not capped)")


# Under a cgroup, RLIMIT_DATA only stops an allocation that could never fit (its address space is
# not memory in use): twice the cap leaves room for what a heap holds freed.
ADDRESS_SPACE_FACTOR = 2


@functools.cache
def writable_hierarchy() -> Hierarchy | None:
    """Where this process may make memory cgroups (probed once: a group made and removed)."""
    for hierarchy in _candidates():
        probe = hierarchy.folder / f"attnbench-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            usable = (probe / hierarchy.files()[0]).exists()
        finally:
            try:
                probe.rmdir()
            except OSError:
                pass
        if usable:
            return hierarchy
    return None


def _candidates() -> list[Hierarchy]:
    """This process's own memory cgroups: v2 where the memory controller is delegated below it, v1."""
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in memberships:
        number, controllers, path = line.split(":", 2)
        version = 2 if number == "0" and not controllers else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        mounted = _mount(mounts, version)
        if mounted is None:
            continue
        root, mount = mounted
        if os.path.commonpath([root, path]) != root:
            continue  # (this process's cgroup is not visible in this mount)
        folder = mount / os.path.relpath(path, root)
        if version == 2 and "memory" not in _read(folder / "cgroup.subtree_control").split():
            continue
        found.append(Hierarchy(folder, version))
    return sorted(found, key=lambda hierarchy: -hierarchy.version)


def _mount(mounts: list[str], version: int) -> tuple[str, Path] | None:
    """The cgroup folder a mount shows at its top, and where it is mounted (proc(5), mountinfo)."""
    for line in mounts:
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        fstype, _, options = (fields[1].split(" ") + ["", ""])[:3]
        if (version == 2 and fstype == "cgroup2") or (version == 1 and fstype == "cgroup"
                                                      and "memory" in options.split(",")):
            mount_fields = fields[0].split(" ")
            return mount_fields[3], Path(mount_fields[4])
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@atexit.register
def _remove_left() -> None:
    for folder in list(_left):
        try:
            folder.rmdir()
        except OSError:
            pass
