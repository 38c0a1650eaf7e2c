"""Issue 31: plugins that attack the harness itself, in one sweep beside naive and flash, run as a
user runs them: `attnbench run` on a suite naming them, the attacks installed as a plugin package
(an entry point). Each attack is prevented (the worker could not do it) or caught (named in its
row and in the report), and naive and flash keep their rows, unflagged, with their true figures.
A protection that needs a kernel feature this machine lacks makes its test skip and say so."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from adversaries import attacks
from test_harness_process import attnbench, finished, installed

import attnbench.measuring.correctness as correctness
from attnbench.storage.run_folder import load_run
from attnbench.support.confinement import expected_protections

PROTECTIONS = expected_protections()
# Without Landlock's signal scoping, the attack that signals every other process would stop this
# test session (and anything else of this user's): it is left out, and its test skips.
ATTACKING = [attack.name for attack in attacks.ATTACKS
             if attack is not attacks.SignalsHarness or PROTECTIONS.signals_confined]
SUITE = f"""
name: attacks
implementations: [naive, flash, {', '.join(ATTACKING)}]
sweep: {{seq_len: 512, heads: 2, head_dim: 32}}
measure: {{correctness: {{rows: 16}}, latency: {{min_run_time_s: 0.1, max_run_time_s: 0.3, rounds: 2}}, threads: 1}}
limits: {{timeout_s: 60, memory_gb: 2}}
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    if not PROTECTIONS.writes_confined:
        pytest.skip("this kernel has no Landlock: workers' writes cannot be confined here")
    folder = tmp_path_factory.mktemp("attacks")
    cache = folder / "input-cache"
    (cache / "minilm").mkdir(parents=True)
    capture = cache / "minilm" / "capture.safetensors"
    capture.write_bytes(b"a capture")
    decoy = folder / "another-run" / "rows.jsonl"  # another run's ledger, on the same machine
    decoy.parent.mkdir()
    decoy.write_text('{"implementation": "naive", "status": "ok"}\n')
    source = Path(inspect.getsourcefile(correctness))
    watched = {path: _digest(path) for path in (capture, decoy, source)}
    site = installed(folder / "site", attacks="adversaries.attacks")
    (folder / "attacks.yaml").write_text(SUITE)
    code, out, err = finished(attnbench("run", str(folder / "attacks.yaml"), "--output", str(folder / "out"),
                                        site=site, env={"ATTNBENCH_CACHE": str(cache)}), timeout=600)
    assert code == 0, err
    assert "was edited" not in err and "changed after the run" not in err, err  # the ledger verifies
    run = load_run(next((folder / "out").glob("attacks/*")))
    rows = {row.implementation: row for row in run.rows}
    return run, rows, watched, cache


def _note(row, name: str) -> str:
    return next(note for note in row.notes if note.startswith(f"{name}: "))


def test_every_point_keeps_its_row_and_naive_and_flash_their_true_figures(attacked):
    run, rows, _, _ = attacked
    assert len(run.rows) == len(rows) == 2 + len(ATTACKING) and run.ledger.summary().startswith("sealed")
    for name in ("naive", "flash"):
        row = rows[name]
        # (under_load: other work on this machine meanwhile, a true statement about the figure, not a finding)
        assert row.status == "ok" and {flag.kind for flag in row.flags} <= {"under_load"}, (name, row.reasons, row.flags)
        assert row.correctness.within_default_tolerance


@pytest.mark.parametrize("name", ["rewrites_ledger", "appends_ledger"])
def test_no_worker_can_write_a_ledger_its_own_run_s_or_another_s(attacked, name):
    run, rows, watched, _ = attacked
    note = _note(rows[name], name)
    assert "denied (PermissionError)" in note, note
    lines = [json.loads(line) for line in (run.path / "rows.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) and all(line["status"] != attacks.FORGED_STATUS for line in lines)
    decoy = next(path for path in watched if path.name == "rows.jsonl")
    assert _digest(decoy) == watched[decoy]


def test_no_worker_can_edit_the_input_cache(attacked):
    _, rows, watched, cache = attacked
    assert "denied (PermissionError)" in _note(rows["edits_input_cache"], "edits_input_cache")
    assert not (cache / "planted.safetensors").exists()
    capture = next(path for path in watched if path.name == "capture.safetensors")
    assert _digest(capture) == watched[capture]


def test_no_worker_can_edit_attnbench_or_plant_code_for_every_python(attacked):
    _, rows, watched, _ = attacked
    note = _note(rows["edits_installed_source"], "edits_installed_source")
    assert note.count("denied (PermissionError)") == 2, note
    source = next(path for path in watched if path.name == "correctness.py")
    assert _digest(source) == watched[source]
    assert not (Path(torch.__file__).parent.parent / "zz_attnbench_adversary.pth").exists()


def test_a_patched_timer_is_caught_by_the_harness_s_clock(attacked):
    run, rows, _, _ = attacked
    row = rows["patches_timer"]
    assert row.status == "ok" and row.latency_voided
    assert "timing_disagrees" in {flag.kind for flag in row.flags}
    report = (run.path / "report.md").read_text()
    assert "timing_disagrees" in report and "patches_timer" in report


def test_a_patched_verifier_changes_nothing_the_harness_judges(attacked):
    row = attacked[1]["patches_verifier"]
    assert row.status == "incorrect" and any("out vs float64 softmax attention" in r for r in row.reasons)


def test_a_patched_memory_figure_is_read_from_outside(attacked):
    rows = attacked[1]
    patched, flash = rows["patches_memory"].memory, rows["flash"].memory
    assert patched.allocator_peak_bytes == 0  # what it stated
    assert patched.peak_bytes >= attacks.PatchesMemoryFigure.EXTRA_BYTES > 10 * flash.peak_bytes


def test_no_reference_is_there_to_find(attacked):
    row = attacked[1]["searches_gc"]
    assert row.status == "incorrect"
    assert not any(note.startswith("searches_gc: found") for note in row.notes)


def test_skipping_the_timed_calls_is_never_a_result(attacked):
    """It returns outputs it computed before in every timed call (its check of the caller costs
    well under a call), so its stated and observed times are both honest clocks of almost nothing."""
    row = attacked[1]["skips_timed_calls"]
    caught = {"fresh_inputs_slower", "implausible_speed"} & {flag.kind for flag in row.flags}
    assert row.status == "incorrect" or (caught and row.latency_voided), (row.status, row.flags, row.notes)


def test_a_lazy_output_is_not_a_result(attacked):
    row = attacked[1]["lazy_output"]
    assert row.status == "incorrect" and any("output is a _Lazy, not a torch.Tensor" in r for r in row.reasons), \
        row.reasons


def test_a_reply_meant_to_crash_the_harness_costs_only_its_own_row(attacked):
    row = attacked[1]["json_bomb"]
    assert row.status == "error" and "could not be read" in row.reasons[0], row.reasons


def test_an_exact_implementation_is_judged_against_exact_attention_not_its_own_reference(attacked):
    row = attacked[1]["exact_own_reference"]
    assert row.status == "incorrect" and row.correctness.judged_against == "exact", (row.status, row.reasons)


def test_a_chain_of_processes_is_killed_whole_and_slows_no_one(attacked):
    from test_adversaries import marked_processes

    row = attacked[1]["chain_of_processes"]
    killed = next(note for note in row.notes if "process(es) it started were still running" in note)
    assert int(killed.split()[0]) >= attacks.ChainOfProcesses.DEPTH, killed
    assert marked_processes() == []


def test_cpu_used_by_a_helper_in_another_session_counts(attacked):
    row = attacked[1]["spins_in_new_session"]
    assert "cpu_over_threads" in {flag.kind for flag in row.flags} and row.latency_voided, row.flags


def test_memory_held_by_a_helper_process_counts(attacked):
    rows = attacked[1]
    held = rows["memory_in_helper"].memory
    # The helper's 64 MiB during each call counts in the call's peak (every process of the point);
    # it frees them after, so what it keeps is only its own process.
    assert held.rss_peak_bytes >= attacks.MemoryInHelper.EXTRA_BYTES
    assert held.footprint_bytes >= attacks.MemoryInHelper.EXTRA_BYTES > 10 * rows["flash"].memory.footprint_bytes


def test_no_worker_can_signal_or_read_the_harness(attacked):
    if not PROTECTIONS.signals_confined:
        pytest.skip("this kernel's Landlock has no signal scoping (ABI < 6)")
    note = _note(attacked[1]["signals_harness"], "signals_harness")
    assert "signal denied (PermissionError)" in note and "memory denied (PermissionError)" in note, note
    assert "environ denied (PermissionError)" in note


def test_the_run_and_its_report_say_which_protections_were_in_force(attacked):
    run, _, _, _ = attacked
    recorded = run.environment["protections"]
    assert recorded["writes_confined"] and recorded["landlock_abi"] == PROTECTIONS.landlock_abi
    report = (run.path / "report.md").read_text()
    assert "Landlock" in report
