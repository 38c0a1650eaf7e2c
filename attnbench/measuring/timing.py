"""Latency: blocks of timed calls, each timed by the worker and, around it, by the harness.

The harness drives the timing (``timed_blocks``): it picks how many calls a block holds (a block
long enough that the round trip to the worker is a small part of it), asks for blocks until the
samples are steady (IQR/median under 10% after the round's minimum run time) or the maximum run
time is spent, and times each block on its own clock from the moment it asks to the moment the
answer arrives. A sample is the worker's own time for a block (perf_counter, or CUDA events on a
GPU, where with ``cache: cold`` each call follows a flush of the L2, outside its events, as
triton.testing.do_bench does) divided by its calls; the harness's times are kept beside them, so
a worker that reports less time than passed is caught (attnbench.storage.flags).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from attnbench.measuring.figures import NOISY_RELATIVE_IQR
from attnbench.settings.suite import LatencySettings

# A block lasts at least this long (calls are added until it does): the harness's round trip to
# the worker then stays a small share of what it observes.
BLOCK_TARGET_S = 0.02
MAX_CALLS_PER_BLOCK = 1_000_000

# do_bench's size; above the L2 of any GPU made so far, checked against the device's own figure.
FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class BlockTiming:
    """One block of timed calls, as the worker stated it and as the harness saw it."""

    calls: int
    stated_s: float  # the worker's own clock (or the device's events)
    observed_s: float  # the harness's clock, from asking for the block to its answer


@dataclass(frozen=True)
class TimedBlocks:
    """The blocks of one round that give its samples (the calibration blocks are left out)."""

    blocks: tuple[BlockTiming, ...]

    @property
    def calls_per_sample(self) -> int:
        return self.blocks[0].calls

    @property
    def samples_s(self) -> tuple[float, ...]:
        return tuple(block.stated_s / block.calls for block in self.blocks)

    @property
    def observed_s(self) -> tuple[float, ...]:
        """The harness's clock for each block, per call."""
        return tuple(block.observed_s / block.calls for block in self.blocks)


def timed_blocks(run_block: Callable[[int], BlockTiming], settings: LatencySettings) -> TimedBlocks:
    """Blocks of calls under the adaptive rule of the module's docstring. The run times are wall
    time by the harness's clock: with a cold cache on a GPU, each microsecond kernel follows a
    flush that its events leave out, and a budget of kernel time alone would run many times over."""
    calls, tried = _calls_per_block(run_block)
    blocks = [block for block in tried if block.calls == calls]  # a slow call's calibration gives samples
    spent = sum(block.observed_s for block in blocks)
    while True:
        block = run_block(calls)
        blocks.append(block)
        spent += block.observed_s
        if len(blocks) < settings.min_samples:
            continue
        if spent >= settings.max_run_time_s:
            break
        samples = [b.stated_s / b.calls for b in blocks]
        if spent >= settings.min_run_time_s and len(samples) >= 3 and _relative_iqr(samples) < NOISY_RELATIVE_IQR:
            break
    return TimedBlocks(tuple(blocks))


def _calls_per_block(run_block: Callable[[int], BlockTiming]) -> tuple[int, list[BlockTiming]]:
    """The calls a block needs to last BLOCK_TARGET_S (by the harness's clock: what a block costs,
    flushes included), from calibration blocks; and the last blocks tried. A block that seems long
    enough is tried twice, its faster time counting: one disturbed block (the first timed call, a
    preemption) must not set the block size."""
    calls = 1
    while True:
        tried = [run_block(calls)]
        if tried[0].observed_s >= BLOCK_TARGET_S / 2:
            tried.append(run_block(calls))
        seconds = max(min(block.observed_s for block in tried), 1e-9)
        if seconds >= BLOCK_TARGET_S / 2 or calls >= MAX_CALLS_PER_BLOCK:
            return max(calls, min(MAX_CALLS_PER_BLOCK, math.ceil(calls * BLOCK_TARGET_S / seconds))), tried
        calls = min(MAX_CALLS_PER_BLOCK, max(calls * 10, math.ceil(calls * BLOCK_TARGET_S / seconds)))


def _relative_iqr(samples: list[float]) -> float:
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / statistics.median(samples)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, on every stream, so a clock or a peak reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


class Event(Protocol):
    """What the timer needs of a torch.cuda.Event (tests give it a clock of their own)."""

    def record(self) -> None: ...
    def elapsed_time(self, end: Any) -> float: ...  # milliseconds


def flushed_calls(calls: Sequence[Callable[[], Any]], flush: Callable[[], Any], new_event: Callable[[], Event],
                  wait: Callable[[], None]) -> tuple[float, Any]:
    """Each call after ``flush`` (a write over more than the L2), outside its own pair of events;
    ``wait``: until the device's work, on every stream, is done. The calls' seconds and the last
    one's result."""
    events = [(new_event(), new_event()) for _ in calls]
    result = None
    for call, (begin, end) in zip(calls, events, strict=True):
        flush()
        begin.record()
        result = call()
        end.record()
    wait()
    return sum(begin.elapsed_time(end) for begin, end in events) / 1e3, result


def local_blocks(call: Callable[[], Any], device: torch.device) -> Callable[[int], BlockTiming]:
    """Blocks of ``call`` in this process, warm, on one clock (for probes outside a run)."""

    def run(calls: int) -> BlockTiming:
        synchronize(device)
        began = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        seconds = time.perf_counter() - began
        return BlockTiming(calls, seconds, seconds)

    return run
