"""Issue 12: plugin code in the harness process, signals, the run folder's lock and the output
location, as a user meets them on the command line (adversary plugins installed through entry
points)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_adversaries import marked_processes

from attnbench.contract.registry import DISABLE_AUTOLOAD_VARIABLE
from attnbench.storage.results import read_rows

TESTS = Path(__file__).resolve().parent
QUICK = """
name: small
implementations: [naive, flash]
sweep: {seq_len: [64, 128, 256, 512], heads: 2, head_dim: 32}
measure: {correctness: {rows: 16}, latency: {min_run_time_s: 0.1, max_run_time_s: 0.2, rounds: 2}, threads: 1}
"""


def installed(site: Path, **modules: str) -> Path:
    """A distribution whose entry points are ``name=module`` (modules from tests/adversaries)."""
    dist_info = site / "attnbench_adversaries-6.6.6.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnbench-adversaries\nVersion: 6.6.6\n")
    points = "".join(f"{name} = {module}\n" for name, module in modules.items())
    (dist_info / "entry_points.txt").write_text("[attnbench]\n" + points)
    return site


def attnbench(*args: str, site: Path | None = None, cwd: Path = REPO, env: dict[str, str] | None = None,
              **popen) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (site, TESTS, REPO) if p), **(env or {})}
    environment["ATTNBENCH_ADVERSARY_MARKER"] = "harness"  # every process it starts can be found
    if site is None:
        environment[DISABLE_AUTOLOAD_VARIABLE] = "1"
    else:
        environment.pop(DISABLE_AUTOLOAD_VARIABLE, None)
    return subprocess.Popen([sys.executable, "-m", "attnbench", *args], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_rows(folder: Path, count: int, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob("*/*/rows.jsonl"))
        if found and found[0].read_text().count("\n") >= count:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {count} rows in {folder} within {timeout} s")


def wait_until_gone(timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while marked_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    return marked_processes()


def test_sys_exit_at_import_is_a_warning_and_every_command_still_works(tmp_path):
    site = installed(tmp_path / "site", exits=("adversaries.exits_at_import"))
    (tmp_path / "suite.yaml").write_text(QUICK.replace("[64, 128, 256, 512]", "64"))
    code, out, err = finished(attnbench("run", str(tmp_path / "suite.yaml"), "--implementations", "naive",
                                        "--output", str(tmp_path / "out"), site=site))
    assert code == 0, err
    assert "attnbench: warning: plugin 'exits': failed to import: SystemExit(0)" in err
    assert len(read_rows(next((tmp_path / "out").glob("small/*/rows.jsonl")))) == 1
    code, out, err = finished(attnbench("list", site=site))
    assert code == 0 and "naive  (exact" in out and "plugin 'exits': failed to import: SystemExit(0)" in out


def test_list_shows_what_each_plugin_did_wrong_and_lists_the_rest(tmp_path):
    site = installed(tmp_path / "site", faults="adversaries.faults")
    code, out, err = finished(attnbench("list", site=site), timeout=120)
    assert code == 0, err
    for words in ("float32: not_supported_reasons raised SystemExit(0)",
                  "float32: not_supported_reasons raised KeyboardInterrupt",
                  "float32: not_supported_reasons did not return within 10 s",
                  "float32: not_supported_reasons raised BrokenPromise: not_supported_reasons returned [42, None]",
                  "naive  (exact", "getstate_raises  (exact", "cpu: runs (float32, float16, bfloat16)"):
        assert words in out, words


def test_a_plugin_merely_installed_cannot_patch_the_harness(tmp_path):
    """Its import-time code patches the row writer (naive rows written as crashes) and tries to
    leave a trace: it runs only in the confined worker that registers the plugins, never in the
    process that writes the ledger, where its patch would have forged every naive row."""
    site = installed(tmp_path / "site", patcher="adversaries.patches_at_import")
    (tmp_path / "trace").mkdir()
    (tmp_path / "suite.yaml").write_text(QUICK.replace("[64, 128, 256, 512]", "[64, 128]"))
    code, out, err = finished(attnbench("run", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "out"),
                                        site=site, env={"ATTNBENCH_ADVERSARY_TRACE": str(tmp_path / "trace")}))
    assert code == 0, err
    rows = read_rows(next((tmp_path / "out").glob("small/*/rows.jsonl")))
    assert [row.status for row in rows if row.implementation == "naive"] == ["ok", "ok"]
    assert "forged" not in (next((tmp_path / "out").glob("small/*")) / "report.md").read_text()
    assert list((tmp_path / "trace").iterdir()) == []  # it never ran where it could write


def test_settings_a_plugin_changes_at_import_are_put_back_and_recorded(tmp_path):
    site = installed(tmp_path / "site", threads=("adversaries.threads_at_import"))
    (tmp_path / "suite.yaml").write_text(QUICK.replace("[64, 128, 256, 512]", "64").replace(", threads: 1", ""))
    code, out, err = finished(attnbench("run", str(tmp_path / "suite.yaml"), "--implementations",
                                        "naive,threads_at_import", "--output", str(tmp_path / "out"), site=site))
    assert code == 0, err
    assert "plugin 'threads': importing it changed process-wide settings (torch threads" in err
    assert "$OMP_NUM_THREADS None -> '1'" in err
    run = next((tmp_path / "out").glob("small/*"))
    environment = json.loads((run / "environment.json").read_text())
    import torch

    assert environment["torch_threads"] == torch.get_num_threads()  # this machine's default, not the plugin's
    assert "OMP_NUM_THREADS" not in environment["timing_variables"]
    assert environment["plugins"]["threads"] == {"distribution": "attnbench-adversaries", "version": "6.6.6",
                                                 "implementations": ["threads_at_import"]}
    assert environment["plugins"]["naive"]["distribution"] == "attnbench"
    rows = {row.implementation: row for row in read_rows(run / "rows.jsonl")}
    assert rows["threads_at_import"].status == "ok"
    assert any(note.startswith("importing the plugin changed process-wide settings") for note in
               rows["threads_at_import"].notes)


@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_keeps_every_row_writes_the_report_and_leaves_nothing(tmp_path, sent, code):
    (tmp_path / "suite.yaml").write_text(QUICK)
    process = attnbench("run", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "out"))
    rows_path = wait_for_rows(tmp_path / "out", 3)
    process.send_signal(sent)
    returncode, out, err = finished(process, timeout=120)
    assert returncode == code, err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(sent).name
    assert last.startswith(f"attnbench: stopped by {name}: the ") and f"--resume {rows_path.parent}" in last
    assert "Traceback" not in err
    kept = read_rows(rows_path)
    assert 3 <= len(kept) < 8 and (rows_path.parent / "report.html").exists()
    assert wait_until_gone() == []  # no fork server, worker or guard left
    if sent != signal.SIGTERM:
        return
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's attnbench
    resumed = subprocess.run(last.split("resume with: ")[1].split(), cwd=REPO, capture_output=True, text=True,
                             timeout=300, env={**os.environ, DISABLE_AUTOLOAD_VARIABLE: "1", "PATH": path})
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(rows_path)
    assert len({(row.implementation, row.case) for row in rows}) == len(rows) == 8


HELD_STOP = """
import os, signal, threading, time
from attnbench.support.containment import Interrupted, deferred_interrupts, install_interrupt_handlers
install_interrupt_handlers()
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # as torch's threads in the harness
try:
    with deferred_interrupts():
        os.kill(os.getpid(), signal.SIG{name})  # the main thread blocks it: the other thread takes it
        for _ in range(50):
            time.sleep(0.01)  # Python would run a handler it let through here
        print("block finished", flush=True)
except Interrupted as stop:
    print("stopped by", stop.signal_name)
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_stop_waits_for_the_cleanup_block_even_when_another_thread_takes_the_signal(name):
    # A stop raised while a worker was being forked left the fork server a half-sent request: it
    # died printing a traceback into the user's terminal.
    done = subprocess.run([sys.executable, "-c", HELD_STOP.format(name=name)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.stdout.splitlines() == ["block finished", f"stopped by SIG{name}"], done.stderr


def test_workers_die_with_the_harness(tmp_path):
    """kill -9 of attnbench alone (not its group): the fork server, the worker and what the point
    started in the worker's group all die (the worker's own session is not the harness's group)."""
    (tmp_path / "suite.yaml").write_text(QUICK.replace("[64, 128, 256, 512]", "[64, 128, 256, 512, 1024, 2048]")
                                         .replace("max_run_time_s: 0.2", "max_run_time_s: 2"))
    process = attnbench("run", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "out"))
    wait_for_rows(tmp_path / "out", 2)
    assert len(marked_processes()) >= 3  # the harness, its fork server, a worker (and its guard)
    process.kill()
    process.wait()
    assert wait_until_gone() == []


def test_two_runs_never_measure_into_one_folder(tmp_path):
    # Points of two seconds or more: the first run is still measuring when the second starts.
    (tmp_path / "suite.yaml").write_text(QUICK.replace("min_run_time_s: 0.1, max_run_time_s: 0.2",
                                                       "min_run_time_s: 2, max_run_time_s: 3"))
    first = attnbench("run", str(tmp_path / "suite.yaml"), "--output", str(tmp_path / "out"))
    rows_path = wait_for_rows(tmp_path / "out", 1)
    second = attnbench("run", str(tmp_path / "suite.yaml"), "--resume", str(rows_path.parent))
    code, out, err = finished(second)
    assert code == 2 and err.count("\n") == 1
    assert "another attnbench is measuring this run now" in err
    first.send_signal(signal.SIGTERM)
    assert finished(first)[0] == 143
    rows = read_rows(rows_path)
    assert 1 <= len(rows) == len({(row.implementation, row.case) for row in rows})


def test_a_bad_output_location_is_one_line_before_anything_is_measured(tmp_path):
    (tmp_path / "suite.yaml").write_text(QUICK)
    (tmp_path / "a-file").write_text("")
    for output, words in [(tmp_path / "a-file", "is a file, not a folder"),
                          (Path("/proc/attnbench"), "cannot create the run folder there")]:
        started = time.monotonic()
        code, out, err = finished(attnbench("run", str(tmp_path / "suite.yaml"), "--output", str(output)))
        assert code == 2 and err.count("\n") == 1 and f"--output {output}: {words}" in err, err
        assert time.monotonic() - started < 30  # nothing was measured


def test_a_full_disk_is_one_line_before_anything_is_measured(tmp_path, write_suite, registry, monkeypatch):
    import shutil

    from attnbench.contract.errors import UserError
    from attnbench.execution.runner import run_suite
    from attnbench.settings.loader import load_suite

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    suite = load_suite(write_suite(QUICK), registry)
    full = r"--output .*: the disk is full \(1\.0 MiB free; a run needs at least 16\.0 MiB\)"
    with pytest.raises(UserError, match=full):
        run_suite(suite, registry, output=tmp_path / "out")
    assert not (tmp_path / "out" / "small").exists() or not any((tmp_path / "out" / "small").iterdir())
