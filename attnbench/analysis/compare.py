"""Two runs side by side, point by point: did anything get slower, leaner, more or less accurate?

A point is slower only when the Mann–Whitney test on the two runs' raw samples says it is not
noise (p < ALPHA) and the ratio of medians passes the threshold. With too few samples for the
test ever to reach ALPHA (3 against 3 gives p ≥ 0.1), the point says so instead of guessing.

An implementation regresses on a curve (its points over seq_len, other axes fixed) when most of
those points are slower. One point alone is not enough: on this shared machine a point's worker
process sometimes runs in a slow mode (same code, two runs: naive at N=512 4.1 ms and 9.5 ms,
sparse at N=1024 16 ms and 31 ms, each with a tight spread), which the samples of one run cannot
see; a changed implementation is slower at most of its seq_lens.

A point that was ``ok`` and is anything else now (crashed, incorrect, skipped, ...) is a
regression on its own, and so is one whose latency was a result and now is flagged as none.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from attnbench.analysis.curves import output_error
from attnbench.analysis.stats import mann_whitney_p, smallest_p
from attnbench.contract.case import Case, group_key
from attnbench.contract.errors import UserError
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder
from attnbench.support.units import format_seconds

ALPHA = 0.01
# Default threshold for a slowdown to count: the same code re-run on this shared 2-core machine
# moved medians by up to ~25% (README, "compare"), so smaller changes cannot be told from drift.
DEFAULT_THRESHOLD = 0.3
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
    verdict: str  # "slower", "faster", "no significant change", "too few samples to tell", a status change

    @property
    def effect(self) -> float:
        return abs(math.log(self.latency_ratio)) if self.latency_ratio else 0.0

    @property
    def lost_ok(self) -> bool:
        return self.base.status == "ok" and (self.new.status != "ok" or self.new.latency_voided
                                             and not self.base.latency_voided)


@dataclass(frozen=True)
class CurveChange:
    implementation: str
    group: Case  # the fixed axes (seq_len blank)
    points: int  # compared with a latency ratio
    slower: int
    median_ratio: float

    @property
    def regressed(self) -> bool:
        return self.slower * 2 > self.points


@dataclass(frozen=True)
class Comparison:
    changes: tuple[PointChange, ...]  # sorted: significant first, then by the size of the effect
    only_in_base: tuple[Row, ...]
    only_in_new: tuple[Row, ...]
    environment_differences: tuple[str, ...]
    threshold: float

    @property
    def curves(self) -> tuple[CurveChange, ...]:
        by_curve: dict[tuple[str, Case], list[PointChange]] = {}
        for change in self.changes:
            if change.latency_ratio is not None:
                by_curve.setdefault((change.implementation, group_key(change.case)), []).append(change)
        return tuple(
            CurveChange(name, group, len(points), sum(c.verdict == "slower" for c in points),
                        statistics.median(c.latency_ratio for c in points))
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
    def typical_ratio(self) -> float | None:
        """Median latency ratio over all matched points: machine-wide drift shows up here."""
        ratios = [change.latency_ratio for change in self.changes if change.latency_ratio]
        return statistics.median(ratios) if ratios else None


def compare_runs(base: RunFolder, new: RunFolder, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    base_rows = {(row.implementation, row.case): row for row in base.rows}
    new_rows = {(row.implementation, row.case): row for row in new.rows}
    if not set(base_rows) & set(new_rows):
        raise UserError(f"compare {base.path} {new.path}: the runs have no point in common (same implementation "
                        "and case); there is nothing to compare")
    changes = [_change(base_rows[key], new_rows[key], threshold) for key in base_rows if key in new_rows]
    changes.sort(key=lambda change: (not change.lost_ok, change.verdict not in ("slower", "faster"), -change.effect))
    return Comparison(
        changes=tuple(changes),
        only_in_base=tuple(row for key, row in base_rows.items() if key not in new_rows),
        only_in_new=tuple(row for key, row in new_rows.items() if key not in base_rows),
        environment_differences=tuple(_environment_differences(base.environment, new.environment)),
        threshold=threshold,
    )


def _change(base: Row, new: Row, threshold: float) -> PointChange:
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
        x, y = base.latency.samples_s, new.latency.samples_s
        p_value = mann_whitney_p(x, y)
        if p_value < ALPHA:
            if ratio > 1 + threshold:
                verdict = "slower"
            elif ratio < 1 / (1 + threshold):
                verdict = "faster"
            else:
                verdict = f"significant but within ±{threshold:.0%}"
        elif smallest_p(len(x), len(y)) >= ALPHA:
            verdict = f"too few samples to tell ({len(x)} vs {len(y)})"
        else:
            verdict = "no significant change"
    base_peak = base.memory.peak_bytes if base.memory else None
    new_peak = new.memory.peak_bytes if new.memory else None
    if base_peak and new_peak:
        memory_ratio = new_peak / base_peak
    return PointChange(base.implementation, base.case, base, new, ratio, p_value, memory_ratio, verdict)


def _environment_differences(base: dict, new: dict) -> list[str]:
    return [
        f"{key}: {base.get(key)!r} -> {new.get(key)!r}"
        for key in ENVIRONMENT_KEYS
        if key in base and key in new and base[key] != new[key]
    ]


def format_changes(changes: Sequence[PointChange]) -> list[list[str]]:
    lines = []
    for change in changes:
        base_error, new_error = output_error(change.base), output_error(change.new)
        lines.append([
            change.implementation,
            change.case.describe(),
            format_seconds(change.base.latency.median_s) if change.base.latency else "",
            format_seconds(change.new.latency.median_s) if change.new.latency else "",
            f"{change.latency_ratio:.2f}" if change.latency_ratio else "",
            f"{change.p_value:.3g}" if change.p_value is not None else "",
            change.verdict,
            f"{change.memory_ratio:.2f}" if change.memory_ratio else "",
            f"{base_error:.2e} -> {new_error:.2e}" if base_error is not None and new_error is not None else "",
        ])
    return lines


CHANGE_HEADERS = ("implementation", "case", "base median", "new median", "new/base", "p", "verdict",
                  "memory new/base", "rel. error base -> new")
