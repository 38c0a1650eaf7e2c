"""What a run's rows say, without measuring again: scaling fits and verdicts against the declared
complexity, crossover lengths, achieved throughput, and the error-latency Pareto front.

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

from attnbench.case import Case
from attnbench.grid import group_key
from attnbench.results import Row

Metric = Literal["latency", "memory"]
METRICS: tuple[Metric, ...] = ("latency", "memory")

FIT_POINTS = 4  # the largest measured seq_lens a fit uses: asymptotic behaviour, not start-up costs
# A declared exponent holds unless the measured one exceeds it by more than this plus two
# standard errors: on a CPU, cache and allocator effects bend curves by about a tenth.
EXPONENT_MARGIN = 0.2


@dataclass(frozen=True)
class Declared:
    """What an implementation says of itself, kept with each run (``implementations.json``)."""

    exact: bool
    time_complexity: str
    memory_complexity: str
    time_exponent: float
    memory_exponent: float


@dataclass(frozen=True)
class ScalingFit:
    implementation: str
    group: Case  # the fixed axes (seq_len blank)
    metric: Metric
    seq_lens: tuple[int, ...]  # the points fitted
    exponent: float | None  # least-squares slope of log(metric) on log(seq_len)
    stderr: float | None  # its standard error; None with two points
    declared: str | None  # e.g. "n^2"; None when the run did not record it
    declared_exponent: float | None

    @property
    def verdict(self) -> Literal["holds", "does not hold", "undetermined"]:
        if self.exponent is None or self.declared_exponent is None:
            return "undetermined"
        if self.exponent > self.declared_exponent + EXPONENT_MARGIN + 2 * (self.stderr or 0.0):
            return "does not hold"
        return "holds"

    @property
    def measured(self) -> str:
        if self.exponent is None:
            return "fewer than 2 measured points"
        spread = f" ± {self.stderr:.2f}" if self.stderr is not None else ""
        return f"n^{self.exponent:.2f}{spread} over {self.seq_lens[0]}–{self.seq_lens[-1]}"

    def sentence(self) -> str:
        """'declared n, measured n^1.93 ± 0.04 over 2048–16384: does not hold'."""
        declared = self.declared or "unknown"
        return f"declared {declared}, measured {self.measured}: {self.verdict}"


@dataclass(frozen=True)
class Crossover:
    implementation: str
    group: Case
    metric: Metric
    against: str  # "best exact": the fastest (or leanest) exact implementation at each seq_len
    seq_len: float | None  # interpolated; None when not within the measured range
    text: str


@dataclass(frozen=True)
class Throughput:
    row: Row
    flops: float
    achieved_flops: float  # per second
    fraction_of_matmul: float | None  # of the run's measured matmul throughput on that device and dtype


@dataclass(frozen=True)
class ParetoPoint:
    row: Row
    error: float  # relative Frobenius error of the output against float64 exact attention
    on_front: bool  # no other implementation is both faster and more accurate at this point


def curves(rows: Sequence[Row]) -> dict[tuple[str, Case], list[Row]]:
    """Rows per (implementation, fixed axes), ascending in seq_len."""
    by_curve: dict[tuple[str, Case], list[Row]] = defaultdict(list)
    for row in rows:
        by_curve[(row.implementation, group_key(row.case))].append(row)
    return {key: sorted(points, key=lambda row: row.case.seq_len) for key, points in by_curve.items()}


def metric_value(row: Row, metric: Metric) -> float | None:
    """Median latency (s) or allocator peak (bytes) of a row that ran; None otherwise."""
    if row.status not in ("ok", "incorrect"):
        return None
    if metric == "latency":
        return row.latency.median_s if row.latency else None
    peak = row.memory.peak_bytes if row.memory else None
    return float(peak) if peak else None


def scaling_fits(rows: Sequence[Row], declared: Mapping[str, Declared]) -> list[ScalingFit]:
    fits = []
    for (name, group), points in curves(rows).items():
        info = declared.get(name)
        for metric in METRICS:
            measured = [(row.case.seq_len, value) for row in points if (value := metric_value(row, metric))]
            measured = measured[-FIT_POINTS:]
            exponent, stderr = loglog_slope(measured) if len(measured) >= 2 else (None, None)
            text = None if info is None else (info.time_complexity if metric == "latency" else info.memory_complexity)
            exponent_declared = None if info is None else (
                info.time_exponent if metric == "latency" else info.memory_exponent
            )
            fits.append(ScalingFit(name, group, metric, tuple(n for n, _ in measured), exponent, stderr, text,
                                   exponent_declared))
    return fits


def crossovers(rows: Sequence[Row], declared: Mapping[str, Declared]) -> list[Crossover]:
    """For each approximate implementation: from which seq_len it beats the best exact one."""
    by_curve = curves(rows)
    results = []
    for group in dict.fromkeys(group for _, group in by_curve):
        exact = [points for (name, g), points in by_curve.items() if g == group and _is_exact(name, declared)]
        for (name, g), points in by_curve.items():
            if g != group or _is_exact(name, declared) or name not in declared:
                continue
            for metric in METRICS:
                best = _best_per_seq_len(exact, metric)
                mine = {row.case.seq_len: value for row in points if (value := metric_value(row, metric))}
                seq_len, text = crossover_between(mine, best, "faster" if metric == "latency" else "leaner")
                results.append(Crossover(name, group, metric, "best exact", seq_len, text))
    return results


def throughputs(rows: Sequence[Row], declared: Mapping[str, Declared], matmul_flops: Mapping[str, float]) -> list[
    Throughput
]:
    """Achieved FLOP/s of exact implementations, counted as FlashAttention's benchmarks count."""
    results = []
    for row in rows:
        if not _is_exact(row.implementation, declared) or metric_value(row, "latency") is None:
            continue
        flops = attention_flops(row.case)
        achieved = flops / row.latency.median_s
        peak = matmul_flops.get(matmul_key(row.case.device, row.case.dtype_name))
        results.append(Throughput(row, flops, achieved, achieved / peak if peak else None))
    return results


def attention_flops(case: Case) -> float:
    """4·B·H·N²·D forward (two matmuls), halved when causal; backward counts 2.5× forward."""
    forward = 4.0 * case.batch * case.heads * case.seq_len**2 * case.head_dim
    if case.causal:
        forward /= 2
    return forward * (3.5 if case.backward else 1.0)


def matmul_key(device: str, dtype_name: str) -> str:
    return f"{device}/{dtype_name}"


def pareto(rows: Sequence[Row]) -> list[ParetoPoint]:
    """At each point (fixed axes and seq_len), who is not beaten on both error and latency."""
    by_point: dict[Case, list[tuple[Row, float]]] = defaultdict(list)
    for row in rows:
        error = output_error(row)
        if metric_value(row, "latency") is not None and error is not None and math.isfinite(error):
            by_point[row.case].append((row, error))
    points = []
    for entries in by_point.values():
        for row, error in entries:
            beaten = any(
                other.latency.median_s <= row.latency.median_s and other_error <= error
                and (other.latency.median_s < row.latency.median_s or other_error < error)
                for other, other_error in entries if other is not row
            )
            points.append(ParetoPoint(row, error, not beaten))
    return points


def output_error(row: Row) -> float | None:
    """Relative Frobenius error of the output against float64 exact attention (NaN if it was NaN)."""
    figures = row.correctness.exact.get("out") if row.correctness else None
    return figures.rel_fro if figures else None


def _is_exact(name: str, declared: Mapping[str, Declared]) -> bool:
    return name in declared and declared[name].exact


def _best_per_seq_len(curves_: list[list[Row]], metric: Metric) -> dict[int, float]:
    best: dict[int, float] = {}
    for points in curves_:
        for row in points:
            value = metric_value(row, metric)
            if value is not None and value < best.get(row.case.seq_len, math.inf):
                best[row.case.seq_len] = value
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


def loglog_slope(points: Sequence[tuple[int, float]]) -> tuple[float, float | None]:
    """Least-squares slope of log(value) on log(seq_len), and its standard error (≥ 3 points)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(value) for _, value in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    if len(points) < 3:
        return slope, None
    intercept = mean_y - slope * mean_x
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(residual / (len(points) - 2) / sxx)
