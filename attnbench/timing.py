"""Latency of a call: torch.utils.benchmark on the CPU, CUDA events on the GPU."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from attnbench.results import NOISY_RELATIVE_IQR, Latency
from attnbench.suite import LatencySettings


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall clock or a peak reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(
    call: Callable[[], Any], device: torch.device, settings: LatencySettings, first_call_s: float
) -> Latency:
    if device.type == "cpu":
        return _cpu_latency(call, settings, first_call_s)
    return _device_latency(call, device, settings, first_call_s)


def _cpu_latency(call: Callable[[], Any], settings: LatencySettings, first_call_s: float) -> Latency:
    # num_threads must be given: Timer defaults to one thread, which is not how anyone runs.
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
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
    call: Callable[[], Any], device: torch.device, settings: LatencySettings, first_call_s: float
) -> Latency:
    """The same adaptive rule as on the CPU, timed by CUDA events (or a synchronised clock on MPS)."""
    time_block = _cuda_event_timer(call, device) if device.type == "cuda" else _synchronized_timer(call, device)
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


def _cuda_event_timer(call: Callable[[], Any], device: torch.device) -> Callable[[int], float]:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def time_block(calls: int) -> float:
        synchronize(device)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return time_block


def _synchronized_timer(call: Callable[[], Any], device: torch.device) -> Callable[[int], float]:
    def time_block(calls: int) -> float:
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        return time.perf_counter() - begin

    return time_block


def _relative_iqr(samples: list[float]) -> float:
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / statistics.median(samples)
