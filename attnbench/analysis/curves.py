"""What a run's rows say, without measuring again: the curves and their figures, crossover
lengths, achieved throughput, and the error-latency Pareto front (scaling fits and verdicts:
attnbench.analysis.scaling).

Everything here is computed from the rows and the run's metadata (declared complexity,
exactness, the matmul throughput measured once per run), so ``attnbench report`` can rebuild
it from a stored run folder.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from attnbench.contract.case import Case, curve_x, group_key
from attnbench.contract.work import exact_attention
from attnbench.measuring.figures import Work
from attnbench.storage.flags import best_yardstick
from attnbench.storage.results import Row
from attnbench.storage.run_folder import Declared

Metric = Literal["latency", "memory"]
METRICS: tuple[Metric, ...] = ("latency", "memory")


@dataclass(frozen=True)
class Crossover:
    implementation: str
    group: Case
    metric: Metric
    against: str  # "best exact": the fastest (or leanest) exact implementation at each seq_len
    seq_len: float | None  # interpolated; None when not within the measured range
    text: str
    budget: float  # only the points with an output error at most this were compared


@dataclass(frozen=True)
class Throughput:
    row: Row
    flops: float
    achieved_flops: float  # per second
    # Of the run's measured matmul throughput on that device, in the faster of the row's dtype and
    # float32 (matmul_dtype): an implementation may compute half precision in float32, and where the
    # device has no fast half-precision kernels (most CPUs) that is the arithmetic that ran.
    fraction_of_matmul: float | None
    formula: str  # how the FLOPs were counted
    matmul_dtype: str = ""


@dataclass(frozen=True)
class ParetoPoint:
    row: Row
    error: float  # relative Frobenius error of the output against float64 exact attention
    on_front: bool  # nothing else at this point is both cheaper and more accurate
    cost: float  # what the front was drawn against: median latency (s) or peak memory (bytes)


def curves(rows: Sequence[Row]) -> dict[tuple[str, Case], list[Row]]:
    """Rows per (implementation, fixed axes), ascending in seq_len."""
    by_curve: dict[tuple[str, Case], list[Row]] = defaultdict(list)
    for row in rows:
        by_curve[(row.implementation, group_key(row.case))].append(row)
    return {key: sorted(points, key=lambda row: curve_x(row.case)) for key, points in by_curve.items()}


def metric_value(row: Row, metric: Metric) -> float | None:
    """Median latency (s) or memory (bytes: the peak of the call; a decode step's state) of a row
    that ran; None otherwise, and None for a latency the harness flagged as no result
    (implausible speed, cached outputs, stated times the harness's clock disagrees with)."""
    if row.status not in ("ok", "incorrect"):
        return None
    if metric == "latency":
        return row.latency.median_s if row.latency and not row.latency_voided else None
    if row.case.decode:  # what a decode step costs in memory is what it keeps between steps
        state = row.memory.state_kept_bytes if row.memory else None
        return float(state) if state else None
    peak = row.memory.peak_bytes if row.memory else None
    return float(peak) if peak else None


def result_latency(row: Row) -> float | None:
    """The median latency that throughput, bandwidth and speed-up are computed from: an ``ok``
    row's, where it is a result (an incorrect point's latency is shown, but its speed achieved nothing)."""
    return metric_value(row, "latency") if row.status == "ok" else None


def memory_name(case: Case) -> str:
    """What the memory metric is for the case's curve: a decode step's state, else the call's peak."""
    return "state kept" if case.decode else "peak memory"


def crossovers(rows: Sequence[Row], declared: Mapping[str, Declared], budget: float) -> list[Crossover]:
    """For each approximate implementation: from which seq_len it beats the best exact one,
    counting only its points whose output error is within ``budget`` (relative Frobenius)."""
    by_curve = curves(rows)
    results = []
    for group in dict.fromkeys(group for _, group in by_curve):
        exact = [points for (name, g), points in by_curve.items() if g == group and is_exact(name, declared)]
        for (name, g), points in by_curve.items():
            if g != group or is_exact(name, declared) or name not in declared:
                continue
            kept = [row for row in points if within_budget(row, budget)]
            for metric in METRICS:
                best = _best_per_seq_len(exact, metric)
                mine = {curve_x(row.case): value for row in kept if (value := metric_value(row, metric))}
                if not mine and any(metric_value(row, metric) for row in points):
                    seq_len, text = None, f"error over {budget:g} wherever it ran: not compared"
                else:
                    seq_len, text = crossover_between(mine, best, "faster" if metric == "latency" else "leaner")
                results.append(Crossover(name, group, metric, "best exact", seq_len, text, budget))
    return results


def within_budget(row: Row, budget: float) -> bool:
    """The output's error against exact attention is known, finite and at most ``budget``."""
    error = output_error(row)
    return error is not None and math.isfinite(error) and error <= budget


def throughputs(rows: Sequence[Row], declared: Mapping[str, Declared], matmul_flops: Mapping[str, float]) -> list[
    Throughput
]:
    """Achieved FLOP/s of every ``ok`` row with a latency and a work count (an incorrect point's
    speed is no achievement): exact attention as the harness
    counts it, an approximation's as it declared it (attnbench.contract.work); none for a row
    without a declaration or whose declaration its latency makes implausible."""
    results = []
    for row in rows:
        latency = result_latency(row)
        if latency is None or row.throughput_voided:
            continue  # (a flagged latency is no result: its throughput is in the flag's message)
        work = row.work
        if work is None and is_exact(row.implementation, declared):  # a row from before work was stored
            count = exact_attention(row.case)
            work = Work(count.flops, count.formula, declared=False)
        if work is None:
            continue
        achieved = work.flops / latency
        matmul_dtype, peak = best_yardstick(row, matmul_flops)
        results.append(Throughput(row, work.flops, achieved, achieved / peak if peak else None, work.formula,
                                  matmul_dtype if peak else ""))
    return results


def achieved_bandwidth(row: Row) -> float | None:
    """Bytes per second a decode step moved (its counted or declared bytes over its median
    latency); None for a row not ``ok``, without a latency that is a result or without a count."""
    latency = result_latency(row)
    return row.traffic.bytes / latency if row.traffic and latency else None


def tokens_per_second(row: Row) -> float | None:
    """Tokens a decode step produces per second: batch × q_len new tokens per step."""
    latency = metric_value(row, "latency")
    return row.case.batch * row.case.query_len / latency if row.case.decode and latency else None


def pareto(rows: Sequence[Row], metric: Metric = "latency") -> list[ParetoPoint]:
    """At each point (fixed axes and seq_len), who is not beaten on both error and ``metric``
    (latency or peak memory): the accuracy-cost frontier over implementations and variants."""
    by_point: dict[Case, list[tuple[Row, float, float]]] = defaultdict(list)
    for row in rows:
        error, cost = output_error(row), metric_value(row, metric)
        if cost is not None and error is not None and math.isfinite(error):
            by_point[row.case].append((row, cost, error))
    points = []
    for entries in by_point.values():
        for row, cost, error in entries:
            beaten = any(other_cost <= cost and other_error <= error and (other_cost < cost or other_error < error)
                         for other, other_cost, other_error in entries if other is not row)
            points.append(ParetoPoint(row, error, not beaten, cost))
    return points


def output_error(row: Row) -> float | None:
    """Relative Frobenius error of the output against float64 exact attention (NaN if it was NaN)."""
    figures = row.correctness.exact.get("out") if row.correctness else None
    return figures.rel_fro if figures else None


def is_exact(name: str, declared: Mapping[str, Declared]) -> bool:
    return name in declared and declared[name].exact


def can_be_baseline(row: Row) -> bool:
    """Only a point of an exact implementation that is correct at the dtype's default tolerance
    (not merely at a looser one it declared) is what others are compared with."""
    correctness = row.correctness
    return row.status == "ok" and (correctness is None or correctness.within_default_tolerance is not False)


def _best_per_seq_len(curves_: list[list[Row]], metric: Metric) -> dict[int, float]:
    best: dict[int, float] = {}
    for points in curves_:
        for row in points:
            value = metric_value(row, metric) if can_be_baseline(row) else None
            if value is not None and value < best.get(curve_x(row.case), math.inf):
                best[curve_x(row.case)] = value
    return best


def crossover_between(mine: dict[int, float], best: dict[int, float], better: str) -> tuple[float | None, str]:
    """The seq_len where log(mine / best) turns negative, interpolated linearly in log(seq_len)."""
    if not mine:
        return None, "not measured here (no point ran)"
    common = sorted(set(mine) & set(best))
    if not common:
        return None, "no exact implementation measured at the same seq_len"
    ratios = [(n, math.log(mine[n] / best[n])) for n in common]
    if all(r < 0 for _, r in ratios):
        return float(common[0]), f"{better} at every measured seq_len (from {common[0]} or less)"
    # The last sign change from not better to better: where it stays better from then on.
    for (n0, r0), (n1, r1) in reversed(list(zip(ratios, ratios[1:], strict=False))):
        if r0 >= 0 > r1 and all(r < 0 for n, r in ratios if n >= n1):
            log_n = math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1)
            return math.exp(log_n), f"{better} from ~{math.exp(log_n):.0f} (between {n0} and {n1})"
    return None, f"not {better} within the measured range ({common[0]}–{common[-1]})"
