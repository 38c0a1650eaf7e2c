"""Peak memory of one call, above what was held before it."""

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

from attnbench.measuring.figures import Memory
from attnbench.measuring.timing import synchronize

T = TypeVar("T")

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def measure_peak_memory(call: Callable[[], Any], device: torch.device) -> Memory:
    if device.type == "cuda":
        return _cuda_peak(call, device)
    if device.type == "cpu":
        return Memory(
            allocator_peak_bytes=_cpu_allocator_peak(call),
            rss_peak_bytes=_rss_peak(call),
            source="torch profiler memory events; VmHWM after /proc/self/clear_refs",
        )
    return Memory(None, None, source=f"not measured: no peak statistics on {device.type}")


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


def _cuda_peak(call: Callable[[], Any], device: torch.device) -> Memory:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return Memory(allocator_peak_bytes=peak, rss_peak_bytes=None, source="torch.cuda.max_memory_allocated")


def _cpu_allocator_peak(call: Callable[[], Any]) -> int | None:
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


def _rss_peak(call: Callable[[], Any]) -> int | None:
    """Process peak RSS during the call minus RSS before it (Linux only)."""
    if not PROC_CLEAR_REFS.exists():
        return None
    gc.collect()
    _release_free_heap()
    baseline = _status_bytes("VmRSS")
    try:
        PROC_CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    result = call()
    peak = _status_bytes("VmHWM")
    del result
    return max(0, peak - baseline)


def _release_free_heap() -> None:
    # Freed memory that malloc keeps would be reused without raising RSS, hiding the call's
    # true footprint; malloc_trim hands it back so the call's pages are counted afresh.
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _status_bytes(key: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{key} missing from {PROC_STATUS}")
