"""What the harness finds about a point from its own figures, shown beside them in every report.

The runner flags each row as it finishes; ``attnbench report`` flags again with the run's final
yardstick (the matmul throughput is re-measured during the run and the best kept): a flag
written to rows.jsonl is kept, except that implausible speed and implausible declared work are
judged against the final, highest yardstick.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence

from attnbench.contract.implementation import DEFAULT_TOLERANCES
from attnbench.measuring.flops import attention_flops
from attnbench.measuring.figures import outside_torch
from attnbench.storage.results import Flag, Row
from attnbench.support.units import format_bytes

# Exact attention does the work of two matmuls and more; on the CPU it has reached 82% of the
# matmul yardstick here. A quarter above it is beyond what the hardware allows.
IMPLAUSIBLE_HEADROOM = 1.25
# A call on fresh inputs (one per round, each on values no earlier call saw) this much slower
# than its round's timed calls, in every round, means the timed calls did not compute what they returned:
# more than FRESH_CALL_FACTOR times and FRESH_CALL_FLOOR_S longer, or (a single call of under a
# millisecond carries the noise of its cold start) SHORT_CALL_FACTOR times and SHORT_CALL_FLOOR_S.
# Honest built-ins on the quick suite (2-core VM, one thread, quiet): at most 1.2× for calls over
# 5 ms, 2.4× (0.5 ms longer) for calls under 1 ms.
FRESH_CALL_FACTOR = 1.5
FRESH_CALL_FLOOR_S = 5e-3
SHORT_CALL_FACTOR = 4.0
SHORT_CALL_FLOOR_S = 50e-6
# CPUs other processes kept busy, on average, while a point was timed.
LOAD_CPUS = 0.5
# The worker's own time for a block against the harness's clock around it: the harness's round
# trip (asking, waking the worker, the answer) took at most 4% of a block (median per point) on
# the quick suite here, 8% on a loaded machine. A round whose typical block the worker states
# this much shorter than the harness saw did not report the time that passed; so for the call on
# fresh inputs, beyond the floor (one call's round trip) and the time its inputs and outputs take
# to pass through the file both sides share.
STATED_SHORTFALL = 0.1
FRESH_SHORTFALL_FLOOR_S = 2e-3
SHARED_BYTES_PER_S = 1e9
# CPU time of the worker and what it started, against its threads × the time its blocks took.
CPU_OVER_THREADS = 1.25
CPU_OVER_FLOOR_S = 0.02


def flags_of(row: Row, exact: bool, yardstick: Mapping[str, float]) -> tuple[Flag, ...]:
    """Every flag the row's figures call for; ``yardstick``: matmul FLOP/s per "device/dtype"."""
    found = [*_speed(row, exact, yardstick), *_declared_work(row, yardstick), *_fresh_calls(row), *_load(row),
             *_throttled(row), *_tolerance(row), *_memory(row), *_stated_time(row), *_cpu_time(row)]
    return tuple(found)


def with_flags(row: Row, exact: bool, yardstick: Mapping[str, float]) -> Row:
    """The row with its stored flags and any new ones (one of each kind). Implausible speed is
    judged afresh: the yardstick only grows during a run, so the final one is the fairest."""
    stored = tuple(flag for flag in row.flags if flag.kind not in ("implausible_speed", "implausible_work"))
    kinds = {flag.kind for flag in stored}
    found = stored + tuple(flag for flag in flags_of(row, exact, yardstick) if flag.kind not in kinds)
    return dataclasses.replace(row, flags=found) if found != row.flags else row


def refresh(rows: Sequence[Row], exact: Mapping[str, bool], yardstick: Mapping[str, float]) -> tuple[Row, ...]:
    return tuple(with_flags(row, exact.get(row.implementation, False), yardstick) for row in rows)


def _speed(row: Row, exact: bool, yardstick: Mapping[str, float]) -> list[Flag]:
    """Faster than the device's matmul in the row's dtype or in float32 allows: an implementation
    may compute in float32 where the device has no fast kernels for its dtype (float16 on many CPUs)."""
    peak_dtype, peak = best_yardstick(row, yardstick)
    if not exact or row.latency is None or not peak:
        return []
    achieved = attention_flops(row.case) / row.latency.median_s
    if achieved <= IMPLAUSIBLE_HEADROOM * peak:
        return []
    return [Flag("implausible_speed", f"implausible speed: {achieved / 1e9:.4g} GFLOP/s is {achieved / peak:.0%} of "
                                      f"the device's best measured matmul ({peak / 1e9:.4g} GFLOP/s in {peak_dtype}); "
                                      "not a result")]


def _declared_work(row: Row, yardstick: Mapping[str, float]) -> list[Flag]:
    """An approximation's declared FLOPs that its latency could only do beyond the device's matmul
    rate: the declaration is wrong (the latency still stands; the throughput is not shown)."""
    peak_dtype, peak = best_yardstick(row, yardstick)
    if row.work is None or not row.work.declared or row.latency is None or not peak:
        return []
    achieved = row.work.flops / row.latency.median_s
    if achieved <= IMPLAUSIBLE_HEADROOM * peak:
        return []
    return [Flag("implausible_work",
                 f"implausible declared work: {row.work.flops:.3g} FLOPs in {row.latency.median_s:.3g} s would be "
                 f"{achieved / peak:.0%} of the device's best measured matmul ({peak / 1e9:.4g} GFLOP/s in "
                 f"{peak_dtype}); no throughput shown")]


def best_yardstick(row: Row, yardstick: Mapping[str, float]) -> tuple[str, float | None]:
    """The highest matmul rate measured on the row's device, in its dtype or in float32."""
    dtype = row.case.dtype_name
    peaks = {name: yardstick.get(row.yardstick_key(name)) for name in (dtype, "float32")}
    return max(((name, value) for name, value in peaks.items() if value), key=lambda item: item[1],
               default=(dtype, None))


def _fresh_calls(row: Row) -> list[Flag]:
    """Each round's call on fresh inputs against that round's timed calls. One slow call is no
    evidence on a busy machine (a preempted 30 µs call takes milliseconds): the latency is voided
    only when every round's fresh call was slow and at least one of those rounds ran quiet."""
    latency = row.latency
    if latency is None or not latency.fresh_call_s:
        return []
    count = len(latency.fresh_call_s)
    medians = latency.round_medians_s if len(latency.round_sizes) == count else [latency.median_s] * count
    loads = latency.round_loads if len(latency.round_loads) == count else (None,) * count
    if not all(_slower(fresh, median) for fresh, median in zip(latency.fresh_call_s, medians, strict=True)):
        return []
    if not any(load is None or load <= LOAD_CPUS for load in loads):
        return []  # (every round under load: the under_load flag says so)
    ratio = min(fresh / median for fresh, median in zip(latency.fresh_call_s, medians, strict=True))
    return [Flag("fresh_inputs_slower", f"a call on fresh inputs took {ratio:.3g}× the timed calls' median "
                                        f"or more, in each of {count} round(s) (outputs cached between calls?); "
                                        "not a result")]


def _slower(fresh_s: float, median_s: float) -> bool:
    excess = fresh_s - median_s
    return (fresh_s > FRESH_CALL_FACTOR * median_s and excess > FRESH_CALL_FLOOR_S) or (
        fresh_s > SHORT_CALL_FACTOR * median_s and excess > SHORT_CALL_FLOOR_S)


def _stated_time(row: Row) -> list[Flag]:
    """The worker stated less time than the harness's clock saw pass, in most rounds: its blocks
    (typical block, per round) or its call on fresh inputs."""
    latency = row.latency
    if latency is None or not latency.observed_s:
        return []
    short_rounds = []
    for samples, observed in zip(latency.rounds, latency.observed_rounds, strict=True):
        shortfalls = [1 - stated / seen for stated, seen in zip(samples, observed, strict=True) if seen > 0]
        short_rounds.append(bool(shortfalls) and statistics.median(shortfalls) > STATED_SHORTFALL)
    passing = _call_bytes(row) / SHARED_BYTES_PER_S
    fresh = [seen - stated > max(FRESH_SHORTFALL_FLOOR_S, STATED_SHORTFALL * seen) + passing
             for stated, seen in zip(latency.fresh_call_s, latency.fresh_observed_s, strict=True)]
    found = []
    if sum(short_rounds) * 2 > len(short_rounds):
        stated = sum(latency.samples_s) / len(latency.samples_s)
        seen = sum(latency.observed_s) / len(latency.observed_s)
        found.append(f"its timed calls took {seen * 1e3:.4g} ms each by the harness's clock, {stated * 1e3:.4g} ms "
                     "as the worker stated them")
    if fresh and sum(fresh) * 2 > len(fresh):
        found.append(f"its call on fresh inputs took {max(latency.fresh_observed_s) * 1e3:.4g} ms by the harness's "
                     f"clock, {max(latency.fresh_call_s) * 1e3:.4g} ms as stated")
    if not found:
        return []
    return [Flag("timing_disagrees", f"stated times disagree with the harness's clock: {'; '.join(found)}; "
                                     "not a result")]


def _call_bytes(row: Row) -> int:
    """The bytes of one call's inputs and outputs (gradients too in training)."""
    case = row.case
    queries = case.batch * case.heads * case.query_len * case.head_dim
    keys = case.batch * case.kv_heads * (case.query_len if case.decode else case.key_len) * case.head_dim
    return (queries * (4 if case.backward else 2) + keys * (4 if case.backward else 2)) * case.dtype.itemsize


def _cpu_time(row: Row) -> list[Flag]:
    """More CPU time than its threads could give in the time its timed blocks took (threads it
    started itself, processes it farmed work out to): not comparable with points that kept to them."""
    latency = row.latency
    if latency is None or latency.threads is None or not latency.round_wall_s:
        return []
    known = [(cpu, wall) for cpu, wall in zip(latency.round_cpu_s, latency.round_wall_s, strict=True) if cpu is not None]
    cpu, wall = sum(pair[0] for pair in known), sum(pair[1] for pair in known)
    if not wall:
        return []
    if cpu <= CPU_OVER_THREADS * latency.threads * wall + CPU_OVER_FLOOR_S:
        return []
    return [Flag("cpu_over_threads", f"used {cpu / wall:.2g} CPUs while timed, with {latency.threads} thread(s) "
                                     "given; not comparable, not a result")]


def _load(row: Row) -> list[Flag]:
    load = row.latency.load if row.latency is not None else None
    if load is None or load <= LOAD_CPUS:
        return []
    return [Flag("under_load", f"measured under load: other processes kept {load:.1f} CPUs busy while it was timed")]


def _throttled(row: Row) -> list[Flag]:
    reasons = row.latency.throttling if row.latency is not None else []
    if not reasons:
        return []
    return [Flag("throttled", f"GPU throttled while timed: {'; '.join(reasons)}")]


def _tolerance(row: Row) -> list[Flag]:
    correctness = row.correctness
    if correctness is None or correctness.tolerance is None or correctness.judged_against is None:
        return []
    atol, rtol = correctness.tolerance
    default = DEFAULT_TOLERANCES[row.case.dtype]
    if atol <= default.atol and rtol <= default.rtol:
        return []
    factor = max(atol / default.atol, rtol / default.rtol)
    return [Flag("loose_tolerance", f"loose tolerance: judged at atol={atol:g}, rtol={rtol:g}, {factor:.3g}× the "
                                    f"{row.case.dtype_name} default")]


def _memory(row: Row) -> list[Flag]:
    memory = row.memory
    if memory is None:
        return []
    found = []
    if memory.rss_peak_bytes is not None and memory.allocator_peak_bytes is not None and outside_torch(memory.rss_peak_bytes, memory.allocator_peak_bytes):
        process, counted = format_bytes(memory.rss_peak_bytes), format_bytes(memory.allocator_peak_bytes)
        found.append(Flag("memory_outside_torch", f"memory outside torch's allocator: process peak {process} "
                                                  f"against {counted} counted by torch"))
    if memory.state_kept_bytes != memory.state_bytes:
        kept, counted = format_bytes(memory.kept_bytes or 0), format_bytes(memory.state_bytes or 0)
        found.append(Flag("state_outside_torch", f"state outside torch's allocator: its processes keep {kept} "
                                                 f"between steps against {counted} counted by torch (the state "
                                                 "figure is theirs)"))
    return found
