"""Latency keeps its raw samples; statistics are derived from them."""

from __future__ import annotations

import time

import pytest
import torch

from attnbench.measuring.figures import Latency
from attnbench.measuring.timing import measure_latency
from attnbench.settings.suite import LatencySettings


def test_raw_samples_are_kept():
    x = torch.randn(64, 64)
    latency, last = measure_latency(lambda: x @ x, torch.device("cpu"), LatencySettings(0.05, 0.2, 3), first_call_s=0.0)
    assert torch.equal(last, x @ x)  # the last timed call's result is kept, for checking
    assert len(latency.samples_s) >= 3 and latency.calls_per_sample[0] >= 1
    assert all(sample > 0 for sample in latency.samples_s)
    assert latency.timer.startswith("torch.utils.benchmark")


def test_slow_calls_still_give_the_minimum_number_of_samples():
    latency, _ = measure_latency(lambda: time.sleep(0.03), torch.device("cpu"), LatencySettings(0.01, 0.02, 4), 0.0)
    assert len(latency.samples_s) >= 4 and latency.calls_per_sample == (1,)
    assert all(sample >= 0.03 for sample in latency.samples_s)


def test_statistics_are_derived_from_the_samples():
    latency = Latency(samples_s=(1.0, 2.0, 3.0, 4.0, 100.0), calls_per_sample=(1,), first_call_s=0, timer="t")
    assert latency.median_s == 3.0
    assert latency.iqr_s == 2.0  # quartiles 2 and 4
    assert latency.noisy
    assert not Latency((1.0, 1.01, 1.02), (1,), 0, "t").noisy


def test_rounds_keep_their_samples_and_the_fastest_round_is_the_headline():
    disturbed = Latency((3.0, 3.1, 2.9), (1,), 0.5, "t")
    quiet = Latency((2.0, 2.1, 1.9, 2.0), (4,), 0.4, "t")
    merged = Latency.merge([disturbed, quiet])
    assert merged.round_sizes == (3, 4) and merged.calls_per_sample == (1, 4)
    assert merged.rounds == [(3.0, 3.1, 2.9), (2.0, 2.1, 1.9, 2.0)]
    assert merged.first_call_s == 0.5
    assert merged.median_s == 2.0 and merged.pooled_median_s == 2.1
    assert abs(merged.round_spread - 0.5) < 1e-12
    assert merged.noisy  # quiet samples, but the rounds disagree by 50%


def test_round_sizes_must_account_for_every_sample():
    with pytest.raises(ValueError, match="round sizes"):
        Latency((1.0, 2.0, 3.0), (1, 1), 0.0, "t", round_sizes=(1, 1))


def test_the_summary_says_why_a_latency_is_noisy():
    from attnbench.presenting.summary import summary_table
    from attnbench.storage.results import Row
    from attnbench.testing import small_case

    quiet_rounds_apart = Latency.merge([Latency((3.0, 3.0, 3.0), (1,), 0, "t"), Latency((2.0, 2.0, 2.0), (1,), 0, "t")])
    table = summary_table([Row("r", "x", small_case(), "ok", latency=quiet_rounds_apart)])
    assert "noisy: rounds 50% apart" in table and "IQR" not in table.split("noisy:")[1]


class ClockEvent:
    """A stand-in for torch.cuda.Event on the CPU: record() reads a clock."""

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: ClockEvent) -> float:
        return (end.at - self.at) * 1e3


def test_cold_timing_flushes_before_every_call_and_leaves_the_flush_out():
    from attnbench.measuring.timing import LastResult, event_timer

    order = []

    def call():
        order.append("call")
        time.sleep(0.002)
        return len(order)

    def flush():
        order.append("flush")
        time.sleep(0.02)  # ten times the call: counted, it could not hide

    last = LastResult(call)
    seconds = event_timer(last, ClockEvent, flush=flush)(3)
    assert order == ["flush", "call"] * 3
    assert 3 * 0.002 <= seconds < 3 * 0.002 + 0.02
    assert last.kept[0] == 6  # the last call's result is kept

    order.clear()
    warm = event_timer(LastResult(call), ClockEvent)(3)
    assert order == ["call"] * 3 and warm >= 3 * 0.002


def test_the_row_says_whether_the_cache_was_flushed(monkeypatch):
    """The CPU is always timed warm, whatever the suite asked; on CUDA the suite's choice is taken
    and written down (here with events and a flush that run on the CPU)."""
    from attnbench.measuring import timing

    cpu, _ = measure_latency(lambda: 1, torch.device("cpu"), LatencySettings(0.01, 0.05, 3, cache="cold"), 0.0)
    assert cpu.cache == "warm"

    flushes = []
    monkeypatch.setattr(timing.torch.cuda, "Event", lambda enable_timing: ClockEvent())
    monkeypatch.setattr(timing, "_l2_bytes", lambda device: 0)
    monkeypatch.setattr(timing.torch, "empty", lambda *shape, dtype, device: FakeBuffer(flushes))
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    for cache in ("cold", "warm"):
        flushes.clear()
        latency, _ = measure_latency(lambda: time.sleep(0.001), torch.device("cuda"),
                                     LatencySettings(0.01, 0.05, 3, cache=cache), 0.0)
        assert latency.cache == cache and latency.timer.startswith("torch.cuda.Event")
        sizes = zip(latency.round_sizes, latency.calls_per_sample, strict=True)
        calls = sum(size * calls for size, calls in sizes) + 1
        assert len(flushes) == (calls if cache == "cold" else 0)


class FakeBuffer:
    def __init__(self, flushes: list) -> None:
        self.flushes = flushes

    def zero_(self) -> None:
        self.flushes.append(True)
