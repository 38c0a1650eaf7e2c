"""Flags that void a figure fire on evidence, not on noise: the call on fresh inputs."""

from __future__ import annotations

from attnbench.measuring.figures import Latency
from attnbench.storage.flags import with_flags
from attnbench.storage.results import Row
from attnbench.testing import small_case

STEP_S = 30e-6  # a decode step's time


def _row(fresh_s: tuple[float, ...], loads: tuple[float | None, ...]) -> Row:
    rounds = len(fresh_s)
    latency = Latency(samples_s=(STEP_S,) * 5 * rounds, calls_per_sample=(100,) * rounds, first_call_s=1e-3,
                      timer="perf_counter", round_sizes=(5,) * rounds, round_loads=loads, fresh_call_s=fresh_s)
    return Row("run", "honest", small_case(), "ok", latency=latency)


def _kinds(row: Row) -> set[str]:
    return {flag.kind for flag in with_flags(row, exact=True, yardstick={}).flags}


def test_a_fresh_call_slowed_on_a_busy_machine_voids_nothing():
    # Preempted once, 10× its step, in both rounds, with other work keeping 1.5 CPUs busy.
    kinds = _kinds(_row((10 * STEP_S, 12 * STEP_S), (1.5, 1.5)))
    assert "fresh_inputs_slower" not in kinds and "under_load" in kinds


def test_one_slow_fresh_call_among_fast_ones_voids_nothing():
    assert "fresh_inputs_slower" not in _kinds(_row((15 * STEP_S, STEP_S * 1.1, STEP_S), (0.0, 0.0, 0.0)))


def test_fresh_calls_slow_in_every_round_on_a_quiet_machine_void_the_latency():
    row = with_flags(_row((10 * STEP_S, 12 * STEP_S, 11 * STEP_S), (0.1, 0.0, 0.2)), exact=True, yardstick={})
    flag = next(flag for flag in row.flags if flag.kind == "fresh_inputs_slower")
    assert "in each of 3 round(s)" in flag.message and row.latency_voided


def test_a_decode_cache_kept_outside_torch_is_its_state_and_flagged():
    import toys

    from attnbench.settings.suite import LatencySettings, Measure

    case = small_case(batch=1, heads=8, seq_len=8192, head_dim=64, mode="decode", q_len=1)
    measure = Measure(latency=LatencySettings(min_run_time_s=0.01, max_run_time_s=0.1, rounds=1), memory=True,
                      threads=1)
    result = toys.run_alone(toys.NumpyCacheDecoder(), case, measure)
    assert result.outcome.status == "ok", result.outcome
    memory = result.outcome.memory
    cache_bytes = 2 * 8 * case.key_len * 64 * 4  # keys and values, float32
    assert (memory.state_bytes or 0) < cache_bytes / 4  # torch counted almost none of it
    assert memory.state_kept_bytes >= 0.9 * cache_bytes  # the harness's own reading sees it
    row = with_flags(Row("run", "numpy_cache", case, "ok", memory=memory, latency=result.outcome.latency),
                     exact=True, yardstick={})
    assert "state_outside_torch" in {flag.kind for flag in row.flags}
