"""The ledger only the harness writes: rows changed, added or removed after the run are named and
left out, as an editor of rows.jsonl (by hand, by a script, with or without the key) would find."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
from synthetic_runs import standard_run

from attnbench.cli import main
from attnbench.contract.errors import UserError
from attnbench.presenting.run_facts import run_facts
from attnbench.storage import ledger, run_folder
from attnbench.storage.environment import capture_environment
from attnbench.storage.ledger import KEY_STORE_VARIABLE, LEDGER_FILE
from attnbench.storage.results import read_rows
from attnbench.storage.run_folder import load_run, verify_ledger

# standard_run's rows, in order: quadratic, tiled, linear, liar, flaky; N = 512 .. 8192 each
TILED_1024 = 7  # the line of tiled at N=1024
POINT = "tiled, B=1 H=8 N=1024 D=64 float32 cpu forward"
ROWS = 25


@pytest.fixture
def keys(tmp_path, monkeypatch):
    folder = tmp_path / "keys"
    monkeypatch.setenv(KEY_STORE_VARIABLE, str(folder))
    return folder


def _sealed_run(tmp_path, name="run"):
    """standard_run's rows, written again through the harness's sealing writer."""
    folder = standard_run(tmp_path / "results" / "synthetic" / name)
    rows = read_rows(folder / "rows.jsonl")
    (folder / "rows.jsonl").unlink()
    ledger.start_ledger(folder)
    writer = run_folder.row_writer(folder)
    for row in rows:
        writer.write(row)
    writer.close()
    return folder


def _lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]


def _write(folder, lines: list[dict]) -> None:
    (folder / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _faster(line: dict) -> dict:
    """One figure changed by hand: the point looks ten times faster."""
    line["figures"]["latency"]["samples_s"] = [value / 10 for value in line["figures"]["latency"]["samples_s"]]
    return line


def _recompute_chain(folder, lines: list[dict]) -> None:
    """What an editor without the key can do: the keyless chain recomputed from ledger.json's id
    over the edited rows, and ledger.json's head with it (the MACs copied as they were)."""
    info = json.loads((folder / LEDGER_FILE).read_text())
    chain = hashlib.sha256(info["ledger"].encode()).hexdigest()
    for index, line in enumerate(lines):
        digest = ledger.content_digest(line)
        chain = hashlib.sha256(bytes.fromhex(chain) + bytes.fromhex(digest) + index.to_bytes(8, "big")).hexdigest()
        line["seal"] = {**line["seal"], "index": index, "chain": chain}
    _write(folder, lines)
    (folder / LEDGER_FILE).write_text(json.dumps({**info, "rows": len(lines), "chain": chain}))


def test_the_harness_seals_every_row_and_keeps_the_key_outside_the_run_folder(tmp_path, keys):
    folder = _sealed_run(tmp_path)
    check = verify_ledger(folder)
    assert (check.state, check.key_present, check.verified, check.findings) == ("sealed", True, ROWS, ())
    assert check.summary() == f"sealed, verified ({ROWS} rows, key present)"
    assert [line["seal"]["index"] for line in _lines(folder)] == list(range(ROWS))
    assert len(read_rows(folder / "rows.jsonl")) == ROWS  # the seal is no field of a Row
    info = json.loads((folder / LEDGER_FILE).read_text())
    assert info["rows"] == ROWS and info["key_store"] == str(keys)
    key = json.loads((keys / f"{info['ledger']}.key").read_text())["key"]
    assert not any(key in path.read_text(errors="replace") for path in folder.rglob("*") if path.is_file())
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in keys.iterdir()} == {0o600}


def test_the_key_store_is_the_variable_else_xdg_state_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_STORE_VARIABLE, str(tmp_path / "mine"))
    assert ledger.ledger_key_store() == tmp_path / "mine"
    monkeypatch.delenv(KEY_STORE_VARIABLE)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert ledger.ledger_key_store() == tmp_path / "state" / "attnbench" / "ledger-keys"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ledger.ledger_key_store() == tmp_path / "home" / ".local" / "state" / "attnbench" / "ledger-keys"


def test_a_key_store_that_cannot_be_written_is_one_line_before_anything_is_measured(tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv(KEY_STORE_VARIABLE, str(tmp_path / "a file" / "keys"))
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=f"cannot keep the run's ledger key there .*set {KEY_STORE_VARIABLE}"):
        ledger.start_ledger(tmp_path / "run")


def test_a_figure_changed_by_hand_is_named_and_left_out_of_the_report(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    _write(folder, lines)

    assert main(["report", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"rows.jsonl line {TILED_1024} ({POINT}): changed after the run" in err and "not reported" in err
    report = (folder / "report.md").read_text()
    assert f"line {TILED_1024} ({POINT}) changed" in report and "Rows edited after the run" in report
    assert "EDITED after the run (1 changed)" in report and "EDITED" in (folder / "report.html").read_text()
    table = (folder / "table.csv").read_text().splitlines()
    assert len(table) == ROWS  # a header and every row but the edited one
    assert not any(line.startswith("tiled,") and ",1024," in line for line in table)


def test_rows_appended_without_a_seal_or_with_a_copied_one_are_added(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    forged = _faster(json.loads(json.dumps(lines[TILED_1024 - 1])))
    unsealed = {name: value for name, value in forged.items() if name != "seal"}
    _write(folder, [*lines, unsealed, forged])  # the second keeps the seal of the row it was copied from

    run = load_run(folder)
    assert len(run.rows) == ROWS
    assert [(f.kind, f.line) for f in run.ledger.findings] == [("added", ROWS + 1), ("added", ROWS + 2)]
    err = capsys.readouterr().err
    assert f"line {ROWS + 1} ({POINT}): added after the run (it has no seal)" in err
    assert f"line {ROWS + 2} ({POINT}): added after the run (its seal repeats the place of the harness's row 7)" in err


def test_a_row_inserted_with_a_made_up_seal_is_added_and_the_rows_after_it_still_verify(tmp_path, keys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    forged = {**_faster(json.loads(json.dumps(lines[0]))), "seal": {"index": 1000, "chain": "a" * 64, "mac": "b" * 64}}
    _write(folder, [*lines[:3], forged, *lines[3:]])
    check = verify_ledger(folder)
    assert [(f.kind, f.line, f.why) for f in check.findings] == [("added", 4, "a row the harness never wrote")]
    assert check.verified == ROWS


def test_a_row_forged_with_a_recomputed_seal_at_the_end_is_added(tmp_path, keys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    _recompute_chain(folder, [*lines, _faster(json.loads(json.dumps(lines[0])))])
    check = verify_ledger(folder)
    assert [(f.kind, f.line) for f in check.findings] == [("added", ROWS + 1)]


def test_rows_deleted_in_the_middle_or_at_the_end_are_removed(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    _write(folder, [*lines[:9], *lines[11:-1]])  # rows 10 and 11 and the last

    run = load_run(folder)
    assert len(run.rows) == ROWS - 3  # what is there is still reported
    assert [(f.kind, f.point, f.line, f.at_end) for f in run.ledger.findings] == [
        ("removed", "the harness's rows 10 to 11", 9, False), ("removed", f"the harness's row {ROWS}", ROWS - 3, True)]
    err = capsys.readouterr().err
    assert "rows.jsonl: the harness's rows 10 to 11 (after line 9) removed after the run" in err
    assert f"rows.jsonl: the harness's row {ROWS} (after line {ROWS - 3}, the last) removed after the run" in err
    assert "2 removed" in run.ledger.summary()


def test_rows_cut_from_the_end_with_ledger_json_rolled_back_are_still_removed(tmp_path, keys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    info = json.loads((folder / LEDGER_FILE).read_text())
    _write(folder, lines[:-2])
    (folder / LEDGER_FILE).write_text(json.dumps({**info, "rows": ROWS - 2, "chain": lines[-3]["seal"]["chain"]}))
    assert [(f.kind, f.point, f.at_end) for f in verify_ledger(folder).findings] == [
        ("removed", f"the harness's rows {ROWS - 1} to {ROWS}", True)]  # the key store's count is the harness's


def test_an_editor_who_recomputes_the_chain_is_caught_by_the_key(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    _recompute_chain(folder, lines)

    run = load_run(folder)
    assert [(f.kind, f.line, f.point) for f in run.ledger.findings] == [("changed", TILED_1024, POINT)]
    assert len(run.rows) == ROWS - 1 and run.ledger.verified == ROWS - 1  # the rows after it still verify
    assert f"line {TILED_1024} ({POINT}): changed after the run" in capsys.readouterr().err


def test_without_the_key_only_the_chain_is_checked_and_the_output_says_so(tmp_path, keys, monkeypatch, capsys):
    folder = _sealed_run(tmp_path)
    monkeypatch.setenv(KEY_STORE_VARIABLE, str(tmp_path / "another machine"))
    intact = verify_ledger(folder)
    assert (intact.state, intact.key_present, intact.verified, intact.findings) == ("sealed", False, ROWS, ())
    assert intact.summary() == (f"sealed, chain verified ({ROWS} rows, key not on this machine: edits that recompute "
                                "the chain cannot be detected here)")

    lines = _lines(folder)
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    _write(folder, lines)  # by hand: the chain no longer follows
    assert [(f.kind, f.line) for f in verify_ledger(folder).findings] == [("changed", TILED_1024)]
    _write(folder, lines[:-1])  # the last row cut off: ledger.json's head still counts it
    assert [f.kind for f in verify_ledger(folder).findings] == ["changed", "removed"]

    _recompute_chain(folder, lines)  # an editor who recomputes the chain: not caught here
    run = load_run(folder)
    assert run.ledger.findings == () and len(run.rows) == ROWS
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("sealed on another machine: its key is not here; edits that recompute the chain cannot be detected "
            "here") in err
    assert "key not on this machine" in run.ledger.summary()


def test_compare_and_report_name_the_edited_rows_and_go_on(tmp_path, keys, capsys):
    base, new = _sealed_run(tmp_path, "base"), _sealed_run(tmp_path, "new")
    lines = _lines(new)
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    del lines[2]
    _write(new, lines)

    assert main(["compare", str(base), str(new)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 2
    assert f"new/rows.jsonl line {TILED_1024 - 1} ({POINT}): changed after the run" in captured.err
    assert "new/rows.jsonl: the harness's row 3 (after line 2) removed after the run" in captured.err
    assert "only in base: quadratic: 1 point" in captured.out and "tiled: 1 point" in captured.out
    # (`attnbench report` on an edited ledger: test_a_figure_changed_by_hand_is_named_and_left_out_of_the_report)


def test_resume_refuses_an_edited_ledger_in_one_line(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    (folder / "suite.yaml").write_text("name: synthetic\nimplementations: [naive]\n")
    lines = _lines(folder)
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    _write(folder, lines)
    assert main(["run", str(folder / "suite.yaml"), "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"its rows.jsonl was edited after the run (line {TILED_1024} ({POINT}) changed); start a new run" in err
    assert (folder / "rows.jsonl").read_text() == "".join(json.dumps(line) + "\n" for line in lines)


def test_resume_goes_on_with_the_chain_even_when_the_head_lags(tmp_path, keys, registry):
    from attnbench.settings.loader import load_suite

    folder = _sealed_run(tmp_path)
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text("name: synthetic\nimplementations: [naive]\n")
    (folder / "suite.yaml").write_text(suite_path.read_text())
    (folder / "environment.json").write_text(json.dumps(capture_environment().to_json()))
    info = json.loads((folder / LEDGER_FILE).read_text())
    # Killed after its last row was on disk and before the head counted it.
    (keys / f"{info['ledger']}.head").write_text(json.dumps({"rows": ROWS - 1, "chain": "0" * 64}))
    assert verify_ledger(folder).findings == ()

    _, rows, lock = run_folder.resume_run(folder, load_suite(suite_path, registry), warn=lambda text: None)
    writer = run_folder.row_writer(folder)
    writer.write(rows[0])
    writer.close()
    lock.close()
    check = verify_ledger(folder)
    assert (check.findings, check.verified) == ((), ROWS + 1)
    assert [line["seal"]["index"] for line in _lines(folder)] == list(range(ROWS + 1))


def test_a_ledger_json_removed_or_replaced_on_this_machine_is_named(tmp_path, keys, capsys):
    folder = _sealed_run(tmp_path)
    lines = _lines(folder)
    stripped = [{name: value for name, value in line.items() if name != "seal"} for line in lines]
    _write(folder, stripped)  # every seal stripped and ledger.json gone: not a run from before seals
    (folder / LEDGER_FILE).unlink()
    with pytest.raises(UserError, match="every row was edited after the run"):
        load_run(folder)
    err = capsys.readouterr().err
    assert "ledger.json was removed after the run" in err and err.count("added after the run (it has no seal)") == ROWS

    _write(folder, lines)  # the seals back, and a ledger.json of another id with the chain recomputed for it
    lines[TILED_1024 - 1] = _faster(lines[TILED_1024 - 1])
    (folder / LEDGER_FILE).write_text(json.dumps({"ledger": "0" * 32, "rows": 0, "chain": "0" * 64}))
    _recompute_chain(folder, lines)
    check = verify_ledger(folder)
    assert check.key_present and "ledger.json was replaced after the run" in check.problems[0]
    assert [(f.kind, f.line) for f in check.findings] == [("changed", TILED_1024)]


def test_a_run_written_before_seals_still_reads(tmp_path, keys, capsys):
    folder = standard_run(tmp_path / "results" / "synthetic" / "run")
    run = load_run(folder)
    assert len(run.rows) == ROWS and run.ledger.state == "unsealed" and not run.ledger.edited
    assert capsys.readouterr().err == ""
    assert ("ledger", "not sealed (written before attnbench sealed its ledgers, or its seals were removed): its rows "
                      "cannot be verified") in run_facts(run)[1]
    # Seals without a ledger.json, and none recorded on this machine for the folder: not verified, and said so.
    _write(folder, [{**line, "seal": {"index": 0, "chain": "0" * 64, "mac": "0" * 64}} for line in _lines(folder)])
    check = verify_ledger(folder)
    assert check.state == "unverifiable" and check.edited and "ledger.json is missing" in check.summary()
