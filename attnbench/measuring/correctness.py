"""Compares an implementation's outputs (and gradients) with float64 references.

The harness judges, a plugin never does: the query rows (and, in training, the key rows for dk
and dv) are drawn by the harness and never shown to a worker; exact attention at those rows is
computed by the harness once per case (``CaseReferences``) from the inputs as they were made,
not as a call left them; an implementation's own reference, plugin code, is computed in a
process of its own that never times anything. More than one call is checked: the first, the
last timed call of every round (the timed calls alternate between two input sets) and a call
on fresh values written into the same tensors in every round, each round's values new.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import DEFAULT_TOLERANCES, Implementation, Tolerance, capped_tolerance
from attnbench.contract.inputs import Inputs
from attnbench.measuring.figures import Correctness, ErrorFigures
from attnbench.measuring.reference import (
    sample_rows,
    softmax_attention,
    softmax_attention_grads,
    softmax_attention_key_grads,
)
from attnbench.settings.suite import CorrectnessSettings

# Tensors compared: the output, and in training mode the input gradients.
Grads = Mapping[str, torch.Tensor]  # "dq", "dk", "dv" -> (B, heads, N, D)
Tensors = dict[str, torch.Tensor]


def output_problems(out: Any, grads: Grads | None, case: Case, device: str | None = None) -> list[str]:
    """Why the result cannot even be compared: wrong type, shape, dtype, device, or not finite
    (``device``: the kind of device the call returned it on, when the tensors were moved since)."""
    expected_shape = (case.batch, case.heads, case.query_len, case.head_dim)
    if not isinstance(out, torch.Tensor):
        return [f"output is a {type(out).__name__}, not a torch.Tensor"]
    problems = []
    if tuple(out.shape) != expected_shape:
        problems.append(f"output shape {tuple(out.shape)} (expected {expected_shape})")
    if out.dtype != case.dtype:
        problems.append(f"output dtype {out.dtype} (expected {case.dtype})")
    device = device or out.device.type
    if torch.device(device).type != torch.device(case.device).type:
        problems.append(f"output on {device} (expected {case.device})")
    tensors = {"output": out, **(grads or {})}
    for name, tensor in tensors.items():
        if tensor is None:
            problems.append(f"{name} is None (the input does not reach the output)")
        elif not all_finite(tensor):
            problems.append(f"{name} contains NaN or Inf")
    return problems


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: its least and greatest values (a NaN is both) are finite, one
    reduction instead of a boolean tensor as large as the output."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return bool(torch.isfinite(tensor).all())
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def changed_inputs(inputs: Inputs, pristine: Inputs) -> list[str]:
    """'the call changed its input v in place (4096 of 4096 values differ)' for each one it did
    (grad_out too: a custom backward receives it)."""
    problems = []
    for name in ("q", "k", "v", "grad_out"):
        if getattr(inputs, name) is None:
            continue
        now, then = getattr(inputs, name).detach(), getattr(pristine, name).detach()
        if now.shape != then.shape or now.dtype != then.dtype:
            problems.append(f"the call changed its input {name} in place (now {tuple(now.shape)} {now.dtype})")
            continue
        differ = int((now.cpu() != then.cpu()).sum())  # NaN != NaN: a NaN written in counts
        if differ:
            problems.append(f"the call changed its input {name} in place ({differ} of {now.numel()} values differ)")
    return problems


def write_into(inputs: Inputs, source: Inputs) -> None:
    """Put ``source``'s values into the tensors of ``inputs`` (same storage, so a cache keyed on the
    tensors' identity or address sees the same tensors with new values)."""
    with torch.no_grad():
        for name in ("q", "k", "v"):
            getattr(inputs, name).copy_(getattr(source, name))
        if inputs.grad_out is not None and source.grad_out is not None:
            inputs.grad_out.copy_(source.grad_out)


# The input sets of a case: the suite's seeded inputs, a second set the timed calls alternate
# with (a call cannot return the previous call's output), and one set of fresh values per round.
PRIMARY, ROTATION = "primary", "rotation"


def fresh_set(round_index: int) -> str:
    """The name of the fresh inputs of round ``round_index`` (0-based)."""
    return f"fresh{round_index + 1}"


def set_names(rounds: int) -> tuple[str, ...]:
    return (PRIMARY, ROTATION, *(fresh_set(index) for index in range(rounds)))


@dataclass(frozen=True)
class CaseReferences:
    """What every implementation of a case is checked against, computed once per case by the
    harness (never by a process that runs plugin code): the query rows (and key rows) checked,
    drawn at random and never shown to a plugin, the seed of each input set, and float64 exact
    attention of each set at those rows ("out", "dq"; "dk", "dv" of the primary set)."""

    rows: torch.Tensor
    rows_seed: int
    key_rows: torch.Tensor | None  # None: dk, dv compared at every row (all rows checked) or not at all
    key_pairs: tuple[tuple[int, int], ...]  # (batch, kv head) pairs at which dk, dv are compared
    seeds: Mapping[str, int]  # input set name -> its seed
    exact: Mapping[str, Tensors]  # input set name -> references
    notes: tuple[str, ...] = ()  # what could not be checked within the budget


def case_references(
    case: Case, settings: CorrectnessSettings, seeds: Mapping[str, int], draw: Callable[[int], Inputs]
) -> CaseReferences:
    """Draws the rows and computes exact attention of each input set (``draw(seed)``: the set's
    inputs on the CPU in the case's dtype) at them; dk, dv at key rows only for the primary set."""
    rows_seed = secrets.randbits(63)
    rows = sample_rows(case.query_len, settings.rows, rows_seed)
    key_rows, key_pairs, notes = None, (), []
    if case.backward and len(rows) < case.query_len:
        key_rows, key_pairs, note = _key_sample(case, settings, rows_seed)
        key_rows = key_rows if key_pairs else None
        if note:
            notes.append(note)
    exact = {name: _exact_references(draw(seed), case, rows, key_rows, key_pairs, with_key_grads=name == PRIMARY)
             for name, seed in seeds.items()}
    return CaseReferences(rows, rows_seed, key_rows, key_pairs, dict(seeds), exact, tuple(notes))


def _exact_references(inputs: Inputs, case: Case, rows: torch.Tensor, key_rows: torch.Tensor | None,
                      key_pairs: tuple[tuple[int, int], ...], with_key_grads: bool) -> Tensors:
    q, k, v = (tensor.detach().to("cpu", torch.float64) for tensor in (inputs.q, inputs.k, inputs.v))
    grad_out = inputs.grad_out.to("cpu", torch.float64) if inputs.grad_out is not None else None
    forward = softmax_attention(q, k, v, rows, case.causal)
    exact: Tensors = {"out": forward.out}
    if grad_out is not None:
        grads = softmax_attention_grads(q, k, v, grad_out, rows, case.causal, forward)
        exact["dq"] = grads.dq
        if grads.dk is not None:
            exact.update(dk=grads.dk, dv=grads.dv)
        elif with_key_grads and key_rows is not None:
            exact.update(_key_grads(q, k, v, grad_out, key_rows, key_pairs, case.causal))
    return exact


def own_references(
    implementation: Implementation, case: Case, options: Mapping[str, Any], sets: Mapping[str, Inputs],
    rows: torch.Tensor,
) -> dict[str, Tensors | None]:
    """The implementation's own float64 reference of each input set at ``rows`` (plugin code: run
    where plugin code runs, never in the harness)."""
    found: dict[str, Tensors | None] = {}
    for name, inputs in sets.items():
        q, k, v = (tensor.detach().to("cpu", torch.float64) for tensor in (inputs.q, inputs.k, inputs.v))
        grad_out = inputs.grad_out.to("cpu", torch.float64) if inputs.grad_out is not None else None
        found[name] = _own_reference(implementation, case, options, q, k, v, grad_out, rows)
    return found


def has_own_reference(implementation: Implementation) -> bool:
    return type(implementation).reference is not Implementation.reference


@dataclass(frozen=True)
class Verifier:
    """Checks any call of one point cheaply: the case's references, the implementation's own
    (None when it has none), and how it is judged."""

    references: CaseReferences
    own: Mapping[str, Tensors | None] | None
    judged_against: str | None  # "own", "exact" or None (an approximation: error reported only)
    tolerance: Tolerance
    default_tolerance: Tolerance

    @property
    def rows(self) -> torch.Tensor:
        return self.references.rows

    def check(self, out: torch.Tensor, grads: Grads | None, input_set: str, label: str) -> Correctness:
        """The figures of one call on ``input_set``, judged as every call of the point is."""
        references = self.references
        actual = self._at_rows(out, grads)
        judged_tolerance = self.tolerance if self.judged_against == "exact" else None
        exact = _figures(actual, references.exact[input_set], judged_tolerance)
        own_expected = self.own.get(input_set) if self.own is not None else None
        own = _figures(actual, own_expected, self.tolerance) if own_expected is not None else None
        judged = own if self.judged_against == "own" else exact if self.judged_against == "exact" else {}
        what = "its own float64 reference" if self.judged_against == "own" else "float64 softmax attention"
        tolerance = self.tolerance
        failures = tuple(
            f"{name} vs {what} ({label}): max abs error {figures.max_abs:.3g} > {figures.bound:.3g} "
            f"(tolerance atol={tolerance.atol:g}, rtol={tolerance.rtol:g} of max |ref|)"
            for name, figures in (judged or {}).items()
            if not figures.passed
        )
        if self.judged_against == "own" and own is None:
            failures += (f"its own float64 reference gave nothing for this call ({label}): it cannot be judged",)
        within_default = None
        if self.judged_against == "exact":
            defaults = _figures(actual, references.exact[input_set], self.default_tolerance)
            within_default = all(figures.passed for figures in defaults.values())
        key_rows = references.key_rows
        return Correctness(
            rows_checked=len(references.rows), exact=exact, own=own, judged_against=self.judged_against,
            failures=failures, rows_seed=references.rows_seed,
            key_rows_checked=0 if "dk" not in exact else len(key_rows if key_rows is not None else references.rows),
            fresh_seed=references.seeds.get(fresh_set(0)), calls_checked=1, tolerance=(tolerance.atol, tolerance.rtol),
            within_default_tolerance=within_default,
        )

    def _at_rows(self, out: torch.Tensor, grads: Grads | None) -> Tensors:
        """The call's tensors at the checked rows, in float64 on the CPU."""
        references = self.references
        rows = references.rows.to(out.device)
        actual = {"out": out.detach()[:, :, rows]}
        if grads is not None:
            actual["dq"] = grads["dq"][:, :, rows]
            if references.key_rows is None and len(references.rows) == out.shape[2]:
                actual.update(dk=grads["dk"], dv=grads["dv"])
            elif references.key_rows is not None:
                key_rows = references.key_rows.to(out.device)
                for name in ("dk", "dv"):
                    actual[name] = torch.stack([grads[name][b, g, key_rows] for b, g in references.key_pairs])
        return {name: tensor.detach().to("cpu", torch.float64) for name, tensor in actual.items()}


def verifier_for(
    references: CaseReferences, own: Mapping[str, Tensors | None] | None, exact: bool, declared: Tolerance,
    dtype: torch.dtype,
) -> tuple[Verifier, list[str]]:
    """How one point is judged: against exact attention when it claims to be exact (whatever
    reference of its own it gives: exact attention is the reference); an approximation against its
    own reference where it gives one (for every input set: None for only some of them is a
    failure, "cannot be judged"), else not at all (its error is only reported); at its declared
    tolerance, capped (a note says when it was over the cap)."""
    tolerance, capped = capped_tolerance(declared, dtype)
    if exact or own is None or all(tensors is None for tensors in own.values()):
        own = None  # None for every set: no reference of its own for this case (the contract's None)
    judged_against = "exact" if exact else "own" if own is not None else None
    return Verifier(references, own, judged_against, tolerance, DEFAULT_TOLERANCES[dtype]), [capped] if capped else []


def _key_sample(
    case: Case, settings: CorrectnessSettings, seed: int
) -> tuple[torch.Tensor, tuple[tuple[int, int], ...], str]:
    """Key rows and the (batch, kv head) pairs whose dk, dv fit the reference budget."""
    generator = torch.Generator().manual_seed(seed ^ 0x5EED)
    key_rows = sample_rows(case.key_len, settings.rows, int(torch.randint(2**62, (1,), generator=generator)))
    groups = case.heads // case.kv_heads
    # A float64 forward pass over every query row of one kv head's group, plus the key-row part.
    per_pair = 2.0 * groups * case.query_len * case.head_dim * (2 * case.key_len + 3 * len(key_rows))
    pairs = case.batch * case.kv_heads
    affordable = min(pairs, int(settings.max_reference_gflop * 1e9 // per_pair))
    if affordable == 0:
        return key_rows, (), (f"dk, dv not checked: their float64 reference needs every query row "
                              f"({per_pair / 1e9:.0f} GFLOP for one kv head, over the budget of "
                              f"measure.correctness.max_reference_gflop={settings.max_reference_gflop:g})")
    order = torch.randperm(pairs, generator=generator)[:affordable].sort().values
    chosen = tuple((int(index) // case.kv_heads, int(index) % case.kv_heads) for index in order)
    note = "" if affordable == pairs else (f"dk, dv checked on {affordable} of {pairs} (batch, kv head) pairs, "
                                           f"drawn at random, within measure.correctness.max_reference_gflop")
    return key_rows, chosen, note


def _key_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, key_rows: torch.Tensor,
    pairs: tuple[tuple[int, int], ...], causal: bool,
) -> Tensors:
    """dk, dv at the key rows for each (batch, kv head) pair: (pairs, S, D) each."""
    groups = q.shape[1] // k.shape[1]
    dks, dvs = [], []
    for b, g in pairs:
        heads = slice(g * groups, (g + 1) * groups)
        dk, dv = softmax_attention_key_grads(q[b:b + 1, heads], k[b:b + 1, g:g + 1], v[b:b + 1, g:g + 1],
                                             grad_out[b:b + 1, heads], key_rows, causal)
        dks.append(dk[0, 0])
        dvs.append(dv[0, 0])
    return {"dk": torch.stack(dks), "dv": torch.stack(dvs)}


def _own_reference(
    implementation: Implementation,
    case: Case,
    options: Mapping[str, Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor | None,
    rows: torch.Tensor,
) -> Tensors | None:
    """The implementation's own float64 reference; in training mode, with its gradients by autograd.

    Gradients only when every row is checked: an approximation may mix query rows (Nyström's
    landmarks average them), so its dq at one row depends on the upstream gradient of all rows.
    """
    with_grads = grad_out is not None and len(rows) == case.query_len
    leaves = [tensor.detach().requires_grad_(with_grads) for tensor in (q, k, v)]
    with torch.set_grad_enabled(with_grads):
        out = implementation.reference(*leaves, case, options, rows)
    if out is None:
        return None
    own = {"out": out.detach()}
    if with_grads:
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        own.update(dq=dq, dk=dk, dv=dv)
    return own


def _figures(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | None], tolerance: Tolerance | None
) -> dict[str, ErrorFigures]:
    figures = {}
    for name, reference in expected.items():
        if reference is None or name not in actual:
            continue
        difference = actual[name] - reference
        reference_max = float(reference.abs().max())
        cosines = _row_cosines(actual[name], reference)
        figures[name] = ErrorFigures(
            max_abs=float(difference.abs().max()),
            rel_fro=float(difference.norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny)),
            bound=tolerance.bound(reference_max) if tolerance is not None else None,
            cosine_mean=float(cosines.mean()),
            cosine_worst=float(cosines.min()),
        )
    return figures


def _row_cosines(actual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row (last dimension); two zero rows agree (1), one zero row
    against a non-zero one does not (0)."""
    tiny = torch.finfo(torch.float64).tiny
    dot = (actual * reference).sum(-1)
    actual_norm, reference_norm = actual.norm(dim=-1), reference.norm(dim=-1)
    both_zero = (actual_norm == 0) & (reference_norm == 0)
    return torch.where(both_zero, torch.ones_like(dot), dot / (actual_norm * reference_norm).clamp_min(tiny))

