"""A steady CPU allocator in each worker, so that a case's speed does not depend on the process.

glibc serves a large allocation with mmap, and raises its threshold for mmap the first time
such a block is freed (the "dynamic threshold", which tops out at 32 MiB on 64-bit). Whether a
worker's repeated N×N buffers then come from the heap (pages already mapped) or from fresh mmaps
(a page fault per 4 KiB, every call) depends on what that process happened to allocate first: the
same naive attention at N=1024 took 9-10 ms in some processes and 24-30 ms in others. Each worker
therefore starts in the state a long-running glibc process settles in: the threshold fixed at its
ceiling, so every block up to 32 MiB comes from the heap and is reused, and every larger one is
mapped for the call and handed back when freed.

Larger blocks must not stay on the heap: a heap that serves them fragments (a 16 MiB output
placed in a freed 2 GiB hole leaves a hole too small for the next 2 GiB), and since freed heap
pages stay resident, naive attention at N=8192 grew from 4 GiB to 12 GiB in use over five calls,
and failed a memory cap its computation was well within.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h); a trim threshold of -1 disables trimming (mallopt(3)).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
NEVER = -1
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, plus a page so that a block of exactly 32 MiB
# (naive's scores at N=1024, H=8) stays on the heap as it does in a settled process.
HEAP_BLOCK_LIMIT = 32 * 2**20 + 4096

# A user who chose their own allocator settings or allocator keeps them.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def worker_allocator_policy() -> str:
    """What each worker does to its allocator, for the run's environment record."""
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return f"as set by {', '.join(chosen)}"
    if _glibc() is None:
        return "the C library's defaults (not glibc)"
    return (f"glibc mallopt M_MMAP_THRESHOLD={HEAP_BLOCK_LIMIT}, M_TRIM_THRESHOLD=-1 in each worker "
            "(blocks up to 32 MiB reused from the heap, larger ones mapped per call)")


def steady_cpu_allocator() -> None:
    """Put this process's allocator in a settled glibc process's state (see above)."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        return
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
