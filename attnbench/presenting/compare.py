"""`attnbench compare`'s text: the points, what is in one run only, the curves and the counts."""

from __future__ import annotations

from collections.abc import Sequence

from attnbench.analysis.compare import ALPHA, MIN_CURVE_POINTS, Comparison, PointChange
from attnbench.analysis.curves import output_error
from attnbench.analysis.noise import Threshold
from attnbench.contract.case import describe_group
from attnbench.presenting.summary import format_table, points_by_implementation
from attnbench.support.units import format_seconds

CHANGE_HEADERS = ("implementation", "case", "base median", "new median", "new/base", "p (rounds)", "verdict",
                  "memory new/base", "rel. error base -> new")


def change_lines(changes: Sequence[PointChange]) -> list[list[str]]:
    lines = []
    for change in changes:
        base_error, new_error = output_error(change.base), output_error(change.new)
        lines.append([
            change.series,
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


def comparison_text(comparison: Comparison) -> str:
    """Everything compare prints to stdout, in order."""
    parts = [format_table(CHANGE_HEADERS, change_lines(comparison.changes))]
    for label, rows in (("only in base", comparison.only_in_base), ("only in new", comparison.only_in_new)):
        parts.extend(f"{label}: {line}" for line in points_by_implementation(rows))
    typical = comparison.typical_ratio
    if typical is not None:
        parts.append(f"\nmedian new/base ratio over all points: {typical:.2f} (machine-wide drift shows here)")
    curve_lines = [
        [curve.implementation, describe_group(curve.group), f"{curve.slower} of {curve.points}",
         f"{curve.median_ratio:.2f}" if curve.points >= MIN_CURVE_POINTS else "", curve.verdict]
        for curve in comparison.curves
    ]
    parts.append("\n" + format_table(("implementation", "case", "points slower", "median new/base", ""), curve_lines))
    parts.append(f"threshold: {threshold_text(comparison.threshold)}")
    changed = comparison.options_changed
    if changed:
        parts.append(f"{len(changed)} point(s) whose options changed: not compared (options are part of a point's "
                     "identity)")
    untestable = comparison.too_few_rounds
    if untestable:
        parts.append(f"{len(untestable)} point(s) with too few rounds to test: p < {ALPHA:g} needs "
                     f"{comparison.rounds_needed} rounds in each run (measure.latency.rounds in the suite)")
    undecided = sum(curve.undecided for curve in comparison.curves)
    parts.append(f"{len(comparison.regressions)} regression(s): most points of a curve significantly slower "
                 f"(Mann-Whitney p < {ALPHA:g} on the rounds' medians) by more than the threshold; a curve needs "
                 f"{MIN_CURVE_POINTS} points or more"
                 + (f" ({undecided} curve(s) with too few points testable to tell)" if undecided else ""))
    parts.append(f"{len(comparison.status_regressions)} point(s) that were ok and are not now (status, or a latency "
                 "flagged as no result)")
    return "\n".join(parts)


def threshold_text(threshold: Threshold) -> str:
    if threshold.value is None:
        return f"none ({threshold.source}; give one: --fail-on-regression THRESHOLD)"
    return f"{threshold.value:.0%} ({threshold.source})"
