"""The seams of ARCHITECTURE.md: capabilities as data, the executor interface, input sources as a
registry, axes from one definition, figures as data."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re

import pytest
import torch
import toys

import attnbench
from attnbench.contract.capabilities import declared_limits
from attnbench.contract.case import AXES, CURVE_AXIS, Case, curve_x, describe_group, group_key
from attnbench.contract.implementation import plugin_reasons
from attnbench.contract.registry import Registry
from attnbench.execution.executor import Finished, ImplementationRef, PointRound
from attnbench.execution.local.executor import LocalExecutor
from attnbench.execution.runner import run_suite
from attnbench.measuring.figures import Traffic, Work
from attnbench.measuring.outcome import Failure
from attnbench.presenting.columns import COLUMNS
from attnbench.presenting.table import tidy_frame
from attnbench.settings.loader import load_suite
from attnbench.settings.suite import Limits, Sweep
from attnbench.storage.results import FIGURE_READERS, Row, read_rows
from attnbench.testing import CORRECTNESS_ONLY, small_case

FAST = "measure: {correctness: {rows: 32}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 2}}\n"


class Picky(toys.Toy):
    """Declares narrow capabilities."""

    devices = ("cuda",)
    dtypes = (torch.float16,)
    supports_causal = False
    supports_backward = False
    supports_grouped_query = False
    unsupported_because = {"causal": "it looks ahead"}


class ClaimsEverything(Picky):
    """Overrides not_supported_reasons without super(): the declared capabilities still hold."""

    def not_supported_reasons(self, case):
        return []


def _registry(*members) -> Registry:
    registry = Registry()
    for member in members:
        registry.add(member)
    return registry


# --- capabilities as data --------------------------------------------------------------------


def test_declared_capabilities_refuse_with_a_reason_each():
    case = small_case(causal=True, mode="forward_backward", kv_heads=2)
    reasons = plugin_reasons(Picky("picky", toys.exact_attention), case)
    assert reasons == [
        "device=cpu (supported: cuda)",
        "dtype=float32 (supported: float16)",
        "causal=True (it looks ahead; supported: causal=False)",
        "mode=forward_backward (supported: mode=forward)",
        "kv_heads=2 < heads=4 (supported: kv_heads = heads)",
    ]
    assert plugin_reasons(toys.Toy("plain", toys.exact_attention), case) == []
    assert declared_limits(Picky("picky", toys.exact_attention)) == [
        "devices: cuda", "dtypes: float16", "no causal (it looks ahead)", "no backward", "no grouped-query",
        "no chunked-prefill", "no decode"]  # inference shapes: refused unless declared


def test_an_override_cannot_claim_what_the_declaration_refuses():
    case = small_case(causal=True)
    implementation = ClaimsEverything("claims", toys.exact_attention)
    assert implementation.not_supported_reasons(case) == []
    assert "causal=True (it looks ahead; supported: causal=False)" in plugin_reasons(implementation, case)


def test_a_malformed_declaration_breaks_the_contract():
    broken = toys.Toy("broken", toys.exact_attention)
    broken.devices = "cpu"  # a string, not a tuple of device kinds
    broken.supports_causal = "yes"
    registry = _registry(broken)
    assert "broken" not in registry
    (problem,) = registry.problems
    assert "devices='cpu'" in problem.reason and "supports_causal='yes'" in problem.reason


def test_a_sweep_refuses_what_the_declaration_rules_out(tmp_path, write_suite):
    no_causal = toys.Toy("no_causal", toys.exact_attention)
    no_causal.supports_causal = False
    registry = _registry(no_causal)
    suite = load_suite(write_suite("sweep: {seq_len: 64, heads: 2, causal: [false, true]}\n" + FAST), registry)
    rows = {row.case.causal: row for row in run_suite(suite, registry, output=tmp_path).rows}
    assert rows[False].status == "ok"
    assert rows[True].status == "unsupported" and rows[True].reasons == ("causal=True (supported: causal=False)",)


# --- the executor interface ------------------------------------------------------------------


class LastFirst:
    """An executor that runs what it was given in the opposite order, as a cluster might."""

    def __init__(self, registry: Registry) -> None:
        self.local = LocalExecutor(registry)
        self.units: list = []

    def submit(self, unit) -> None:
        self.units.append(unit)
        self.local.submit(unit)

    def finished(self):
        self.local.pending.reverse()
        yield from self.local.finished()

    def cancel(self) -> None:
        self.local.cancel()

    def memory_cap_bytes(self, limits, device):
        return self.local.memory_cap_bytes(limits, device)

    def memory_cap_held(self, limits, device):
        return self.local.memory_cap_held(limits, device)

    def environment(self, threads, plugins):
        return self.local.environment(threads, plugins)

    def close(self) -> None:
        self.local.close()


def test_units_name_their_implementation_and_any_order_of_results_gives_the_same_rows(tmp_path, write_suite,
                                                                                    registry):
    members = _registry(registry.get("naive"), toys.Toy("wrong", toys.returns_query))
    suite = load_suite(write_suite("sweep: {seq_len: [32, 64], heads: 2}\n" + FAST), members)
    executor = LastFirst(members)
    reordered = run_suite(suite, members, output=tmp_path / "a", executor=executor).rows
    in_order = run_suite(suite, members, output=tmp_path / "b").rows
    assert sorted((r.implementation, r.case.seq_len, r.status) for r in reordered) == \
        sorted((r.implementation, r.case.seq_len, r.status) for r in in_order)
    assert {r.status for r in reordered if r.implementation == "wrong"} == {"incorrect"}
    points = [unit for unit in executor.units if isinstance(unit, PointRound)]
    assert {unit.implementation for unit in points} == {ImplementationRef("<python>", "naive"),
                                                         ImplementationRef("<python>", "wrong")}
    assert all(not any(isinstance(value, attnbench.Implementation) for value in vars(unit).values())
               for unit in points)
    assert all(pickle.loads(pickle.dumps(unit)) == unit for unit in points if unit.verifier is None)


def test_a_unit_naming_what_is_not_installed_is_an_error_outcome():
    unit = PointRound(ImplementationRef("elsewhere", "missing"), "missing", small_case(), {}, CORRECTNESS_ONLY,
                      Limits(), 0, 1)
    executor = LocalExecutor(Registry())
    executor.submit(unit)
    (finished,) = list(executor.finished())
    assert isinstance(finished, Finished) and isinstance(finished.outcome, Failure)
    assert finished.outcome.status == "error" and "'missing' of plugin 'elsewhere' is not registered" in \
        finished.outcome.reasons[0]


# --- input sources as a registry -------------------------------------------------------------


class Constant(attnbench.InputSource):
    """Every query and key the same: uniform attention, so out is the mean of v."""

    name = "constant"
    description = "equal queries and keys"
    parameters = {"fail": False}

    def draw(self, case, generator):
        if self.parameters["fail"]:
            raise RuntimeError("asked to fail by its parameters")
        q = torch.ones((case.batch, case.heads, case.seq_len, case.head_dim))
        k = torch.ones((case.batch, case.kv_heads, case.seq_len, case.head_dim))
        v = torch.randn((case.batch, case.kv_heads, case.seq_len, case.head_dim), generator=generator)
        return q, k, v


class NoDraw(attnbench.InputSource):
    name = "nodraw"


def test_a_registered_source_feeds_a_sweep(tmp_path, write_suite, registry):
    members = _registry(registry.get("naive"), Constant())
    suite = load_suite(write_suite("sweep: {seq_len: 64, heads: 2, inputs: [gaussian, constant]}\n" + FAST), members)
    rows = {row.case.inputs: row for row in run_suite(suite, members, output=tmp_path).rows}
    assert rows["constant"].status == "ok" and rows["gaussian"].status == "ok"
    assert rows["constant"].correctness.exact["out"].max_abs < 1e-5


def test_a_source_takes_its_parameters_from_the_suite(tmp_path, write_suite, registry):
    members = _registry(registry.get("naive"), Constant())
    text = "sweep: {seq_len: 64, heads: 2, inputs: constant}\n" + FAST
    suite = load_suite(write_suite(text + "source_options: {constant: {fail: true}}\n"), members)
    (row,) = run_suite(suite, members, output=tmp_path).rows
    assert row.status == "error" and row.reasons == ("RuntimeError: asked to fail by its parameters",)
    for given, problem in (("{constant: {fails: true}}", "source_options.constant.fails: unknown parameter of "
                                                          "input source constant (allowed: fail)"),
                           ("{constant: {fail: 1}}", "source_options.constant.fail: expected true or false, got 1"),
                           ("{mine: {}}", "source_options.mine: unknown field (allowed: gaussian, structured, "
                                          "constant)")):
        with pytest.raises(attnbench.UserError, match=re.escape(problem)):
            load_suite(write_suite(text + f"source_options: {given}\n"), members)


def test_broken_and_duplicate_sources_are_problems_and_unknown_ones_are_refused(write_suite):
    members = _registry(NoDraw(), Constant(), Constant())
    assert list(members.input_sources) == ["gaussian", "structured", "constant"]
    reasons = [problem.reason for problem in members.problems]
    assert any("draw(case, generator) is not implemented" in reason for reason in reasons)
    assert any("'constant' is already registered" in reason for reason in reasons)
    with pytest.raises(attnbench.UserError, match=r"unknown input distribution 'nodraw' \(allowed: gaussian, "
                                                  r"structured, constant\)"):
        load_suite(write_suite("sweep: {inputs: nodraw}\n"), members)


# --- axes and figures from one definition ----------------------------------------------------


def test_the_sweep_the_table_and_descriptions_follow_the_case_fields():
    names = [field.name for field in dataclasses.fields(Case)]
    assert list(AXES) == names == [field.name for field in dataclasses.fields(Sweep)]
    case = small_case(causal=True, kv_heads=2)
    frame = tidy_frame([Row("r", "x", case, "ok")])
    assert [column for column in frame.columns if column in names] == names
    assert group_key(case) == dataclasses.replace(case, **{CURVE_AXIS: 0}) and curve_x(case) == case.seq_len
    assert describe_group(case) == "B=2 H=4 kv_heads=2 D=32 float32 cpu causal forward"


def test_every_kind_of_figures_is_stored_read_and_shown(tmp_path):
    from synthetic_runs import standard_run

    fields = {field.name for field in dataclasses.fields(Row)}
    assert set(FIGURE_READERS) <= fields and {kind.figures for kind in COLUMNS} == set(FIGURE_READERS)
    rows_path = standard_run(tmp_path / "run") / "rows.jsonl"
    stored = json.loads(rows_path.read_text().splitlines()[0])
    assert stored["schema"] == 10  # no work or traffic: none declared, and no decode step
    assert {"where", "started_at", "ended_at"} <= set(stored)
    assert set(stored["figures"]) == set(FIGURE_READERS) - {"work", "traffic"}
    assert not set(FIGURE_READERS) & set(stored)
    assert all(row == Row.from_json(row.to_json()) for row in read_rows(rows_path))
    complete = dataclasses.replace(read_rows(rows_path)[0], work=Work(1e9, "4·B·H·N²·D", declared=False),
                                   traffic=Traffic(1e6, "2·B·KV·N·D × 4 bytes", declared=False))
    assert set(complete.to_json()["figures"]) == set(FIGURE_READERS) and Row.from_json(complete.to_json()) == complete
