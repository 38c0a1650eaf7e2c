"""The command line as a user meets it: list, a real run of suites/quick.yaml, bad flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from attnbench.contract.registry import DISABLE_AUTOLOAD_VARIABLE
from attnbench.storage.results import read_rows


def _attnbench(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    # The built-ins only: what else this environment has installed is not under test here.
    env = {**os.environ, DISABLE_AUTOLOAD_VARIABLE: "1"}
    return subprocess.run([sys.executable, "-m", "attnbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_list_shows_each_implementation_and_where_it_runs():
    listing = _attnbench("list")
    assert listing.returncode == 0, listing.stderr
    assert "naive  (exact; time n^2, memory n^2; decode step n, state n; plugin naive)" in listing.stdout
    assert "flash  (exact; time n^2, memory n; decode step n, state n; plugin sdpa)" in listing.stdout
    assert "sdpa_mem_efficient  (exact; time n^2, memory n; decode step n, state n; plugin sdpa)" in listing.stdout
    assert "sdpa_cudnn  (exact; time n^2, memory n; decode step n, state n; plugin sdpa)" in listing.stdout
    assert "flex  (exact; time n^2, memory n; plugin flex)" in listing.stdout
    assert "performer  (approximate; time n, memory n; decode step 1, state 1; plugin performer)" in listing.stdout
    assert "nystrom  (approximate; time n, memory n; plugin nystrom)" in listing.stdout
    assert "xformers  (exact; time n^2, memory n; decode step n, state n; plugin xformers_attention)" in listing.stdout
    assert "sparse  (approximate; time n, memory n; decode step 1, state 1; plugin sparse)" in listing.stdout
    assert "axial  (approximate; time n^1.5, memory n; plugin axial)" in listing.stdout
    assert "hybrid  (approximate; time n, memory n; decode step 1, state 1; plugin hybrid)" in listing.stdout
    assert listing.stdout.count("cpu: runs (float32, float16, bfloat16)") == 8
    sources = listing.stdout[listing.stdout.index("input sources"):]
    assert "  smollm2: SmolLM2-135M-Instruct's own q, k, v on CPython's documentation" in sources
    assert "      parameters: layers=[2, 15, 28], heads=[], texts=4, cache=''" in sources
    assert "  sink: an attention sink" in sources


def test_quick_suite_end_to_end(tmp_path):
    # The README's first command: the shipped grid and implementations, timed briefly (as shipped
    # it times each point for half a second in five rounds: minutes that test nothing more here).
    shipped = Path("suites/quick.yaml").read_text()
    assert "\nmeasure:\n" in shipped and "\nlimits:\n" in shipped
    brief = ("measure:\n  correctness: {rows: 128}\n"
             "  latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, min_samples: 3, rounds: 1}\n  threads: 1\n")
    suite = tmp_path / "quick.yaml"
    suite.write_text(shipped.split("\nmeasure:\n")[0] + "\n" + brief + "limits:\n" + shipped.split("\nlimits:\n")[1])
    run = _attnbench("run", str(suite), "--output", str(tmp_path))
    assert run.returncode == 0, run.stderr
    rows_path = next(tmp_path.glob("quick/*/rows.jsonl"))
    assert f"results: {rows_path}" in run.stdout
    assert run.stdout.rstrip().endswith("(and table.csv, report.md, plots/)")
    assert (rows_path.parent / "report.html").exists() and list((rows_path.parent / "plots").glob("*.svg"))
    rows = read_rows(rows_path)
    assert len(rows) == 10 * 8  # the suite's ten built-ins × the quick grid
    expected = {"naive": "ok", "flash": "ok", "sdpa_mem_efficient": "unsupported", "sdpa_cudnn": "unsupported",
                "performer": "ok", "nystrom": "ok", "xformers": "unsupported", "sparse": "ok", "axial": "ok",
                "hybrid": "ok"}
    for row in rows:
        status = "unsupported" if row.implementation == "nystrom" and row.case.causal else expected[row.implementation]
        assert row.status == status, (row.implementation, row.case.describe(), row.reasons)
        if row.status == "ok":
            assert row.latency.median_s > 0 and row.memory.allocator_peak_bytes > 0
            assert row.correctness.judged_against in ("exact", "own")
    for heading in ("B=1 H=4 D=64 float32 cpu forward", "B=1 H=4 D=64 float32 cpu causal forward_backward"):
        assert heading in run.stdout
    assert "Traceback" not in run.stderr


def test_flags_override_the_suite(tmp_path):
    suite = tmp_path / "small.yaml"
    suite.write_text("implementations: [naive, flash]\nsweep: {seq_len: 64, heads: 2, device: mps}\n"
                     "measure: {correctness: {rows: 8}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.02}}\n")
    run = _attnbench("run", str(suite), "--output", str(tmp_path), "--implementations", "flash", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    rows = read_rows(next(tmp_path.glob("small/*/rows.jsonl")))
    assert [(row.implementation, row.case.device, row.status) for row in rows] == [("flash", "cpu", "ok")]


def test_bad_flags_are_one_line_and_exit_2():
    for flags, words in [
        (["--implementations", "flsh"], "--implementations: unknown implementation 'flsh'"),
        (["--device", "tpu"], "--device: unknown device 'tpu' (allowed: cpu, cuda, cuda:N, mps)"),
    ]:
        run = _attnbench("run", "suites/quick.yaml", *flags)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attnbench: error: ")
        assert words in run.stderr and "Traceback" not in run.stderr
