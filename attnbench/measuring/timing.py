"""Latency of a call: torch.utils.benchmark on the CPU, CUDA events on the GPU.

The timed statement keeps the last call's result, so that it can be checked afterwards: an
implementation cannot be right on the checked calls and wrong (or cached) on the timed ones.
On CUDA, by default ("cold"), each timed call follows a write over a buffer larger than the L2
cache, outside its events, as triton.testing.do_bench does: back to back, a call would find its
inputs (and the previous call's output) in a 50 MB L2 and look faster than it runs in a model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.utils.benchmark as benchmark

from attnbench.measuring.cpu_load import other_load, read_clock
from attnbench.measuring.figures import NOISY_RELATIVE_IQR, Latency
from attnbench.measuring.gpu_state import sampler
from attnbench.settings.suite import LatencySettings


class LastResult:
    """Wraps the timed call so that the last result is kept (one list store per call)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.kept: list[Any] = [None]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall clock or a peak reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# do_bench's size; above the L2 of any GPU made so far, checked against the device's own figure.
FLUSH_BYTES = 256 * 2**20


class Event(Protocol):
    """What the timer needs of a torch.cuda.Event (tests give it a clock of their own)."""

    def record(self) -> None: ...
    def synchronize(self) -> None: ...
    def elapsed_time(self, end: Any) -> float: ...  # milliseconds


def measure_latency(
    call: Callable[[], Any], device: torch.device, settings: LatencySettings, first_call_s: float
) -> tuple[Latency, Any]:
    """The latency, with the load other processes put on the CPUs meanwhile, the GPU's state
    before and after, and the last result."""
    last = LastResult(call)
    sample_gpu = sampler(device)
    before = sample_gpu() if sample_gpu else None
    start = read_clock()
    if device.type == "cpu":
        latency = _cpu_latency(last, settings, first_call_s)
    else:
        latency = _device_latency(last, device, settings, first_call_s, _block_timer(last, device, settings.cache))
    load = other_load(start, read_clock())
    gpu_samples = (before, sample_gpu()) if sample_gpu and before else ()
    result, last.kept[0] = last.kept[0], None
    return dataclasses.replace(latency, round_loads=(load,), gpu_samples=gpu_samples), result


def time_one_call(call: Callable[[], Any], device: torch.device, cache: str = "warm") -> tuple[float, Any]:
    """One call, timed as the samples are (CUDA events on a GPU, after a flush when cold), and its result."""
    last = LastResult(call)
    seconds = _block_timer(last, device, cache).time(1)
    return seconds, last.kept[0]


def _cpu_latency(last: LastResult, settings: LatencySettings, first_call_s: float) -> Latency:
    # num_threads must be given: Timer defaults to one thread, which is not how anyone runs.
    timer = benchmark.Timer(stmt="kept[0] = call()", globals={"call": last.call, "kept": last.kept},
                            num_threads=torch.get_num_threads())
    # Adaptive: a block size that amortises the timer, then blocks until IQR/median is small
    # (after min_run_time) or max_run_time is spent.
    measurement = timer.adaptive_autorange(
        threshold=NOISY_RELATIVE_IQR,
        min_run_time=settings.min_run_time_s,
        max_run_time=settings.max_run_time_s,
    )
    samples = list(measurement.times)
    while len(samples) < settings.min_samples:  # slow calls: one block is one sample
        samples.extend(timer.timeit(measurement.number_per_run).times)
    return Latency(
        samples_s=tuple(samples),
        calls_per_sample=(measurement.number_per_run,),
        first_call_s=first_call_s,
        timer="torch.utils.benchmark.Timer.adaptive_autorange",
        cache="warm",
    )


def _device_latency(
    last: LastResult, device: torch.device, settings: LatencySettings, first_call_s: float, timer: BlockTimer
) -> Latency:
    """The same adaptive rule as on the CPU, timed by CUDA events (or a synchronised clock on MPS)."""
    one_call = timer.time(1)
    calls_per_sample = max(1, math.ceil(1e-3 / max(one_call, 1e-9)))  # samples of >= 1 ms
    samples: list[float] = []
    spent = 0.0
    while True:
        elapsed = timer.time(calls_per_sample)
        samples.append(elapsed / calls_per_sample)
        spent += elapsed
        enough = len(samples) >= max(settings.min_samples, 4) and spent >= settings.min_run_time_s
        if enough and _relative_iqr(samples) < NOISY_RELATIVE_IQR:
            break
        if spent >= settings.max_run_time_s and len(samples) >= settings.min_samples:
            break
    return Latency(tuple(samples), (calls_per_sample,), first_call_s, timer.name, cache=timer.cache)


@dataclasses.dataclass(frozen=True)
class BlockTimer:
    """``time(calls)``: seconds the device spent on that many calls; ``cache``: what they found in it."""

    time: Callable[[int], float]
    name: str
    cache: str


def _block_timer(last: LastResult, device: torch.device, cache: str) -> BlockTimer:
    if device.type != "cuda":
        return BlockTimer(_synchronized_timer(last, device), "time.perf_counter with synchronize", "warm")
    new_event = functools.partial(torch.cuda.Event, enable_timing=True)
    if cache == "warm":
        return BlockTimer(event_timer(last, new_event), "torch.cuda.Event", "warm")
    buffer = torch.empty(max(FLUSH_BYTES, 2 * _l2_bytes(device)), dtype=torch.int8, device=device)
    return BlockTimer(event_timer(last, new_event, flush=buffer.zero_), "torch.cuda.Event, L2 flushed per call", "cold")


def _l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


def event_timer(
    last: LastResult, new_event: Callable[[], Event], flush: Callable[[], Any] | None = None
) -> Callable[[int], float]:
    """Times blocks of calls with device events. Without ``flush``: one pair of events around
    the block. With it: a flush before each call, outside a pair of events around that call, and
    the block's time is the sum of the calls' own."""
    call, kept = last.call, last.kept

    def warm_block(calls: int) -> float:
        start, end = new_event(), new_event()
        start.record()
        for _ in range(calls):
            kept[0] = call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def cold_block(calls: int) -> float:
        pairs = [(new_event(), new_event()) for _ in range(calls)]
        for start, end in pairs:
            flush()
            start.record()
            kept[0] = call()
            end.record()
        pairs[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in pairs) / 1e3

    return warm_block if flush is None else cold_block


def _synchronized_timer(last: LastResult, device: torch.device) -> Callable[[int], float]:
    """A wall clock around the block, the device's queue emptied at both ends."""
    call, kept = last.call, last.kept

    def time_block(calls: int) -> float:
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            kept[0] = call()
        synchronize(device)
        return time.perf_counter() - begin

    return time_block


def _relative_iqr(samples: list[float]) -> float:
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / statistics.median(samples)
