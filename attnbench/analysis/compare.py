"""Two runs side by side, point by point: did anything get slower, leaner, more or less accurate?

A point is slower only when the Mann–Whitney test on the two runs' rounds says it is not noise
(p < ALPHA) and the ratio of medians passes the threshold (unless given, the runs' own noise:
analysis.noise). The test's units are the rounds' medians: each round is a fresh worker process,
while the samples within a round are back-to-back calls of one process, which share its luck (its
memory layout, its cores, what else ran then) and are not independent; pooled, they would count
one process's luck as many observations. With too few rounds for the test ever to reach ALPHA
(3 against 3 gives p ≥ 0.1) the point says so instead of a verdict (``rounds_needed``: what it
would take).

An implementation regresses on a curve (its points over seq_len, other axes fixed) when most of
those points are slower; a curve of one matched point gets no verdict of its own. One point alone
is not enough: on this shared machine a point's worker process sometimes runs in a slow mode
(same code, two runs: naive at N=512 4.1 ms and 9.5 ms, sparse at N=1024 16 ms and 31 ms, each
with a tight spread), which the samples of one run cannot see; a changed implementation is slower
at most of its seq_lens.

A point that was ``ok`` and is anything else now (crashed, incorrect, skipped, ...) is a
regression on its own, and so is one whose latency was a result and now is flagged as none.

Points are paired by what ran (analysis.matching): one whose options changed is shown as such,
with neither a speed verdict nor a place in a curve's.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from attnbench.analysis.matching import options_change, pair_points
from attnbench.analysis.noise import Threshold, noise_threshold
from attnbench.analysis.stats import mann_whitney_p, rounds_needed, smallest_p
from attnbench.contract.case import Case, group_key
from attnbench.contract.errors import UserError
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder

ALPHA = 0.01
TOO_FEW_ROUNDS = "too few rounds to test"
# A curve's verdict needs a curve: one matched point is that point's change, not the implementation's.
MIN_CURVE_POINTS = 2
ONE_POINT = "one point: not enough for a curve verdict"
ENVIRONMENT_KEYS = ("cpu_model", "cpus_usable", "torch_threads", "timing_variables", "devices", "python")


@dataclass(frozen=True)
class PointChange:
    implementation: str
    case: Case
    base: Row
    new: Row
    latency_ratio: float | None  # new median / base median
    p_value: float | None
    memory_ratio: float | None
    verdict: str  # "slower", "faster", "no significant change", "too few rounds to test", a status change
    options_changed: bool = False  # then no latency or memory ratio, no p-value: not the same point

    @property
    def series(self) -> str:
        """The series' name, or its old and new names where the same point was renamed (a variant)."""
        old, new = self.base.implementation, self.new.implementation
        return new if old == new else f"{old} → {new}"

    @property
    def untestable(self) -> bool:
        return self.verdict.startswith(TOO_FEW_ROUNDS)

    @property
    def effect(self) -> float:
        return abs(math.log(self.latency_ratio)) if self.latency_ratio else 0.0

    @property
    def lost_ok(self) -> bool:
        return not self.options_changed and self.base.status == "ok" and (
            self.new.status != "ok" or self.new.latency_voided and not self.base.latency_voided)


@dataclass(frozen=True)
class CurveChange:
    implementation: str
    group: Case  # the fixed axes (seq_len blank)
    points: int  # compared with a latency ratio
    slower: int
    median_ratio: float
    untested: int = 0  # of ``points``: too few rounds for the test to reach ALPHA

    @property
    def regressed(self) -> bool:
        return self.points >= MIN_CURVE_POINTS and self.slower * 2 > self.points

    @property
    def undecided(self) -> bool:
        """Not regressed, but it would be if the points that could not be tested were slower."""
        could_be = (self.slower + self.untested) * 2 > self.points
        return not self.regressed and self.points >= MIN_CURVE_POINTS and could_be

    @property
    def verdict(self) -> str:
        if self.points < MIN_CURVE_POINTS:
            return ONE_POINT  # the point's own change stands in the table of points
        if self.undecided:
            return f"too few points testable to tell ({self.points - self.untested} of {self.points})"
        return "REGRESSED" if self.regressed else ""


@dataclass(frozen=True)
class Comparison:
    changes: tuple[PointChange, ...]  # sorted: significant first, then by the size of the effect
    only_in_base: tuple[Row, ...]
    only_in_new: tuple[Row, ...]
    environment_differences: tuple[str, ...]
    threshold: Threshold

    @property
    def curves(self) -> tuple[CurveChange, ...]:
        by_curve: dict[tuple[str, Case], list[PointChange]] = {}
        for change in self.changes:
            if change.latency_ratio is not None:
                by_curve.setdefault((change.implementation, group_key(change.case)), []).append(change)
        return tuple(
            CurveChange(name, group, len(points), sum(c.verdict == "slower" for c in points),
                        statistics.median(c.latency_ratio for c in points), sum(c.untestable for c in points))
            for (name, group), points in sorted(by_curve.items(), key=lambda item: (item[0][0], item[0][1].describe()))
        )

    @property
    def regressions(self) -> tuple[CurveChange, ...]:
        return tuple(curve for curve in self.curves if curve.regressed)

    @property
    def status_regressions(self) -> tuple[PointChange, ...]:
        """Points that were ok and are not now (or whose latency is flagged as no result now)."""
        return tuple(change for change in self.changes if change.lost_ok)

    @property
    def options_changed(self) -> tuple[PointChange, ...]:
        """Points of the same series and case that ran with other options: not compared."""
        return tuple(change for change in self.changes if change.options_changed)

    @property
    def too_few_rounds(self) -> tuple[PointChange, ...]:
        """Points whose rounds are too few for the test ever to reach ALPHA."""
        return tuple(change for change in self.changes if change.untestable)

    @property
    def rounds_needed(self) -> int:
        """Rounds in each run with which the test can reach ALPHA."""
        return rounds_needed(ALPHA)

    @property
    def typical_ratio(self) -> float | None:
        """Median latency ratio over all matched points: machine-wide drift shows up here."""
        ratios = [change.latency_ratio for change in self.changes if change.latency_ratio]
        return statistics.median(ratios) if ratios else None


def compare_runs(base: RunFolder, new: RunFolder, threshold: Threshold | float | None = None) -> Comparison:
    """``threshold``: the relative change that counts; by default the runs' own noise (analysis.noise)."""
    if threshold is None:
        threshold = noise_threshold([*base.rows, *new.rows])
    elif not isinstance(threshold, Threshold):
        threshold = Threshold(threshold, "given")
    pairs, only_in_base, only_in_new = pair_points(base.rows, new.rows)
    if not pairs:
        raise UserError(f"compare {base.path} {new.path}: the runs have no point in common (same implementation "
                        "and case); there is nothing to compare")
    changes = [_options_changed(pair.base, pair.new) if pair.options_changed
               else _change(pair.base, pair.new, threshold.value) for pair in pairs]
    changes.sort(key=lambda change: (not change.lost_ok, change.verdict not in ("slower", "faster"), -change.effect))
    return Comparison(
        changes=tuple(changes),
        only_in_base=tuple(only_in_base),
        only_in_new=tuple(only_in_new),
        environment_differences=tuple(_environment_differences(base.environment, new.environment)),
        threshold=threshold,
    )


def _options_changed(base: Row, new: Row) -> PointChange:
    verdict = f"options changed ({options_change(base.options, new.options)})"
    if base.status != new.status:
        verdict += f"; status {base.status} -> {new.status}"
    return PointChange(new.implementation, new.case, base, new, None, None, None, verdict, options_changed=True)


def _change(base: Row, new: Row, threshold: float | None) -> PointChange:
    ratio = p_value = memory_ratio = None
    if base.status != new.status:
        verdict = f"status {base.status} -> {new.status}" + (" REGRESSED" if base.status == "ok" else "")
    elif base.latency is None or new.latency is None:
        verdict = "not timed"
    elif new.latency_voided or base.latency_voided:
        regressed = new.latency_voided and not base.latency_voided
        verdict = "latency flagged as no result" + (" REGRESSED" if regressed else " (base or new)")
    else:
        ratio = new.latency.median_s / base.latency.median_s
        x, y = base.latency.round_medians_s, new.latency.round_medians_s
        p_value = mann_whitney_p(x, y)
        floor = smallest_p(len(x), len(y))
        if floor >= ALPHA:
            verdict = f"{TOO_FEW_ROUNDS}: {len(x)} vs {len(y)}; the smallest p reachable is {floor:.2g}"
        elif p_value < ALPHA:
            if threshold is None:
                verdict = "significant, but no threshold to size it"
            elif ratio > 1 + threshold:
                verdict = "slower"
            elif ratio < 1 / (1 + threshold):
                verdict = "faster"
            else:
                verdict = f"significant but within ±{threshold:.0%}"
        else:
            verdict = "no significant change"
    base_peak = base.memory.peak_bytes if base.memory else None
    new_peak = new.memory.peak_bytes if new.memory else None
    if base_peak and new_peak:
        memory_ratio = new_peak / base_peak
    return PointChange(new.implementation, new.case, base, new, ratio, p_value, memory_ratio, verdict)


def _environment_differences(base: dict, new: dict) -> list[str]:
    return [
        f"{key}: {base.get(key)!r} -> {new.get(key)!r}"
        for key in ENVIRONMENT_KEYS
        if key in base and key in new and base[key] != new[key]
    ]
