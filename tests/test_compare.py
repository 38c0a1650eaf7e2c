"""compare: a real slowdown against noise, with exit codes for CI; history across runs."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from synthetic_runs import declared, row, rounds_row, write_run

from attnbench.analysis.compare import compare_runs
from attnbench.cli import main
from attnbench.storage.run_folder import load_run

DECLARED = {"steady": declared(True, "n^2", "n"), "slowed": declared(True, "n^2", "n")}


def _run(folder, run_id, slowdown=1.0, seed=0, rounds=5):
    """Two implementations at three seq_lens, in ``rounds`` rounds whose medians vary by 2%;
    'slowed' is slower by ``slowdown``."""
    rng = random.Random(seed)
    rows = []
    for n in (1024, 2048, 4096):
        for name, factor in (("steady", 1.0), ("slowed", slowdown)):
            seconds = 1e-9 * n * n * factor
            medians = [seconds * rng.gauss(1.0, 0.02) for _ in range(rounds)]
            rows.append(rounds_row(name, n, medians, run_id=run_id))
    return write_run(folder / run_id, rows, DECLARED)


def test_a_slowdown_is_told_from_a_rerun(tmp_path):
    base = load_run(_run(tmp_path, "20260101T000000Z-aaaaaaa", seed=0))
    rerun = load_run(_run(tmp_path, "20260102T000000Z-aaaaaaa", seed=1))
    slowed = load_run(_run(tmp_path, "20260103T000000Z-bbbbbbb", slowdown=2.0, seed=2))
    assert compare_runs(base, rerun).regressions == ()
    comparison = compare_runs(base, slowed)
    assert [(c.implementation, c.slower, c.points) for c in comparison.regressions] == [("slowed", 3, 3)]
    slower = [c for c in comparison.changes if c.verdict == "slower"]
    assert {(c.implementation, c.case.seq_len) for c in slower} == {("slowed", n) for n in (1024, 2048, 4096)}
    assert all(1.8 < c.latency_ratio < 2.2 and c.p_value < 0.01 for c in slower)


def test_one_point_in_a_slow_mode_is_not_a_regression(tmp_path):
    """A re-run where one point's worker ran 2.3x slower (seen on this machine) is not a regression."""
    base = load_run(_run(tmp_path, "20260101T000000Z-aaaaaaa", seed=0))
    rerun = load_run(_run(tmp_path, "20260102T000000Z-aaaaaaa", seed=1))
    rows = tuple(
        replace(r, latency=replace(r.latency, samples_s=tuple(2.3 * s for s in r.latency.samples_s)))
        if (r.implementation, r.case.seq_len) == ("steady", 2048) else r
        for r in rerun.rows
    )
    comparison = compare_runs(base, replace(rerun, rows=rows))
    assert [c.case.seq_len for c in comparison.changes if c.verdict == "slower"] == [2048]
    assert comparison.regressions == ()


def test_fail_on_regression_exit_codes(tmp_path, capsys):
    base = _run(tmp_path, "20260101T000000Z-aaaaaaa", seed=0)
    rerun = _run(tmp_path, "20260102T000000Z-aaaaaaa", seed=1)
    slowed = _run(tmp_path, "20260103T000000Z-bbbbbbb", slowdown=2.0, seed=2)
    assert main(["compare", str(base), str(rerun), "--fail-on-regression"]) == 0
    assert main(["compare", str(base), str(slowed / "rows.jsonl"), "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "1 regression(s): most points of a curve significantly slower" in out and "REGRESSED" in out
    assert main(["compare", str(base), str(slowed)]) == 0  # reporting only, without the flag
    assert main(["compare", str(base), str(slowed), "--fail-on-regression", "150%"]) == 0  # 2x is within 150%
    capsys.readouterr()
    for bad in ("nan", "inf%", "abc"):  # a threshold no ratio can be compared with: one line, exit 2
        with pytest.raises(SystemExit) as exit_:
            main(["compare", str(base), str(slowed), "--fail-on-regression", bad])
        assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_history_tables_and_plots_every_run(tmp_path, capsys):
    for day, slowdown in ((1, 1.0), (2, 1.0), (3, 2.0)):
        _run(tmp_path / "suite", f"2026010{day}T000000Z-aaaaaaa", slowdown=slowdown, seed=day)
    assert main(["history", str(tmp_path / "suite"), "slowed"]) == 0
    out = capsys.readouterr().out
    assert "20260101T000000Z-aaaaaaa" in out and "20260103T000000Z-aaaaaaa" in out and "N=4096" in out
    assert list((tmp_path / "suite" / "history").glob("history-slowed-*.png"))
    assert main(["history", str(tmp_path / "suite"), "nope"]) == 2


def test_history_says_when_its_runs_differ_in_machine_or_options(tmp_path, capsys):
    """A step in a history where the CPU or the options changed is not the code's."""
    for day in (1, 2):
        _run(tmp_path / "suite", f"2026010{day}T000000Z-aaaaaaa", seed=day)
    assert main(["history", str(tmp_path / "suite"), "steady"]) == 0
    assert "note:" not in capsys.readouterr().out  # one machine, one set of options: comparable
    moved = tmp_path / "suite" / "20260102T000000Z-aaaaaaa"
    (moved / "environment.json").write_text(json.dumps({"cpu_model": "Other CPU", "torch_threads": 1}))
    later = load_run(_run(tmp_path, "20260103T000000Z-aaaaaaa", seed=3)).rows
    write_run(tmp_path / "suite" / "20260103T000000Z-aaaaaaa", [replace(r, options={"block": 256}) for r in later],
              DECLARED)
    assert main(["history", str(tmp_path / "suite"), "steady"]) == 0
    out = capsys.readouterr().out
    assert "Other CPU, 1 thread" in out and "synthetic, 2 threads" in out and "block=256" in out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "differ in machines" in notes[0] and "differ in options (none; block=256)" in notes[1]


def test_a_point_that_was_ok_and_is_not_now_is_a_regression(tmp_path, capsys):
    base = _run(tmp_path, "20260101T000000Z-aaaaaaa")
    rows = load_run(base).rows
    crashed = [replace(r, status="crashed", latency=None, reasons=("worker killed by SIGSEGV",))
               if r.implementation == "steady" else r for r in rows]
    broken = write_run(tmp_path / "20260102T000000Z-ccccccc", crashed, DECLARED)
    comparison = compare_runs(load_run(base), load_run(broken))
    assert {(c.implementation, c.case.seq_len) for c in comparison.status_regressions} == {
        ("steady", n) for n in (1024, 2048, 4096)}
    assert main(["compare", str(base), str(broken), "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "status ok -> crashed REGRESSED" in out and "3 point(s) that were ok and are not now" in out


def test_runs_with_no_point_in_common_are_an_error(tmp_path, capsys):
    base = _run(tmp_path, "20260101T000000Z-aaaaaaa")
    other = write_run(tmp_path / "20260102T000000Z-ddddddd",
                      [replace(r, implementation="other") for r in load_run(base).rows], {})
    assert main(["compare", str(base), str(other), "--fail-on-regression"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the runs have no point in common" in err


def test_a_row_without_latency_samples_is_named_in_one_line(tmp_path, capsys):
    import json

    base = _run(tmp_path, "20260101T000000Z-aaaaaaa")
    lines = (base / "rows.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    latency = broken["figures"]["latency"]
    latency["samples_s"], latency["round_sizes"] = [], []
    lines[1] = json.dumps(broken)
    (base / "rows.jsonl").write_text("\n".join(lines) + "\n")
    for argv in (["compare", str(base), str(base)], ["report", str(base)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "line 2 (slowed B=1 H=8 N=1024 D=64 float32 cpu forward) is not a result row (ValueError: a latency " \
               "with no samples)" in err


def test_points_in_one_run_only_take_one_line_per_implementation(tmp_path, capsys):
    base = _run(tmp_path, "20260101T000000Z-aaaaaaa")
    rows = [*load_run(base).rows, *(row("newcomer", n, 1e-6, 4096, 0.1, run_id="20260102T000000Z-aaaaaaa")
                                    for n in (512, 1024, 2048))]
    new = write_run(tmp_path / "new", rows, {**DECLARED, "newcomer": declared(False, "n", "n")})
    assert main(["compare", str(base), str(new)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("only in")]
    assert lines == ["only in new: newcomer: 3 points (B=1 H=8 D=64 float32 cpu forward at N=512,1024,2048)"]
