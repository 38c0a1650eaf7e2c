"""Reports rebuilt from stored rows: every file, every point (failed ones too), nothing fetched."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from synthetic_runs import SEQ_LENS, standard_run

from attnbench.cli import main
from attnbench.presenting.report import write_reports
from attnbench.storage.run_folder import load_run


def test_every_report_file_is_written_from_the_rows(tmp_path):
    run = load_run(standard_run(tmp_path / "results" / "synthetic" / "run"))
    write_reports(run)
    folder = run.path
    table = pd.read_csv(folder / "table.csv")
    assert len(table) == len(run.rows) == 5 * len(SEQ_LENS)
    assert set(table[table.implementation == "flaky"].status) == {"ok", "oom"}
    for kind in ("latency", "memory", "speedup", "pareto", "exponents"):
        for extension in ("png", "svg"):
            path = folder / "plots" / f"b-1-h-8-d-64-float32-cpu-forward-{kind}.{extension}"
            assert path.stat().st_size > 1000, path

    markdown = (folder / "report.md").read_text()
    sections = re.findall(r"^## (.*)$", markdown, re.M)
    assert sections[0] == "Answer: which implementation at each N" and sections[-1] == "How this was measured"
    answer = markdown.split("## ", 2)[1]
    assert "| 8192 | tiled 33.55 ms · 32.0 MiB · err 2.0e-07 | none (closest: linear, err 3.0e-01) |" in answer
    assert "flaky (oom)" in answer
    assert ("| liar | B=1 H=8 D=64 float32 cpu forward | latency | n | n^2.00 (95%: 2.00 to 2.00) over 512–8192, "
            "5 N × 1 round | 0.60 | does not hold |") in markdown
    assert "| flaky | 4096 | oom |" in markdown  # a failed point is a row with its status, not a gap
    assert "(plots/b-1-h-8-d-64-float32-cpu-forward-latency.png)" in markdown

    page = (folder / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # latency, memory, speed-up, the error-latency and error-memory frontiers, the exponents
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # self-contained: no network
    assert "<script" not in page


def test_report_command_rebuilds_and_prints_the_verdicts(tmp_path, capsys):
    folder = standard_run(tmp_path / "results" / "synthetic" / "run")
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "liar" in out and ("declared n, measured n^2.00 (95%: 2.00 to 2.00) over 512–8192, 5 N × 1 round: does "
                              "not hold (detects an excess of 0.60 or more)") in out
    assert (folder / "report.html").exists()


def test_the_report_and_the_terminal_show_what_each_fit_could_detect(tmp_path, capsys):
    """A verdict that could not have failed is shown as undetermined, with the excess it could have
    seen and why that is not enough; a decisive one with the excess it would have caught."""
    import random

    from synthetic_runs import declared, row, shared_machine_rounds, write_run

    rng = random.Random(0)

    def quadratic(name, n):
        seconds = 1e-9 * n**2
        return row(name, n, seconds, 4096 * n, 0.1, rounds=shared_machine_rounds(seconds, rng, disturbed=0.0))

    rows = [quadratic("honest", n) for n in (512, 2048, 8192, 32768)] + [quadratic("narrow", n) for n in (256, 1024)]
    folder = write_run(tmp_path / "results" / "synthetic" / "run",
                       rows, {name: declared(True, "n^2", "n") for name in ("honest", "narrow")})
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    honest = next(line for line in out.splitlines() if line.startswith("honest") and "latency" in line)
    assert re.search(r": holds \(detects an excess of 0\.(3|4)\d or more\)$", honest), honest
    narrow = next(line for line in out.splitlines() if line.startswith("narrow") and "latency" in line)
    assert re.search(r": undetermined \(detects an excess of 1\.0\d or more, more than the 0\.5 a verdict needs: "
                     r"too narrow a range: across N ×4 .* could alone add 1\.00\)$", narrow), narrow
    markdown = (folder / "report.md").read_text()
    table = markdown.split("**Declared vs measured complexity**", 1)[1]
    assert "| implementation | case | metric | declared | measured | detects | verdict |" in table
    assert re.search(r"\| honest \| [^|]+ \| latency \| n\^2 \| n\^2\.00 [^|]+ \| 0\.(3|4)\d \| holds \|", table)
    assert re.search(r"\| narrow \| [^|]+ \| latency \| n\^2 \| n\^2\.00 [^|]+ \| 1\.0\d \| undetermined: too narrow "
                     r"a range", table)


def test_report_on_a_folder_without_rows_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no rows.jsonl here" in err


def test_the_error_budgets_come_from_the_runs_suite_or_the_command_line(tmp_path, capsys):
    folder = standard_run(tmp_path / "results" / "synthetic" / "run")
    (folder / "suite.yaml").write_text("name: synthetic\nreport: {error_budgets: [0.4]}\n")
    assert main(["report", str(folder)]) == 0
    assert "fastest approx., err ≤ 0.4" in capsys.readouterr().out
    assert "| 8192 | tiled 33.55 ms · 32.0 MiB · err 2.0e-07 | linear 327.68 ms (9.8× slower)" in (
        folder / "report.md").read_text()
    assert main(["report", str(folder), "--error-budgets", "0.001,1"]) == 0
    assert "fastest approx., err ≤ 0.001" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["report", str(folder), "--error-budgets=-1"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and "--error-budgets" in err and "positive finite" in err

