"""The answer section, the first thing every report shows: per group of fixed axes, one line per
N with the fastest exact implementation, the fastest approximation within each error budget,
the leanest in memory, and what fell over (attnbench.analysis.answer decides who)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from attnbench.analysis.answer import Answer, answers
from attnbench.analysis.curves import metric_value, output_error
from attnbench.contract.case import CURVE_LABEL, describe_group
from attnbench.presenting.layout import Table
from attnbench.presenting.summary import format_table
from attnbench.storage.results import Row
from attnbench.storage.run_folder import Declared
from attnbench.support.units import format_bytes, format_seconds


def answer_tables(rows: Sequence[Row], declared: Mapping[str, Declared], budgets: Sequence[float]) -> list[Table]:
    """One table per group of fixed axes, in the order the groups were run."""
    by_group: dict[object, list[Answer]] = {}
    for answer in answers(rows, declared, budgets):
        by_group.setdefault(answer.group, []).append(answer)
    headers = (CURVE_LABEL, "fastest exact", *(f"fastest approx., err ≤ {budget:g}" for budget in budgets),
               "least memory", "fell over")
    return [Table(describe_group(group), headers, tuple(_line(answer, budgets) for answer in group_answers))
            for group, group_answers in by_group.items()]


def budget_note(budgets: Sequence[float]) -> str:
    listed = " and ".join(f"{budget:g}" for budget in budgets)
    return (f"err: relative Frobenius error of the output against float64 exact attention. An approximation is "
            f"compared only within an error budget ({listed}; a suite sets its own under report.error_budgets): "
            "over it, it is not \"faster\" in any useful sense, and \"none\" says so. Faster or slower: than the "
            "fastest exact one at that N. Least memory: among the exact implementations and the approximations within "
            "the loosest budget. Fell over: tried without a usable result.")


def _line(answer: Answer, budgets: Sequence[float]) -> tuple[str, ...]:
    exact = answer.fastest_exact
    cells = [str(answer.seq_len), _figures(exact) if exact else "none ran correctly"]
    for budget in budgets:
        pick = answer.fastest_within[budget]
        cells.append(_figures(pick, exact) if pick else _none_within(answer, budget))
    lean = answer.leanest
    cells.append(f"{lean.implementation} {format_bytes(metric_value(lean, 'memory'))} · "
                 f"{format_seconds(metric_value(lean, 'latency'))} · err {_error(lean)}" if lean else "—")
    cells.append(", ".join(f"{row.implementation} ({_failure(row)})" for row in answer.fell_over) or "—")
    return tuple(cells)


def _figures(row: Row, exact: Row | None = None) -> str:
    """'flash 3.07 ms · 6.0 MiB · err 2.6e-07'; against the fastest exact one: '(2.1× faster)'."""
    latency, memory = metric_value(row, "latency"), metric_value(row, "memory")
    relation = ""
    if exact is not None:
        ratio = metric_value(exact, "latency") / latency
        relation = f" ({ratio:.2g}× faster)" if ratio >= 1 else f" ({1 / ratio:.2g}× slower)"
    parts = [f"{row.implementation} {format_seconds(latency)}{relation}", format_bytes(memory) if memory else "",
             f"err {_error(row)}"]
    return " · ".join(part for part in parts if part)


def _none_within(answer: Answer, budget: float) -> str:
    """Plainly none, and the closest miss, so the reader sees by how much."""
    closest = answer.closest_over[budget]
    return f"none (closest: {closest.implementation}, err {_error(closest)})" if closest else "none"


def _failure(row: Row) -> str:
    error = output_error(row)
    return f"{row.status}, error {error:.1e}" if row.status == "incorrect" and error is not None else row.status


def _error(row: Row) -> str:
    error = output_error(row)
    return f"{error:.1e}" if error is not None else "not measured"


def answer_text(rows: Sequence[Row], declared: Mapping[str, Declared], budgets: Sequence[float]) -> str:
    """The answer for a terminal: each group's table, then what the columns mean."""
    tables = answer_tables(rows, declared, budgets)
    blocks = [f"{table.title}\n{format_table(table.headers, table.rows)}" for table in tables]
    return "\n\n".join(["ANSWER: which implementation at each N", *blocks, budget_note(budgets)])
