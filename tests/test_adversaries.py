"""Issue 12: every adversary of tests/adversaries beside naive and flash in one sweep. Every cheat
is caught, every plugin fault contained, nothing is left running and no row is lost."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from adversaries import cheats, faults

from attnbench.contract.registry import Registry
from attnbench.execution.runner import run_suite
from attnbench.presenting.report import write_reports
from attnbench.settings.loader import load_suite
from attnbench.storage.results import read_rows
from attnbench.storage.run_folder import load_run

TEMPORARY = Path(tempfile.gettempdir())
SUITE = """
name: adversaries
sweep: {seq_len: 1024, heads: 2, head_dim: 32, mode: [forward, forward_backward]}
measure: {correctness: {rows: 16}, latency: {min_run_time_s: 0.02, max_run_time_s: 0.1, rounds: 2}, threads: 1}
limits: {timeout_s: 6, memory_gb: 2}
"""


def marked_processes() -> list[int]:
    """Processes started by an adversary (they carry cheats.MARKER in their environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{cheats.MARKER}=".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, registry):
    folder = tmp_path_factory.mktemp("adversaries")
    everyone = Registry()
    for implementation in (registry.get("naive"), registry.get("flash"),
                           *(cheat() for cheat in cheats.CHEATS), *(fault() for fault in faults.FAULTS)):
        everyone.add(implementation)
    assert not everyone.problems, everyone.problems
    (folder / "adversaries.yaml").write_text(SUITE)
    suite = load_suite(folder / "adversaries.yaml", everyone)
    temporary = set(TEMPORARY.iterdir())
    result = run_suite(suite, everyone, output=folder / "out")
    rows = {(row.implementation, row.case.mode): row for row in result.rows}
    # (multiprocessing's own folder for the fork server's socket, pymp-*, lives as long as this process)
    left = {path for path in set(TEMPORARY.iterdir()) - temporary if not path.name.startswith("pymp-")}
    return result, rows, len(everyone), left


def test_no_row_is_lost_and_the_honest_ones_keep_theirs(sweep):
    result, rows, implementations, _ = sweep
    assert len(result.rows) == len(rows) == 2 * implementations
    assert read_rows(result.rows_path) == list(result.rows)
    for name in ("naive", "flash"):
        for mode in ("forward", "forward_backward"):
            row = rows[(name, mode)]
            assert row.status == "ok" and not row.latency_voided, (row.reasons, row.flags)
            assert row.correctness.within_default_tolerance


def test_nothing_is_left_running(sweep):
    assert marked_processes() == []
    note = next(note for note in sweep[1][("leaves_processes", "forward")].notes if "process(es)" in note)
    assert note.startswith(("2 process(es)", "3 process(es)")) and note.endswith("; killed")
    assert any("thread(s) it started were still running" in n for n in sweep[1][("leaves_processes", "forward")].notes)


@pytest.mark.parametrize("name, words", [
    ("zeroes_v", "the call changed its input v in place"),
    ("doubles_q", "the call changed its input q in place"),
    ("caches_output", "out vs float64 softmax attention (a call on fresh inputs)"),
    ("caches_by_address", "out vs float64 softmax attention (a call on fresh inputs)"),
    ("exact_then_noise", "out vs float64 softmax attention (last timed call)"),
    ("exact_then_nan", "output contains NaN or Inf (last timed call)"),
    ("mostly_zero_rows", "out vs float64 softmax attention (first call)"),
    ("zeros_huge_tolerance", "max abs error"),
])
def test_cheats_on_the_output_are_incorrect(sweep, name, words):
    row = sweep[1][(name, "forward")]
    assert row.status == "incorrect", (name, row.status, row.reasons)
    assert any(words in reason for reason in row.reasons), row.reasons
    training = sweep[1][(name, "forward_backward")]  # a cache cannot even be differentiated twice
    assert training.status == ("error" if name.startswith("caches") else "incorrect"), training.reasons


def test_cached_outputs_are_flagged_and_never_a_result(sweep):
    forever = sweep[1][("caches_output", "forward")]
    assert "implausible_speed" in {flag.kind for flag in forever.flags} and forever.latency_voided
    # A cache keyed on the tensors' addresses and version counters never hits: every timed call
    # gives its inputs a new version, so it computes every call (prevented, not just caught).
    by_version = sweep[1][("caches_by_version", "forward")]
    assert by_version.status == "ok" and not by_version.latency_voided, by_version.flags
    assert not any(note.startswith("caches_by_version: served") for note in by_version.notes)


def test_gradients_wrong_off_the_checked_rows_are_caught(sweep):
    assert sweep[1][("wrong_key_grads", "forward")].status == "ok"
    training = sweep[1][("wrong_key_grads", "forward_backward")]
    assert training.status == "incorrect"
    assert {reason.split(" vs ")[0] for reason in training.reasons} == {"dk", "dv"}
    assert training.correctness.key_rows_checked == 16


def test_a_declared_tolerance_is_capped_and_a_loose_one_shown(sweep):
    huge = sweep[1][("zeros_huge_tolerance", "forward")]
    assert any("is over the cap" in note for note in huge.notes)
    loose = sweep[1][("slightly_off", "forward")]
    assert loose.status == "ok" and loose.correctness.within_default_tolerance is False
    assert [flag.kind for flag in loose.flags if flag.kind == "loose_tolerance"] == ["loose_tolerance"]


def test_process_wide_settings_are_put_back_or_the_point_refused(sweep):
    prepared = sweep[1][("threads_in_prepare", "forward")]
    assert prepared.status == "ok"
    put_back = "prepare changed process-wide settings (torch threads 1 -> 2"
    assert any(note.startswith(put_back) for note in prepared.notes)
    called = sweep[1][("threads_in_call", "forward")]
    assert called.status == "error"
    assert "its calls changed process-wide settings (torch threads 1 -> 2)" in called.reasons[0]


def test_memory_outside_torch_is_counted(sweep):
    row = sweep[1][("numpy_memory", "forward")]
    assert row.status == "ok" and row.memory.allocator_peak_bytes < 2**20
    assert row.memory.peak_bytes == row.memory.rss_peak_bytes > 16 * 2**20  # two 1024² float64 matrices
    assert "memory_outside_torch" in {flag.kind for flag in row.flags}


def test_a_flood_of_output_is_stopped_and_kept_bounded(sweep):
    row = sweep[1][("chatty", "forward")]
    assert row.status == "error" and "wrote more than 64 MiB to stdout/stderr" in row.reasons[0]
    assert len(row.detail) <= 2000
    assert sweep[3] == set()  # no log file left behind (the output went through a pipe)


def test_faults_become_rows_of_their_own(sweep):
    rows = sweep[1]
    expected = {
        "kills_its_group": ("crashed", "worker killed by SIGKILL"),
        "huge_message": ("error", "ValueError: xxxx"),
        "reasons_exit": ("error", "SystemExit"),
        "reasons_interrupt": ("error", "KeyboardInterrupt"),
        "reasons_hang": ("timeout", "no result within the case timeout of 6 s"),
        "reasons_not_strings": ("error", "not_supported_reasons returned [42, None]"),
        "options_raise": ("error", "invalid_options raised RuntimeError: invalid_options is broken on purpose"),
        "getstate_raises": ("error", "cannot be sent to a worker process (pickling the implementation"),
        "cannot_be_rebuilt": ("error", "could not be rebuilt in the worker process (ImportError"),
    }
    for name, (status, words) in expected.items():
        for mode in ("forward", "forward_backward"):
            row = rows[(name, mode)]
            assert row.status == status and words in row.reasons[0], (name, mode, row.status, row.reasons)
    huge = rows[("huge_message", "forward")]
    assert len(huge.reasons[0]) <= 2000 and len(huge.detail) <= 21_000


def test_plugin_text_is_stored_printable_and_escaped_in_the_reports(sweep):
    result, rows, _, _ = sweep
    note = rows[("weird_warning", "forward")].notes[0]
    assert "\n" not in note and "\x1b" not in note and "\\x1b[31mred" in note
    written = write_reports(load_run(result.run_dir))
    markdown = written[1].read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and "second \\| cell" in markdown
    assert "<script>" not in written[2].read_text()
