"""Peak memory of one call, above what was held before it: torch's allocator (stated by the
worker), the process's resident peak (read from /proc by the harness), a decode step's state."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from attnbench.measuring.timing import synchronize

T = TypeVar("T")

def held_after(build: Callable[[], T], device: torch.device) -> tuple[T, int | None]:
    """Runs ``build`` and counts the bytes torch allocated during it that are still allocated once
    it has returned: what its result keeps (a decode step's cache or state). None where the
    device has no allocator statistics."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        result = build()
        synchronize(device)
        gc.collect()
        return result, max(0, torch.cuda.memory_allocated(device) - before)
    if device.type != "cpu":
        return build(), None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = build()
        gc.collect()
    try:
        events = profiler.profiler.kineto_results.events()
        held = sum(event.nbytes() for event in events if event.name() == "[memory]")
    except AttributeError:  # the profiler's event API moved: report nothing rather than a guess
        return result, None
    return result, max(0, held)


def initialise_profiler() -> None:
    """Start and stop an empty profile: the profiler's one-time set-up then costs no case."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    # The profiler's C++ side logs its start and stop on file descriptor 2.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cuda_peak(call: Callable[[], Any], device: torch.device) -> int:
    """The allocator's peak during one call, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return peak


def cpu_allocator_peak(call: Callable[[], Any]) -> int | None:
    """Highest running total of torch's CPU allocations and frees during the call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = call()
    del result
    try:
        events = profiler.profiler.kineto_results.events()
        changes = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    except AttributeError:  # the profiler's event API moved: report nothing rather than a guess
        return None
    total = peak = 0
    for _, nbytes in changes:
        total += nbytes
        peak = max(peak, total)
    return peak


class ProcessPeak:
    """A process's peak resident memory over a stretch of time, read from /proc by whichever
    process watches it (the harness watches its workers: the figure is not the worker's to state).
    Linux only: elsewhere ``available`` is False."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = Path(f"/proc/{pid}")
        self.baseline: int | None = None

    @property
    def available(self) -> bool:
        return (self.proc / "clear_refs").exists()

    def start(self) -> bool:
        """Resets the high-water mark to the current RSS and keeps the current RSS as the baseline.
        False when the process refused the reset (it made itself undumpable, to a harness that is
        not root): its peak is then the one since it started, above the RSS now."""
        try:
            self.baseline = _status_bytes(self.proc / "status", "VmRSS")
        except (OSError, RuntimeError):
            return False
        try:
            (self.proc / "clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak_above_start(self) -> int | None:
        """Peak RSS since ``start`` minus the RSS then (the whole peak for a process that began
        after ``start``)."""
        if self.baseline is None:
            self.baseline = 0
        try:
            return max(0, _status_bytes(self.proc / "status", "VmHWM") - self.baseline)
        except (OSError, RuntimeError):
            return None


def proportional_bytes(pid: int) -> int | None:
    """A process's proportional set size now (its private pages, and its share of pages it shares
    with others: a forked helper is not counted twice), from /proc; None where it cannot be read."""
    try:
        return _status_bytes(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
    except (OSError, RuntimeError):
        return None


def release_free_heap() -> None:
    # Freed memory that malloc keeps would be reused without raising RSS, hiding the call's
    # true footprint; malloc_trim hands it back so the call's pages are counted afresh.
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _status_bytes(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{key} missing from {status}")
