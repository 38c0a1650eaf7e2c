"""Durable rows and --resume: kill -9 in the middle of a sweep, resume, every point exactly once."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from attnbench.contract.registry import DISABLE_AUTOLOAD_VARIABLE
from attnbench.execution.local.executor import LocalExecutor
from attnbench.execution.placement import RowReady, SlotLost, ThisMachine
from attnbench.execution.runner import run_suite
from attnbench.settings.loader import load_suite
from attnbench.storage.results import read_rows
from attnbench.storage.run_folder import load_run, verify_ledger

SUITE = """
name: resume
implementations: [naive, flash]
sweep: {seq_len: [64, 128, 256, 512], heads: 2, head_dim: 32, causal: [false, true]}
measure:
  correctness: {rows: 16}
  latency: {min_run_time_s: 0.1, max_run_time_s: 0.15, min_samples: 3, rounds: 1}
  memory: false
"""
POINTS = 2 * 4 * 2


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnbench", *args]


ENV = {**os.environ, DISABLE_AUTOLOAD_VARIABLE: "1"}


def test_kill_then_resume_records_every_point_exactly_once(tmp_path):
    suite = tmp_path / "resume.yaml"
    suite.write_text(SUITE)
    # Its own session, so the kill takes the fork server and the worker too, as a kill -9 of a
    # terminal's job would.
    process = subprocess.Popen(_command("run", str(suite), "--output", str(tmp_path)), cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rows_path = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(tmp_path.glob("resume/*/rows.jsonl"))
        if found and found[0].read_text().count("\n") >= 3:
            rows_path = found[0]
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert rows_path is not None, "the run wrote no rows in time"
    before = read_rows(rows_path)
    assert 3 <= len(before) < POINTS
    with rows_path.open("a") as file:
        file.write('{"run_id": "cut short by the ki')  # as if killed in the middle of a write

    resumed = subprocess.run(_command("run", str(suite), "--resume", str(rows_path.parent)), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(rows_path)
    keys = [(row.implementation, row.case) for row in rows]
    assert len(keys) == len(set(keys)) == POINTS
    assert rows[: len(before)] == before  # the first rows kept as they were
    assert all(row.status == "ok" for row in rows)
    ledger = verify_ledger(rows_path.parent)  # sealed through the kill, the torn line and the resume
    assert (ledger.state, ledger.key_present, ledger.verified, ledger.findings) == ("sealed", True, POINTS, ())


def test_resume_refuses_a_changed_suite(tmp_path):
    suite = tmp_path / "resume.yaml"
    suite.write_text(SUITE.replace("[64, 128, 256, 512]", "[64]"))
    first = subprocess.run(_command("run", str(suite), "--output", str(tmp_path)), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    run_dir = next(tmp_path.glob("resume/*"))
    suite.write_text(SUITE.replace("[64, 128, 256, 512]", "[64, 128]"))
    again = subprocess.run(_command("run", str(suite), "--resume", str(run_dir)), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "has changed since this run started" in again.stderr


def test_a_corrupt_line_is_named_and_a_torn_last_line_ignored(tmp_path, capsys):
    from synthetic_runs import standard_run

    from attnbench.cli import main

    folder = standard_run(tmp_path / "results" / "synthetic" / "run")
    rows_path = folder / "rows.jsonl"
    rows_path.write_text(rows_path.read_text() + '{"run_id": "torn')
    assert main(["report", str(folder)]) == 0
    assert "last line was cut short" in capsys.readouterr().err
    lines = rows_path.read_text().splitlines()
    lines[2] = "not json"
    rows_path.write_text("\n".join(lines) + "\n")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3 is not a result row" in err


def _rewrite_rows(rows_path, change) -> None:
    lines = [json.loads(line) for line in rows_path.read_text().splitlines()]
    rows_path.write_text("".join(json.dumps(change(line)) + "\n" for line in lines))


def test_rows_of_the_first_schema_are_still_read(tmp_path):
    from synthetic_runs import standard_run

    from attnbench.storage.results import SCHEMA_VERSION

    folder = standard_run(tmp_path / "run")
    rows_path = folder / "rows.jsonl"
    now = read_rows(rows_path)

    def as_schema_1(line: dict) -> dict:  # before rounds: no version, one int of calls per sample
        line.pop("schema")
        line.update(line.pop("figures"))  # and the figures at the top level, as before schema 4
        line.pop("flags")  # and none of schema 3's fields
        line["case"].pop("q_len")  # nor schema 7's
        for name in ("where", "started_at", "ended_at"):  # nor schema 8's
            line.pop(name)
        if line.get("memory"):
            line["memory"].pop("state_bytes")
        if line.get("latency"):
            for name in ("round_sizes", "round_loads", "fresh_call_s",  # nor schema 9's
                         "observed_s", "round_cpu_s", "round_wall_s", "fresh_observed_s", "threads"):
                del line["latency"][name]
            line["latency"]["calls_per_sample"] = line["latency"]["calls_per_sample"][0]
        if line.get("correctness"):
            for name in ("rows_seed", "key_rows_checked", "fresh_seed", "calls_checked", "tolerance",
                         "within_default_tolerance"):
                del line["correctness"][name]
        return line

    _rewrite_rows(rows_path, as_schema_1)
    unplaced = [dataclasses.replace(row, where=None, started_at=None, ended_at=None) for row in now]
    assert read_rows(rows_path) == unplaced and SCHEMA_VERSION == 10


def test_rows_of_schema_3_are_still_read(tmp_path):
    from synthetic_runs import standard_run

    folder = standard_run(tmp_path / "run")
    rows_path = folder / "rows.jsonl"
    now = read_rows(rows_path)

    def as_schema_3(line: dict) -> dict:  # the figures at the top level
        line.update(line.pop("figures"), schema=3)
        return line

    _rewrite_rows(rows_path, as_schema_3)
    assert read_rows(rows_path) == now


@pytest.mark.parametrize("command", ["report", "compare", "resume"])
def test_rows_from_a_newer_schema_are_refused_in_one_line(tmp_path, capsys, command):
    from synthetic_runs import standard_run

    from attnbench.cli import main

    folder = standard_run(tmp_path / "results" / "synthetic" / "run")
    (folder / "suite.yaml").write_text("name: synthetic\nimplementations: [naive]\n")
    _rewrite_rows(folder / "rows.jsonl", lambda line: {**line, "schema": 99})
    argv = {
        "report": ["report", str(folder)],
        "compare": ["compare", str(folder), str(folder)],
        "resume": ["run", str(folder / "suite.yaml"), "--resume", str(folder)],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "line 1 was written by a newer attnbench (row schema 99; this version reads schemas 1 to 10)" in err


def test_resume_of_a_folder_that_is_no_run_is_one_line_and_leaves_it_as_it_was(tmp_path, capsys):
    from attnbench.cli import main

    suite = tmp_path / "resume.yaml"
    suite.write_text(SUITE)
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert main(["run", str(suite), "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run folder (no rows.jsonl or suite.yaml)" in err
    assert list(folder.iterdir()) == []


class _LosesItsNode(ThisMachine):
    """This machine, as a cluster's node that dies while measuring flash at the first case."""

    def start(self, slot, work):
        super().start(slot, work)
        self.work = work

    def next_event(self):
        event = super().next_event()
        if isinstance(event, RowReady) and event.row.implementation == "flash" and not getattr(self, "lost", False):
            self.lost = True
            return SlotLost(event.slot, self.work, "node died")
        return event


def test_resume_measures_the_points_a_lost_node_left_and_each_point_keeps_one_row(tmp_path, write_suite, registry):
    suite = load_suite(write_suite("name: lost\nimplementations: [naive, flash]\nsweep: {seq_len: [32, 64]}\n"
                                   "measure: {correctness: {rows: 8}, latency: false, memory: false}\n"), registry)
    first = run_suite(suite, registry, output=tmp_path, placement=_LosesItsNode(LocalExecutor(registry)))
    lost = [row for row in first.rows if row.status == "crashed"]
    assert [(row.implementation, row.case.seq_len) for row in lost] == [("flash", 32)]
    assert lost[0].reasons[0].startswith("the cluster lost")

    second = run_suite(suite, registry, resume=first.run_dir)
    points = sorted((row.implementation, row.case.seq_len, row.status) for row in second.rows)
    assert points == [("flash", 32, "ok"), ("flash", 64, "ok"), ("naive", 32, "ok"), ("naive", 64, "ok")]
    stored = load_run(first.run_dir)
    assert sorted((row.implementation, row.case.seq_len, row.status) for row in stored.rows) == points
    assert len(read_rows(first.run_dir / "rows.jsonl")) == 5  # the lost point's row stays in the ledger, superseded
