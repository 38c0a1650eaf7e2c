"""A steady CPU allocator in each worker, so that a case's speed does not depend on the process.

glibc serves a large allocation with mmap, and raises its threshold for mmap the first time
such a block is freed (the "dynamic threshold"). Whether a worker's repeated N×N buffers then
come from the heap (pages already mapped) or from fresh mmaps (a page fault per 4 KiB, every
call) depends on what that process happened to allocate first. Measured here: the same naive
attention at N=1024 took 9-10 ms in some processes and 24-30 ms in others. Keeping every
allocation on the heap and never trimming it makes repeated calls reuse their pages, like
PyTorch's caching allocator on CUDA, in every process alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h); a trim threshold of -1 disables trimming (mallopt(3)).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER = -1

# A user who chose their own allocator settings or allocator keeps them.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def worker_allocator_policy() -> str:
    """What each worker does to its allocator, for the run's environment record."""
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return f"as set by {', '.join(chosen)}"
    if _glibc() is None:
        return "the C library's defaults (not glibc)"
    return "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1 in each worker (freed pages are reused)"


def steady_cpu_allocator() -> None:
    """Keep this process's allocations on the heap and its freed pages mapped (see above)."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
