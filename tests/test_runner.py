"""A sweep: one row per (implementation, case), written as it finishes; limits predicted, not hit."""

from __future__ import annotations

import json
import platform
import re

import toys

from attnbench.contract.registry import Registry
from attnbench.execution.runner import run_suite
from attnbench.settings.loader import load_suite
from attnbench.storage.results import Row, read_rows
from attnbench.storage.run_folder import ENVIRONMENT_FILE, SUITE_COPY

FAST = "measure: {correctness: {rows: 64}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05}}\n"


def _registry(*implementations) -> Registry:
    registry = Registry()
    for implementation in implementations:
        registry.add(implementation)
    return registry


def test_misbehaving_implementations_get_their_status_and_naive_stays_ok(tmp_path, write_suite, registry):
    toy_registry = _registry(
        registry.get("naive"),
        toys.Toy("crashes", toys.segfaults),
        toys.Toy("hangs", toys.hangs),
        toys.Toy("hogs", toys.allocates_too_much),
        toys.Toy("raises", toys.raises),
        toys.Toy("nan", toys.returns_nan),
        toys.Toy("misshapen", toys.wrong_shape),
        toys.Toy("wrong", toys.returns_query),
    )
    suite = load_suite(write_suite("name: failures\nsweep: {seq_len: [32, 64], heads: 2}\n"
                                   "limits: {timeout_s: 4, memory_gb: 2}\n" + FAST), toy_registry)
    result = run_suite(suite, toy_registry, output=tmp_path / "out")

    rows = {(row.implementation, row.case.seq_len): row for row in result.rows}
    assert {key: row.status for key, row in rows.items()} == {
        ("naive", 32): "ok", ("naive", 64): "ok",
        ("crashes", 32): "crashed", ("crashes", 64): "crashed",
        ("hangs", 32): "timeout", ("hangs", 64): "skipped",  # not tried again at a larger N
        ("hogs", 32): "oom", ("hogs", 64): "skipped",
        ("raises", 32): "error", ("raises", 64): "error",
        ("nan", 32): "incorrect", ("nan", 64): "incorrect",
        ("misshapen", 32): "incorrect", ("misshapen", 64): "incorrect",
        ("wrong", 32): "incorrect", ("wrong", 64): "incorrect",
    }
    assert "SIGSEGV" in rows[("crashes", 32)].reasons[0]
    assert rows[("hogs", 32)].where.memory_cap.startswith("2.0 GiB")  # and how it was held here
    assert rows[("hogs", 32)].reasons[-1] == f"memory cap: {rows[('hogs', 32)].where.memory_cap}"
    assert "within the case timeout of 4 s" in rows[("hangs", 32)].reasons[0]
    assert "N=32 already ended as timeout" in rows[("hangs", 64)].reasons[0]
    assert "broken on purpose" in rows[("raises", 32)].detail  # the traceback is kept
    assert any("NaN" in reason or "nan" in reason for reason in rows[("nan", 32)].reasons)
    assert any("shape" in reason for reason in rows[("misshapen", 32)].reasons)
    assert len(result.rows) == len(rows) == 16  # every point exactly once
    assert read_rows(result.rows_path) == list(result.rows)  # every row on disk, and it reads back
    assert result.run_dir.parent == tmp_path / "out" / "failures"
    environment = json.loads((result.run_dir / ENVIRONMENT_FILE).read_text())
    assert environment["torch_threads"] >= 1 and environment["cpu_model"] and environment["worker_allocator"]
    # The yardsticks, measured in workers: matmul FLOP/s and copy bytes/s, each the best of its samples.
    for rates in ("matmul_flops", "copy_bytes_per_s"):
        samples = environment[f"{rates}_samples"]["cpu/float32"]
        assert len(samples) >= 3 and environment[rates]["cpu/float32"] == max(samples) > 1e8
    assert (result.run_dir / SUITE_COPY).read_text() == suite.path.read_text()


class _Order:
    """A progress listener that keeps the order in which rounds start (each in a fresh worker)."""

    def __init__(self) -> None:
        self.started_rounds: list[str] = []

    def started(self, total: int) -> None:
        pass

    def point(self, implementation: str, case) -> None:
        self.started_rounds.append(implementation)

    def finished(self, row) -> None:
        pass


def test_implementations_of_a_case_take_turns_in_rounds(tmp_path, write_suite):
    names = ("first", "second", "third")
    toy_registry = _registry(*(toys.Toy(name, toys.exact_attention) for name in names))
    suite = load_suite(write_suite("sweep: {seq_len: 32, heads: 2}\nmeasure: {correctness: {rows: 8}, latency: "
                                   "{min_run_time_s: 0.03, max_run_time_s: 0.06, rounds: 3}}\n"), toy_registry)
    order = _Order()
    rows = run_suite(suite, toy_registry, output=tmp_path, progress=order).rows

    # Each round is a fresh worker; the order rotates so that nobody always follows the same one.
    # (The case's start is announced first, with its first series.)
    assert order.started_rounds[1:] == ["first", "second", "third", "second", "third", "first",
                                        "third", "first", "second"]
    for row in rows:
        assert row.status == "ok" and len(row.latency.round_sizes) == 3
        assert row.latency.median_s == min(row.latency.round_medians_s)
    # Each row says where it ran (this machine: no cluster node) and when, its rounds spanning the others'.
    assert {(row.where.host, row.where.node) for row in rows} == {(platform.node(), "")}
    assert all(row.where.device_name for row in rows)
    first, _, third = rows
    assert first.started_at < third.started_at < first.ended_at and third.started_at < third.ended_at


def test_a_point_predicted_over_the_memory_cap_is_skipped_not_run(tmp_path, write_suite, registry):
    # naive at H=8 holds 2 × 8·N²·4 bytes: 16 MiB at N=512, so 256 MiB at N=2048 > a 154 MiB cap
    # (which leaves room for the inputs and the references at N=2048).
    suite = load_suite(
        write_suite("implementations: [naive, flash]\nsweep: {seq_len: [128, 256, 512, 2048], heads: 8}\n"
                    "limits: {memory_gb: 0.15}\n" + FAST),
        registry,
    )
    rows = run_suite(suite, registry, output=tmp_path).rows
    naive = {row.case.seq_len: row for row in rows if row.implementation == "naive"}
    assert [naive[n].status for n in (128, 256, 512)] == ["ok", "ok", "ok"], [r.reasons for r in naive.values()]
    assert naive[2048].status == "skipped"
    # Extrapolated from the peaks measured at N=256 and 512 (the process peak, which varies a little).
    predicted = re.match(r"predicted peak memory (\d+\.\d) MiB > memory cap 153\.6 MiB", naive[2048].reasons[0])
    assert predicted and 153.6 < float(predicted.group(1)) < 400, naive[2048].reasons
    assert naive[2048].wall_time_s == 0  # never started
    assert all(row.status == "ok" for row in rows if row.implementation == "flash")


def test_the_time_budget_skips_the_rest_of_an_implementation(tmp_path, write_suite, registry):
    suite = load_suite(
        write_suite("implementations: [flash]\nsweep: {seq_len: [64, 128, 256]}\nlimits: {budget_s: 0.001}\n" + FAST),
        registry,
    )
    rows = run_suite(suite, registry, output=tmp_path).rows
    assert [row.status for row in rows] == ["ok", "skipped", "skipped"]
    assert rows[1].reasons[0].startswith("time budget of 0.001 s for flash is spent")


def test_a_device_this_machine_lacks_is_unsupported_with_the_reason(tmp_path, write_suite, registry):
    import torch

    if torch.cuda.is_available():
        return  # nothing to show on a machine that has one
    text = "implementations: [flash]\nsweep: {seq_len: 64, device: [cpu, cuda]}\n"
    suite = load_suite(write_suite(text + FAST), registry)
    rows = run_suite(suite, registry, output=tmp_path).rows
    assert {row.case.device: row.status for row in rows} == {"cpu": "ok", "cuda": "unsupported"}
    cuda = [row for row in rows if row.case.device == "cuda"][0]
    assert "device=cuda is not available on this machine" in cuda.reasons[0]


def test_rows_survive_a_round_trip_through_json_even_with_nan(tmp_path):
    from attnbench.measuring.figures import Correctness, ErrorFigures
    from attnbench.testing import small_case

    row = Row(run_id="r", implementation="x", case=small_case(), status="incorrect",
              correctness=Correctness(4, {"out": ErrorFigures(float("nan"), float("inf"), 1e-3)}, None, "exact"))
    path = tmp_path / "rows.jsonl"
    from attnbench.storage.results import write_rows

    write_rows(path, [row])
    (back,) = read_rows(path)
    assert back.case == row.case and back.status == "incorrect"
    assert back.correctness.exact["out"].rel_fro == float("inf") and not back.correctness.exact["out"].passed


def test_the_suite_sets_the_workers_thread_count(tmp_path, write_suite):
    toy_registry = _registry(toys.Toy("counts", toys.notes_its_threads))
    suite = load_suite(write_suite("sweep: {seq_len: 32, heads: 2}\nmeasure: {correctness: {rows: 8}, "
                                   "latency: {min_run_time_s: 0.01, max_run_time_s: 0.02}, threads: 1}\n"),
                       toy_registry)
    result = run_suite(suite, toy_registry, output=tmp_path)
    assert result.rows[0].notes == ("threads=1",)
    assert result.environment.torch_threads == 1


def test_a_busy_machine_is_said_before_the_sweep_and_its_points_are_flagged(tmp_path, write_suite, registry,
                                                                            monkeypatch):
    import os
    import subprocess
    import sys

    events = []

    class Progress:
        def started(self, total):
            events.append("started")

        def point(self, implementation, case):
            pass

        def finished(self, row):
            pass

    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.5, 7.5))
    suite = load_suite(write_suite("implementations: [naive]\nsweep: {seq_len: 256, heads: 2}\n"
                                   "measure: {correctness: {rows: 8}, latency: {min_run_time_s: 0.5, "
                                   "max_run_time_s: 1, rounds: 1}, threads: 1}\n"), registry)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        result = run_suite(suite, registry, output=tmp_path, progress=Progress(), warn=events.append)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert events[0].startswith("the machine is busy (load average 7.5") and events[1] == "started"
    (row,) = result.rows
    assert row.latency.load > 0.5
    assert [flag.kind for flag in row.flags if flag.kind == "under_load"] == ["under_load"]
    # Being under load does not void the figure, which is still a measurement (the burners can
    # also make the call on fresh inputs slow enough for its own flag, which does).
    (under_load,) = [flag for flag in row.flags if flag.kind == "under_load"]
    assert not under_load.voids_latency
