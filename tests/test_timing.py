"""Latency keeps its raw samples; statistics are derived from them."""

from __future__ import annotations

import time

import pytest
import torch

from attnbench.measuring.figures import Latency
from attnbench.measuring.timing import BLOCK_TARGET_S, BlockTiming, flushed_calls, local_blocks, timed_blocks
from attnbench.settings.suite import LatencySettings


def test_blocks_last_long_enough_for_the_round_trip_to_be_small():
    x = torch.randn(64, 64)
    blocks = timed_blocks(local_blocks(lambda: x @ x, torch.device("cpu")), LatencySettings(0.05, 0.2, 3))
    assert len(blocks.samples_s) >= 3 and blocks.calls_per_sample > 1
    assert all(block.calls == blocks.calls_per_sample for block in blocks.blocks)
    assert min(block.stated_s for block in blocks.blocks) >= BLOCK_TARGET_S / 4
    assert all(sample > 0 for sample in blocks.samples_s)


def test_slow_calls_still_give_the_minimum_number_of_samples_and_waste_no_call():
    asked = []

    def run(calls: int) -> BlockTiming:
        asked.append(calls)
        time.sleep(0.03 * calls)
        return BlockTiming(calls, 0.03 * calls, 0.03 * calls)

    blocks = timed_blocks(run, LatencySettings(0.01, 0.02, 4))
    assert len(blocks.samples_s) == 4 and blocks.calls_per_sample == 1
    assert asked == [1, 1, 1, 1]  # the calibration blocks are samples too


def test_one_disturbed_calibration_block_does_not_set_the_block_size():
    times = iter([0.008] + [0.0002] * 10_000)  # the first call is slow (cold), the rest 0.2 ms

    def run(calls: int) -> BlockTiming:
        seconds = sum(next(times) for _ in range(calls))
        return BlockTiming(calls, seconds, seconds)

    blocks = timed_blocks(run, LatencySettings(0.01, 0.2, 3))
    assert blocks.calls_per_sample >= 0.8 * BLOCK_TARGET_S / 0.0002


def test_the_run_times_are_wall_time_when_each_call_waits_on_an_untimed_flush():
    """A 5 µs kernel whose calls each follow a 100 µs L2 flush (cold cache on a GPU): its events
    state 5 µs a call, and the budget of 0.5 s is spent in 0.5 s of wall time, not 10 s."""
    wall = []

    def run(calls: int) -> BlockTiming:
        wall.append(calls * 105e-6)
        return BlockTiming(calls, calls * 5e-6, calls * 105e-6)

    noisy = iter([1.0, 3.0] * 100_000)  # samples that never settle: the maximum run time ends it

    def unsteady(calls: int) -> BlockTiming:
        block = run(calls)
        return BlockTiming(calls, block.stated_s * next(noisy), block.observed_s)

    blocks = timed_blocks(unsteady, LatencySettings(0.1, 0.5, 3))
    assert 0.5 <= sum(wall) <= 0.5 + 3 * BLOCK_TARGET_S
    assert blocks.observed_s[0] * blocks.calls_per_sample == pytest.approx(BLOCK_TARGET_S, rel=0.1)


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


def test_cold_timing_flushes_before_every_call_leaves_the_flush_out_and_waits_for_every_stream():
    order = []

    def call():
        order.append("call")
        time.sleep(0.002)
        return len(order)

    def flush():
        order.append("flush")
        time.sleep(0.02)  # ten times the call: counted, it could not hide

    seconds, last = flushed_calls([call] * 3, flush, ClockEvent, lambda: order.append("wait"))
    assert order == ["flush", "call"] * 3 + ["wait"]
    assert 3 * 0.002 <= seconds < 3 * 0.002 + 0.02
    assert last == 6  # the last call's result is kept


def test_the_cpu_is_timed_warm_whatever_the_suite_asked(registry):
    from attnbench.measuring.in_process import measure_case
    from attnbench.settings.suite import Measure
    from attnbench.testing import small_case

    measure = Measure(correctness=None, latency=LatencySettings(0.01, 0.05, 3, cache="cold"), memory=False)
    latency = measure_case(registry.get("flash"), small_case(seq_len=64), {}, measure).latency
    assert latency.cache == "warm" and "L2" not in latency.timer
    assert all(observed >= stated for observed, stated in zip(latency.observed_s, latency.samples_s, strict=True))
