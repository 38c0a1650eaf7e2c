"""In-process probes of the GPU check (benchmarks/gpu_check.py): each holds one of attnbench's
device measurements against arithmetic or a second instrument, and says PASS or FAIL with the
figures. They run in the check's own process, outside the harness's workers, on purpose: what
they test is the measuring code itself.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation, effective_options, plugin_reasons
from attnbench.measuring.call_server import attention_call
from attnbench.measuring.inputs import make_inputs
from attnbench.measuring.memory import cpu_allocator_peak, cuda_peak
from attnbench.measuring.timing import (
    FLUSH_BYTES,
    BlockTiming,
    flushed_calls,
    l2_bytes,
    local_blocks,
    synchronize,
    timed_blocks,
)
from attnbench.settings.suite import LatencySettings
from attnbench.support.text import one_line
from attnbench.support.units import format_bytes

# What each SDPA backend's op is called by the profiler (the CPU has a flash kernel of its own),
# and fragments one of its GPU kernels' names holds. cuDNN names its generated kernels by what
# they do, not by cuDNN: for it, the op and a kernel launched under it are the evidence.
SDPA_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flash": ("aten::_scaled_dot_product_flash_attention", ("flash",)),
    "sdpa_mem_efficient": ("aten::_scaled_dot_product_efficient_attention", ("fmha", "efficient", "cutlass")),
    "sdpa_cudnn": ("aten::_scaled_dot_product_cudnn_attention", ()),
}
PEAK_TOLERANCE = 0.05  # naive's allocator peak against its two N×N buffers
# The harness's timer against a wall clock, on one call of at least LONG_CALL_S (launch and
# synchronisation costs well under it). A shared CPU moves the fastest of several calls by over
# ten percent from one alternation to the next, so its tolerance is wider (wrong units or a
# missed synchronisation would still be caught: they are off by far more).
CLOCK_TOLERANCE = {"cuda": 0.03, "cpu": 0.25}
LONG_CALL_S = 0.2
ALTERNATIONS = 7  # timer, clock, timer, ...: the fastest of each (interruptions only add time)


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # PASS, FAIL, INFO (a figure, not a test) or n/a (does not apply here)
    detail: str


def naive_peak(naive: Implementation, case: Case) -> Check:
    """naive keeps the scores and the probabilities (B·H·N² each) alive at its peak; the output
    and the scaled query are O(N·D), far below them."""
    buffers = 2 * case.batch * case.heads * case.seq_len**2 * case.dtype.itemsize
    call = _call(naive, case)
    call()  # the first call's one-time allocations (library workspaces) are not the point's
    device = torch.device(case.device)
    peak = cuda_peak(call, device) if device.type == "cuda" else cpu_allocator_peak(call)
    if peak is None:
        return Check("naive peak", "FAIL", f"no allocator peak on {case.device}")
    ratio = peak / buffers
    verdict = "PASS" if abs(ratio - 1) <= PEAK_TOLERANCE else "FAIL"
    return Check("naive peak", verdict, f"{format_bytes(peak)} measured at {case.describe()}; two N×N buffers "
                                        f"are {format_bytes(buffers)} ({ratio:.1%}, within {PEAK_TOLERANCE:.0%})")


def timer_against_clock(implementation: Implementation, case: Case) -> Check:
    """One call of at least LONG_CALL_S (repeats of the attention call in one Python call), timed
    by the harness's device timer and by a wall clock between two synchronisations, in turns (on
    one CPU thread on the CPU: two threads on a shared machine wait on each other's interruptions)."""
    threads = torch.get_num_threads()
    if case.device_type == "cpu":
        torch.set_num_threads(1)
    try:
        return _timer_against_clock(implementation, case)
    finally:
        torch.set_num_threads(threads)


def _timer_against_clock(implementation: Implementation, case: Case) -> Check:
    device = torch.device(case.device)
    attention = _call(implementation, case)
    attention()
    synchronize(device)
    started = time.perf_counter()
    attention()
    synchronize(device)
    repeats = max(1, math.ceil(LONG_CALL_S / max(time.perf_counter() - started, 1e-6)))

    def long_call() -> Any:
        for _ in range(repeats):
            out = attention()
        return out

    def timer() -> float:  # CUDA events, as a cold timed call is timed; the CPU's block clock otherwise
        if device.type != "cuda":
            return local_blocks(long_call, device)(1).stated_s
        return flushed_calls([long_call], lambda: None, lambda: torch.cuda.Event(enable_timing=True),
                             lambda: synchronize(device))[0]

    timer_s, clock_s = [], []
    for _ in range(ALTERNATIONS):
        timer_s.append(timer())
        synchronize(device)
        started = time.perf_counter()
        long_call()
        synchronize(device)
        clock_s.append(time.perf_counter() - started)
    ratio = min(timer_s) / min(clock_s)
    tolerance = CLOCK_TOLERANCE.get(case.device_type, CLOCK_TOLERANCE["cuda"])
    verdict = "PASS" if abs(ratio - 1) <= tolerance else "FAIL"
    return Check("timer vs clock", verdict,
                 f"{implementation.name} ×{repeats} at {case.describe()}: timer {min(timer_s) * 1e3:.1f} ms, "
                 f"wall clock {min(clock_s) * 1e3:.1f} ms ({ratio:.1%}, within {tolerance:.0%})")


def sdpa_kernels(implementation: Implementation, case: Case) -> Check:
    """The pinned backend's op ran, and on a GPU a kernel of that backend's name."""
    name = f"{implementation.name} kernel"
    reasons = plugin_reasons(implementation, case)
    if reasons:
        return Check(name, "n/a", f"unsupported at {case.describe()}: {reasons[0]}")
    op, fragments = SDPA_OPS[implementation.name]
    if case.device_type == "cpu" and implementation.name == "flash":
        op = "aten::_scaled_dot_product_flash_attention_for_cpu"
    ops, kernels = _profiled_names(_call(implementation, case), torch.device(case.device))
    ran_op = op in ops
    matching = sorted(kernel for kernel in kernels
                      if not fragments or any(fragment in kernel.lower() for fragment in fragments))
    verdict = "PASS" if ran_op and (matching or case.device_type == "cpu") else "FAIL"
    shown = matching or sorted(kernels)
    seen = (f"kernels: {', '.join(one_line(kernel, 80) for kernel in shown[:3])}" if shown else
            "no GPU kernels" if case.device_type != "cpu" else "CPU op only")
    return Check(name, verdict, f"{op} {'ran' if ran_op else 'did not run'}; {seen}")


def cold_against_warm(implementation: Implementation, case: Case) -> Check:
    """The same call timed after an L2 flush and back to back: what the flush costs it (a figure)."""
    if case.device_type != "cuda":
        return Check("L2 flush", "n/a", "the CPU is timed warm (there is no cache flush on the CPU)")
    call = _call(implementation, case)
    call()
    device = torch.device(case.device)
    buffer = torch.empty(max(FLUSH_BYTES, 2 * l2_bytes(device)), dtype=torch.int8, device=device)

    def cold_block(calls: int) -> BlockTiming:
        seconds = flushed_calls([call] * calls, buffer.zero_, lambda: torch.cuda.Event(enable_timing=True),
                                lambda: synchronize(device))[0]
        return BlockTiming(calls, seconds, seconds)

    settings = LatencySettings(0.1, 0.5, 10)
    cold = statistics.median(timed_blocks(cold_block, settings).samples_s)
    warm = statistics.median(timed_blocks(local_blocks(call, device), settings).samples_s)
    return Check("L2 flush", "INFO", f"{implementation.name} at {case.describe()}: cold {cold * 1e6:.1f} µs, warm "
                                     f"{warm * 1e6:.1f} µs ({cold / warm:.2f}×)")


def _call(implementation: Implementation, case: Case) -> Callable[[], Any]:
    attention = implementation.prepare(case, effective_options(implementation, {}))
    return attention_call(attention, make_inputs(case, 0), case.backward)


def _profiled_names(call: Callable[[], Any], device: torch.device) -> tuple[set[str], set[str]]:
    """(names of the ops, names of the GPU kernels) the call ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    call()
    synchronize(device)
    with profile(activities=activities) as profiled:
        call()
        synchronize(device)
    ops, kernels = set(), set()
    for event in profiled.events():
        (kernels if event.device_type == torch.autograd.DeviceType.CUDA else ops).add(event.name)
    return ops, kernels
