"""The answer section: who wins at each N, within which error budget, and what fell over."""

from __future__ import annotations

import dataclasses

import pytest
from synthetic_runs import SEQ_LENS, curve, declared, row, write_run

from attnbench.analysis.answer import answers
from attnbench.analysis.curves import crossovers
from attnbench.presenting.answer import answer_tables, answer_text
from attnbench.storage.run_folder import load_run


@pytest.fixture
def run(tmp_path):
    rows = [
        *curve("quadratic", lambda n: 1e-9 * n**2, lambda n: 8 * n**2, 1e-7),
        *curve("tiled", lambda n: 5e-10 * n**2, lambda n: 4096 * n, 2e-7),
        *curve("sketchy", lambda n: 1e-6 * n, lambda n: 1024 * n, 2.7),  # fastest and leanest, but wrong
        *curve("close", lambda n: 2e-6 * n, lambda n: 2048 * n, 0.05),
        *curve("tight", lambda n: 4e-6 * n, lambda n: 4096 * n, 0.005),
        *[row("fragile", n, 1e-6 * n, 1000 * n, 1e-3) for n in SEQ_LENS[:3]],
        *[row("fragile", n, 0, 0, 0, status="oom") for n in SEQ_LENS[3:]],
    ]
    declarations = {"quadratic": declared(True, "n^2", "n^2"), "tiled": declared(True, "n^2", "n"),
                    **{name: declared(False, "n", "n") for name in ("sketchy", "close", "tight", "fragile")}}
    return load_run(write_run(tmp_path / "results" / "synthetic" / "run", rows, declarations))


def _at(run, seq_len, budgets=(1e-2, 1e-1)):
    return next(a for a in answers(run.rows, run.declared, budgets) if a.seq_len == seq_len)


def test_an_approximation_counts_only_within_the_budget(run):
    answer = _at(run, 8192)
    assert answer.fastest_exact.implementation == "tiled"
    assert answer.fastest_within[1e-2].implementation == "tight"  # 'sketchy' is faster, at an error of 2.7
    assert answer.fastest_within[1e-1].implementation == "close"
    assert answer.leanest.implementation == "close"  # 'sketchy' uses less, but is out of every budget
    assert [(r.implementation, r.status) for r in answer.fell_over] == [("fragile", "oom")]


def test_none_within_a_budget_is_said_with_the_closest_miss(run):
    answer = _at(run, 8192, budgets=(1e-3,))
    assert answer.fastest_within[1e-3] is None
    assert answer.closest_over[1e-3].implementation == "tight"
    cells = dict(zip(answer_tables(run.rows, run.declared, (1e-3,))[0].headers,
                     answer_tables(run.rows, run.declared, (1e-3,))[0].rows[-1], strict=True))
    assert cells["fastest approx., err ≤ 0.001"] == "none (closest: tight, err 5.0e-03)"
    assert cells["fell over"] == "fragile (oom)"


def test_the_answer_table_has_a_line_per_seq_len_with_figures_and_the_comparison(run):
    (table,) = answer_tables(run.rows, run.declared, (1e-2, 1e-1))
    assert [line[0] for line in table.rows] == [str(n) for n in SEQ_LENS]
    at_512 = dict(zip(table.headers, table.rows[0], strict=True))
    assert at_512["fastest exact"] == "tiled 131.1 µs · 2.0 MiB · err 2.0e-07"
    # 'fragile' ran at 512: 512 µs against tiled's 131 µs.
    assert at_512["fastest approx., err ≤ 0.01"] == "fragile 512.0 µs (3.9× slower) · 500.0 KiB · err 1.0e-03"
    text = answer_text(run.rows, run.declared, (1e-2, 1e-1))
    assert text.startswith("ANSWER") and "compared only within an error budget (0.01 and 0.1" in text


def test_a_failed_or_loosely_correct_exact_point_is_not_the_fastest_exact(run):
    rows = [dataclasses.replace(r, correctness=dataclasses.replace(r.correctness, within_default_tolerance=False))
            if r.implementation == "tiled" else r for r in run.rows]
    assert _at(dataclasses.replace(run, rows=tuple(rows)), 8192).fastest_exact.implementation == "quadratic"


def test_crossovers_leave_out_points_over_the_budget(run):
    def found(budget):
        return {(c.implementation, c.metric): c for c in crossovers(run.rows, run.declared, budget)}

    assert found(1.0)[("close", "latency")].seq_len is not None  # 2e-6·n against 5e-10·n²: from 4000
    over = found(1e-2)[("close", "latency")]
    assert over.seq_len is None and over.text == "error over 0.01 wherever it ran: not compared"
    assert found(10.0)[("sketchy", "latency")].seq_len is not None
    assert found(1e-1)[("sketchy", "latency")].seq_len is None
