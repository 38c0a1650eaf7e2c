"""Latency of a call: torch.utils.benchmark on the CPU, CUDA events on the GPU.

The timed statement keeps the last call's result, so that it can be checked afterwards: an
implementation cannot be right on the checked calls and wrong (or cached) on the timed ones.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from attnbench.measuring.cpu_load import other_load, read_clock
from attnbench.measuring.figures import NOISY_RELATIVE_IQR, Latency
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


def measure_latency(
    call: Callable[[], Any], device: torch.device, settings: LatencySettings, first_call_s: float
) -> tuple[Latency, Any]:
    """The latency, with the load other processes put on the CPUs meanwhile, and the last result."""
    last = LastResult(call)
    start = read_clock()
    if device.type == "cpu":
        latency = _cpu_latency(last, settings, first_call_s)
    else:
        latency = _device_latency(last, device, settings, first_call_s)
    load = other_load(start, read_clock())
    result, last.kept[0] = last.kept[0], None
    return dataclasses.replace(latency, round_loads=(load,)), result


def time_one_call(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """One call, timed as the samples are (CUDA events on a GPU), and its result."""
    last = LastResult(call)
    time_block = _cuda_event_timer(last, device) if device.type == "cuda" else _synchronized_timer(last, device)
    seconds = time_block(1)
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
    )


def _device_latency(
    last: LastResult, device: torch.device, settings: LatencySettings, first_call_s: float
) -> Latency:
    """The same adaptive rule as on the CPU, timed by CUDA events (or a synchronised clock on MPS)."""
    time_block = _cuda_event_timer(last, device) if device.type == "cuda" else _synchronized_timer(last, device)
    one_call = time_block(1)
    calls_per_sample = max(1, math.ceil(1e-3 / max(one_call, 1e-9)))  # samples of >= 1 ms
    samples: list[float] = []
    spent = 0.0
    while True:
        elapsed = time_block(calls_per_sample)
        samples.append(elapsed / calls_per_sample)
        spent += elapsed
        enough = len(samples) >= max(settings.min_samples, 4) and spent >= settings.min_run_time_s
        if enough and _relative_iqr(samples) < NOISY_RELATIVE_IQR:
            break
        if spent >= settings.max_run_time_s and len(samples) >= settings.min_samples:
            break
    timer = "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter with synchronize"
    return Latency(tuple(samples), (calls_per_sample,), first_call_s, timer)


def _cuda_event_timer(last: LastResult, device: torch.device) -> Callable[[int], float]:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    call, kept = last.call, last.kept

    def time_block(calls: int) -> float:
        synchronize(device)
        start.record()
        for _ in range(calls):
            kept[0] = call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return time_block


def _synchronized_timer(last: LastResult, device: torch.device) -> Callable[[int], float]:
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
