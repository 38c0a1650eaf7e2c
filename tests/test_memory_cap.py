"""A point's memory cap means memory in use: `oom` only for a point that needed more than the cap,
whichever way this machine holds it (a memory cgroup per worker, or RLIMIT_DATA alone)."""

from __future__ import annotations

import dataclasses

import pytest
import toys

from attnbench.contract.registry import Registry
from attnbench.execution.local import executor as local_executor
from attnbench.execution.local import memory_group
from attnbench.measuring.figures import Measurement
from attnbench.settings.suite import LatencySettings, Limits, Measure
from attnbench.testing import small_case

MANY_CALLS = Measure(latency=LatencySettings(min_run_time_s=0.0, max_run_time_s=30.0, min_samples=16, rounds=1),
                     memory=True, threads=1)
CAP_GB = 0.375  # 384 MiB: the toy's blocks once made its heap hold 457 to 521 MiB


@pytest.fixture(params=["cgroup", "rlimit"])
def held_by(request, monkeypatch) -> str:
    """Each test runs with the cap held by a memory cgroup (where one can be made here) and by
    RLIMIT_DATA alone, as on a machine without one."""
    if request.param == "cgroup" and memory_group.writable_hierarchy() is None:
        pytest.skip("no memory cgroup can be made on this machine")
    if request.param == "rlimit":
        monkeypatch.setattr(memory_group, "writable_hierarchy", lambda: None)
    return request.param


def test_a_point_that_peaks_under_half_its_cap_stays_ok_over_many_calls(held_by):
    result = toys.run_alone(toys.Toy("within_cap", toys.frees_in_naive_order), small_case(), MANY_CALLS,
                            memory_gb=CAP_GB)
    assert isinstance(result.outcome, Measurement), result.outcome
    assert result.outcome.status == "ok"
    assert len(result.outcome.latency.samples_s) >= 12
    assert result.outcome.memory.rss_peak_bytes < CAP_GB * 2**30 / 2  # the harness's own reading


def test_a_point_that_needs_twice_its_cap_ends_oom(held_by):
    result = toys.run_alone(toys.Toy("over_cap", toys.touches_two_gib), small_case(), MANY_CALLS, memory_gb=1.0)
    assert result.outcome.status == "oom", result.outcome
    expected = "the kernel ended the worker" if held_by == "cgroup" else "can't allocate memory"
    assert any(expected in reason for reason in result.outcome.reasons), result.outcome.reasons


def test_each_row_says_how_its_cap_was_held(held_by):
    limits = Limits(memory_gb=2.0)
    held = local_executor.LocalExecutor(Registry()).memory_cap_held(limits, "cpu")
    assert held.startswith("2.0 GiB")
    assert ("a memory cgroup" in held) == (held_by == "cgroup")
    assert ("RLIMIT_DATA" in held) == (held_by == "rlimit")
    assert local_executor.LocalExecutor(Registry()).memory_cap_held(dataclasses.replace(limits, memory_gb=None), "cuda") \
        == "no cap"
