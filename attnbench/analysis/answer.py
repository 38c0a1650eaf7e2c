"""The answer a reader opens a report for: at each group of fixed axes and each N, who is fastest
exactly, who is fastest among the approximations whose error stays within a budget, who needs the
least memory, and what fell over.

An error budget is a bound on the relative Frobenius error of the output against float64 exact
attention. An approximation over it is not "faster" in any useful sense, so it is left out of
every comparison made under that budget (here, in the crossovers and in the plots).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attnbench.analysis.curves import can_be_baseline, is_exact, metric_value, output_error, within_budget
from attnbench.contract.case import Case, curve_x, group_key
from attnbench.storage.results import Row
from attnbench.storage.run_folder import Declared

# The statuses of points that were tried and did not give a usable result.
FELL_OVER = ("oom", "timeout", "crashed", "incorrect", "error", "skipped")


@dataclass(frozen=True)
class Answer:
    group: Case  # the fixed axes (seq_len blank)
    seq_len: int
    fastest_exact: Row | None  # an exact implementation correct at its dtype's default tolerance
    fastest_within: Mapping[float, Row | None]  # budget -> the fastest approximation within it
    closest_over: Mapping[float, Row | None]  # budget -> the approximation with the least error over it
    leanest: Row | None  # least peak memory among the exact and the approximations within the loosest budget
    fell_over: tuple[Row, ...]  # tried without a usable result (FELL_OVER), by name


def usable_approximation(row: Row, declared: Mapping[str, Declared], budget: float) -> bool:
    """An approximation that ran correctly (against its own reference, where it has one), with a
    latency that is a result and an error within the budget."""
    return (not is_exact(row.implementation, declared) and row.status == "ok"
            and metric_value(row, "latency") is not None and within_budget(row, budget))


def usable_exact(row: Row, declared: Mapping[str, Declared]) -> bool:
    return is_exact(row.implementation, declared) and can_be_baseline(row) and metric_value(row, "latency") is not None


def answers(rows: Sequence[Row], declared: Mapping[str, Declared], budgets: Sequence[float]) -> list[Answer]:
    """One Answer per (group, seq_len), groups in the order they were run, seq_lens ascending."""
    by_point: dict[Case, dict[int, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_point[group_key(row.case)][curve_x(row.case)].append(row)
    loosest = max(budgets) if budgets else None
    result = []
    for group, per_seq_len in by_point.items():
        for seq_len in sorted(per_seq_len):
            here = per_seq_len[seq_len]
            exact = [row for row in here if usable_exact(row, declared)]
            within = {budget: _fastest([row for row in here if usable_approximation(row, declared, budget)])
                      for budget in budgets}
            ran = [row for row in here if usable_approximation(row, declared, math.inf)]
            over = {budget: min((row for row in ran if not within_budget(row, budget)), key=output_error, default=None)
                    for budget in budgets}
            lean = exact + ([row for row in here if usable_approximation(row, declared, loosest)]
                            if loosest is not None else [])
            result.append(Answer(
                group, seq_len, _fastest(exact), within, over,
                min((row for row in lean if _footprint(row)), key=_footprint, default=None),
                tuple(sorted((row for row in here if row.status in FELL_OVER), key=lambda row: row.implementation)),
            ))
    return result


def _footprint(row: Row) -> float | None:
    """What the point takes in all (a decode step: the state it keeps; else what it keeps between
    calls and its call's peak), for the least-memory answer."""
    if row.case.decode or row.memory is None or row.memory.kept_bytes is None:
        return metric_value(row, "memory")
    return float(row.memory.footprint_bytes) if row.status in ("ok", "incorrect") and row.memory.footprint_bytes \
        else None


def _fastest(rows: Sequence[Row]) -> Row | None:
    return min(rows, key=lambda row: metric_value(row, "latency"), default=None)
