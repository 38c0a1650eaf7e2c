"""compare's verdicts are ones it can defend: a point's identity includes its options, the test
runs on independent rounds, the threshold comes from the runs' own noise, and one point is not
a curve (issue 32)."""

from __future__ import annotations

from synthetic_runs import declared, rounds_row, write_run

from attnbench.analysis.compare import compare_runs
from attnbench.cli import main
from attnbench.storage.run_folder import load_run

BASE_ID, NEW_ID = "20260101T000000Z-aaaaaaa", "20260102T000000Z-bbbbbbb"
SEQ_LENS = (1024, 2048, 4096)
EVEN = (1.00, 1.01, 1.02, 1.03, 1.04)  # five rounds' medians, relative; 4% between the fastest and the slowest


def _write(folder, run_id, rows):
    names = {row.implementation for row in rows}
    return write_run(folder / run_id, rows, {name: declared(True, "n^2", "n") for name in names})


def _curve(name, run_id, factor=1.0, medians=EVEN, options=None, seq_lens=SEQ_LENS, per_round=4):
    return [rounds_row(name, n, [1e-9 * n * n * factor * m for m in medians], per_round=per_round, options=options,
                       run_id=run_id)
            for n in seq_lens]


def _changes(comparison, name):
    return [change for change in comparison.changes if change.implementation == name]


# 1. Options are part of a point's identity.

def test_points_whose_options_differ_are_reported_as_changed_options_not_compared(tmp_path, capsys):
    base = _write(tmp_path, BASE_ID, [*_curve("steady", BASE_ID),
                                      *_curve("performer", BASE_ID, options={"block": 256, "seed": 0})])
    new = _write(tmp_path, NEW_ID, [*_curve("steady", NEW_ID),
                                    *_curve("performer", NEW_ID, 3.0, options={"block": 1024, "seed": 0})])
    comparison = compare_runs(load_run(base), load_run(new))
    changed = _changes(comparison, "performer")
    assert [change.verdict for change in changed] == ["options changed (block=256 → block=1024)"] * 3
    assert all(change.latency_ratio is None and change.p_value is None for change in changed)
    assert [curve.implementation for curve in comparison.curves] == ["steady"]
    assert comparison.regressions == () and comparison.status_regressions == ()
    assert main(["compare", str(base), str(new), "--fail-on-regression"]) == 0
    out = capsys.readouterr().out
    assert "options changed (block=256 → block=1024)" in out
    assert "3 point(s) whose options changed: not compared (options are part of a point's identity)" in out


def test_an_option_an_older_row_lacks_is_a_change_of_options(tmp_path):
    """Rows written before an option existed do not carry it: the harness cannot know that its
    value now behaves as the code behaved then, so the point is not compared."""
    base = _write(tmp_path, BASE_ID, _curve("sparse", BASE_ID, options={"block_size": 128}))
    new = _write(tmp_path, NEW_ID, _curve("sparse", NEW_ID, options={"block_size": 128, "flex_block_size": None}))
    verdicts = {change.verdict for change in compare_runs(load_run(base), load_run(new)).changes}
    assert verdicts == {"options changed (flex_block_size not set → flex_block_size=null)"}


def test_a_variant_is_matched_by_its_implementation_and_options_not_its_name(tmp_path, capsys):
    """A sweep narrowed to one value (performer[features=64] before, performer with features=64
    now) measures the same points; a variant whose other options changed keeps its name but not
    its identity."""
    options = {"features": 64, "chunk_size": 128}
    base = _write(tmp_path, BASE_ID, [*_curve("performer[features=64]", BASE_ID, options=options),
                                      *_curve("nystrom[landmarks=16]", BASE_ID, options={"landmarks": 16, "iters": 6})])
    new = _write(tmp_path, NEW_ID, [*_curve("performer", NEW_ID, options=options),
                                    *_curve("nystrom[landmarks=16]", NEW_ID, options={"landmarks": 16, "iters": 3})])
    comparison = compare_runs(load_run(base), load_run(new))
    assert not comparison.only_in_base and not comparison.only_in_new
    renamed = _changes(comparison, "performer")
    assert len(renamed) == 3 and all(change.latency_ratio is not None for change in renamed)
    assert {change.series for change in renamed} == {"performer[features=64] → performer"}
    assert {change.verdict for change in _changes(comparison, "nystrom[landmarks=16]")} == {
        "options changed (iters=6 → iters=3)"}
    assert main(["compare", str(base), str(new)]) == 0
    assert "performer[features=64] → performer" in capsys.readouterr().out


# 2. The test runs on independent units: each round is a fresh worker process.

def test_the_test_counts_rounds_not_the_calls_inside_them(tmp_path):
    """Each round's calls sit tightly around the round's own level, and the levels move from
    round to round. Pooling the calls would count each round's luck many times over."""
    new_medians = (1.03, 1.05, 1.07, 1.09, 1.11)  # interleaved with the base's (1.00 ... 1.08)
    base = _write(tmp_path, BASE_ID, _curve("steady", BASE_ID, medians=(1.00, 1.02, 1.04, 1.06, 1.08), per_round=20))
    new = _write(tmp_path, NEW_ID, _curve("steady", NEW_ID, medians=new_medians, per_round=20))
    changes = compare_runs(load_run(base), load_run(new), threshold=0.01).changes
    assert all(change.p_value > 0.05 for change in changes)
    assert {change.verdict for change in changes} == {"no significant change"}


def test_a_shift_of_every_round_is_found(tmp_path):
    base = _write(tmp_path, BASE_ID, _curve("steady", BASE_ID))
    new = _write(tmp_path, NEW_ID, _curve("steady", NEW_ID, 2.0))
    changes = compare_runs(load_run(base), load_run(new)).changes
    assert {change.verdict for change in changes} == {"slower"}
    assert all(change.p_value < 0.01 for change in changes)


def test_too_few_rounds_to_reach_the_level_are_said_so_with_what_it_would_need(tmp_path, capsys):
    base = _write(tmp_path, BASE_ID, _curve("steady", BASE_ID, medians=EVEN[:3]))
    new = _write(tmp_path, NEW_ID, _curve("steady", NEW_ID, 2.0, medians=EVEN[:3]))
    verdicts = {change.verdict for change in compare_runs(load_run(base), load_run(new)).changes}
    assert verdicts == {"too few rounds to test: 3 vs 3; the smallest p reachable is 0.1"}
    assert main(["compare", str(base), str(new), "--fail-on-regression"]) == 0
    out = capsys.readouterr().out
    assert "3 point(s) with too few rounds to test: p < 0.01 needs 5 rounds in each run (measure.latency.rounds" in out
    assert "0 regression(s)" in out


# 3. The default threshold is the runs' own noise.

def test_the_default_threshold_is_the_runs_round_to_round_spread(tmp_path, capsys):
    """Every point's rounds lie within 4%: a 20% slowdown of every round is far beyond that noise
    (a fixed 30% would have called it within the threshold)."""
    base = _write(tmp_path, BASE_ID, [*_curve("steady", BASE_ID), *_curve("slowed", BASE_ID)])
    new = _write(tmp_path, NEW_ID, [*_curve("steady", NEW_ID), *_curve("slowed", NEW_ID, 1.2)])
    comparison = compare_runs(load_run(base), load_run(new))
    assert abs(comparison.threshold.value - 0.04) < 1e-3
    assert "90th percentile" in comparison.threshold.source and "12 points" in comparison.threshold.source
    assert {change.verdict for change in _changes(comparison, "slowed")} == {"slower"}
    assert [curve.implementation for curve in comparison.regressions] == ["slowed"]
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "threshold: 4% (the 90th percentile of the round-to-round spread" in out
    assert main(["compare", str(base), str(new), "--fail-on-regression", "50%"]) == 0  # the user's word wins
    out = capsys.readouterr().out
    assert "threshold: 50% (given with --fail-on-regression)" in out and "significant but within ±50%" in out


def test_runs_without_rounds_to_measure_noise_from_say_so(tmp_path, capsys):
    base = _write(tmp_path, BASE_ID, _curve("steady", BASE_ID, medians=(1.0,)))
    new = _write(tmp_path, NEW_ID, _curve("steady", NEW_ID, 2.0, medians=(1.0,)))
    comparison = compare_runs(load_run(base), load_run(new))
    assert comparison.threshold.value is None
    assert main(["compare", str(base), str(new)]) == 0
    assert "threshold: none (no point of either run has two rounds" in capsys.readouterr().out


# 4. One point is not a curve.

def test_a_curve_of_one_matched_point_gets_no_curve_verdict(tmp_path, capsys):
    base = _write(tmp_path, BASE_ID, _curve("slowed", BASE_ID, seq_lens=(2048,)))
    new = _write(tmp_path, NEW_ID, _curve("slowed", NEW_ID, 2.0, seq_lens=(2048,)))
    comparison = compare_runs(load_run(base), load_run(new))
    assert [change.verdict for change in comparison.changes] == ["slower"]  # the point's own change stands
    (curve,) = comparison.curves
    assert curve.verdict == "one point: not enough for a curve verdict" and not curve.regressed
    assert comparison.regressions == ()
    assert main(["compare", str(base), str(new), "--fail-on-regression"]) == 0
    out = capsys.readouterr().out
    assert "one point: not enough for a curve verdict" in out and "REGRESSED" not in out


def test_a_curve_whose_points_cannot_be_tested_is_not_called_unchanged(tmp_path, capsys):
    base = _write(tmp_path, BASE_ID, _curve("slowed", BASE_ID, medians=EVEN[:3]))
    new = _write(tmp_path, NEW_ID, _curve("slowed", NEW_ID, 2.0, medians=EVEN[:3]))
    (curve,) = compare_runs(load_run(base), load_run(new)).curves
    assert curve.verdict == "too few points testable to tell (0 of 3)" and not curve.regressed
    assert main(["compare", str(base), str(new)]) == 0
    assert "0 regression(s)" in (out := capsys.readouterr().out) and "(1 curve(s) with too few points testable" in out
