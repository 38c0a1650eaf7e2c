"""FLOP counts: exact attention counted by the harness, an approximation's own declaration checked
(a plugin may return anything), and every built-in approximation declaring its formula."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from synthetic_runs import curve, declared, write_run
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from toys import Toy, exact_attention

import attnbench
from attnbench.analysis.curves import throughputs
from attnbench.contract.implementation import effective_options
from attnbench.contract.work import banded_pairs
from attnbench.measuring.figures import Work
from attnbench.measuring.in_process import measure_case
from attnbench.measuring.work import declared_flops
from attnbench.presenting.columns import table_columns
from attnbench.settings.suite import Measure
from attnbench.storage.run_folder import load_run
from attnbench.testing import small_case


class Declaring(Toy):
    exact = False

    def __init__(self, declaration) -> None:
        super().__init__("declaring", exact_attention)
        self.declaration = declaration

    def flops(self, case, options):
        return self.declaration(case) if callable(self.declaration) else self.declaration


@pytest.mark.parametrize("seq_len, window, causal, global_tokens",
                         list(itertools.product((1, 7, 33), (0, 2, 40), (False, True), (0, 3))))
def test_banded_pairs_counts_the_pattern(seq_len, window, causal, global_tokens):
    i, j = torch.arange(seq_len).view(-1, 1), torch.arange(seq_len).view(1, -1)
    allowed = ((i - j).abs() <= window) | (i < global_tokens) | (j < global_tokens)
    if causal:
        allowed &= j <= i
    assert banded_pairs(seq_len, window, causal, global_tokens) == int(allowed.sum())


def _raises(case):
    raise RuntimeError("no idea")


@pytest.mark.parametrize("declaration, note", [
    (_raises, "flops() raised RuntimeError: no idea; no throughput"),
    (1e9, "flops() returned 1000000000.0 (expected None or an attnbench.FlopCount"),
    (attnbench.FlopCount(float("nan"), "nan"), "flops() returned FlopCount(flops=nan"),
    (attnbench.FlopCount(-5.0, "negative"), "flops() returned FlopCount(flops=-5.0"),
    (attnbench.FlopCount(True, "a bool"), "flops() returned FlopCount(flops=True"),
    (attnbench.FlopCount(1e9, ""), "flops() returned FlopCount(flops=1000000000.0, formula='')"),
])
def test_a_broken_declaration_costs_the_throughput_and_nothing_else(declaration, note):
    work, said = declared_flops(Declaring(declaration), small_case(), {})
    assert work is None and said.startswith(note)
    row = measure_case(Declaring(declaration), small_case(), {}, Measure(latency=None, memory=False))
    assert row.status == "ok" and row.work is None and any(n.startswith(note) for n in row.notes)


def test_an_exact_implementation_cannot_declare_its_own_work():
    toy = Declaring(attnbench.FlopCount(1e18, "a lot"))
    toy.exact = True
    work = measure_case(toy, small_case(seq_len=64), {}, Measure(latency=None, memory=False)).work
    assert work == Work(4.0 * 2 * 4 * 64**2 * 32, "4·B·H·N²·D", declared=False)


def test_a_declaration_its_latency_makes_implausible_is_flagged_and_shows_no_throughput(tmp_path):
    honest = curve("honest", lambda n: 1e-6 * n, lambda n: 4096 * n, 0.05)
    boastful = [dataclasses.replace(r, implementation="boastful") for r in honest]
    rows = [dataclasses.replace(r, work=Work(8.0 * r.case.seq_len * 1e3, "8·N·1000", declared=True)) for r in honest]
    rows += [dataclasses.replace(r, work=Work(1e18, "1e18", declared=True)) for r in boastful]
    declarations = {name: declared(False, "n", "n") for name in ("honest", "boastful")}
    run = load_run(write_run(tmp_path / "run", rows, declarations, matmul=1e11))
    achieved = {(t.row.implementation, t.row.case.seq_len): t for t in throughputs(run.rows, run.declared,
                                                                                   run.matmul_flops)}
    assert achieved[("honest", 1024)].achieved_flops == pytest.approx(8e3 / 1e-6)
    assert achieved[("honest", 1024)].formula == "8·N·1000"
    assert not any(name == "boastful" for name, _ in achieved)
    flagged = [r for r in run.rows if r.implementation == "boastful"]
    assert all(r.flags[0].kind == "implausible_work" and not r.latency_voided for r in flagged)
    assert all(table_columns(r)["achieved_flops_per_s"] is None for r in flagged)  # the table and summary agree


def test_rows_from_before_work_was_stored_still_give_exact_throughput(tmp_path):
    rows = curve("exact", lambda n: 1e-9 * n**2, lambda n: 4096 * n, 1e-7)  # no work, as schema 4 wrote them
    run = load_run(write_run(tmp_path / "run", rows, {"exact": declared(True, "n^2", "n")}, matmul=1e13))
    assert all(r.work is None for r in run.rows)
    assert [t.formula for t in throughputs(run.rows, run.declared, {})] == ["4·B·H·N²·D"] * len(rows)


@pytest.mark.parametrize("name", ["performer", "nystrom", "sparse", "axial", "hybrid"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_built_in_approximation_declares_what_it_computes(registry, name, causal):
    """Checked against torch's own count of the products a forward call runs (FlopCounterMode,
    with SDPA decomposed into its matmuls). Blocked kernels and causal masks compute more than
    the pattern's pairs, which the declaration leaves out: there the count may be above it."""
    implementation = registry.get(name)
    case = small_case(seq_len=512, causal=causal, kv_heads=2)
    if implementation.not_supported_reasons(case):
        pytest.skip(f"{name} does not take this case")
    options = effective_options(implementation, {"backend": "blocked"} if name == "sparse" else {})
    (flops, formula), note = declared_flops(implementation, case, options)
    assert note == "" and formula
    q, k, v = (torch.randn(2, heads, 512, 32) for heads in (4, 2, 2))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        implementation.prepare(case, options)(q, k, v)
    ratio = counter.get_total_flops() / flops
    if name in ("performer", "nystrom") or (name == "axial" and not causal):
        assert ratio == pytest.approx(1.0, abs=0.03)
    else:
        assert 1.0 <= ratio <= 3.0


def test_a_training_step_counts_three_and_a_half_forwards(registry):
    implementation = registry.get("performer")
    options = effective_options(implementation, {})
    (forward, forward_formula), _ = declared_flops(implementation, small_case(), options)
    (step, step_formula), _ = declared_flops(implementation, small_case(mode="forward_backward"), options)
    assert step == 3.5 * forward and step_formula == f"({forward_formula}) × 3.5"
