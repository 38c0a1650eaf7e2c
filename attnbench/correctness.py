"""Compares an implementation's output (and gradients) with float64 references."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnbench.case import Case
from attnbench.implementation import Implementation, Tolerance
from attnbench.inputs import Inputs
from attnbench.reference import sample_rows, softmax_attention, softmax_attention_grads
from attnbench.results import Correctness, ErrorFigures
from attnbench.suite import CorrectnessSettings

# Tensors compared: the output, and in training mode the input gradients.
Grads = Mapping[str, torch.Tensor]  # "dq", "dk", "dv" -> (B, heads, N, D)


def output_problems(out: Any, grads: Grads | None, case: Case) -> list[str]:
    """Why the result cannot even be compared: wrong type, shape, dtype, device, or not finite."""
    expected_shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    if not isinstance(out, torch.Tensor):
        return [f"output is a {type(out).__name__}, not a torch.Tensor"]
    problems = []
    if tuple(out.shape) != expected_shape:
        problems.append(f"output shape {tuple(out.shape)} (expected {expected_shape})")
    if out.dtype != case.dtype:
        problems.append(f"output dtype {out.dtype} (expected {case.dtype})")
    if out.device.type != torch.device(case.device).type:
        problems.append(f"output on {out.device} (expected {case.device})")
    tensors = {"output": out, **(grads or {})}
    for name, tensor in tensors.items():
        if tensor is None:
            problems.append(f"{name} is None (the input does not reach the output)")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name} contains NaN or Inf")
    return problems


def check_correctness(
    implementation: Implementation,
    case: Case,
    options: Mapping[str, Any],
    inputs: Inputs,
    out: torch.Tensor,
    grads: Grads | None,
    settings: CorrectnessSettings,
    seed: int,
) -> Correctness:
    rows = sample_rows(case.seq_len, settings.rows, seed)
    all_rows = len(rows) == case.seq_len
    q, k, v = (tensor.detach().to("cpu", torch.float64) for tensor in (inputs.q, inputs.k, inputs.v))
    grad_out = inputs.grad_out.to("cpu", torch.float64) if inputs.grad_out is not None else None
    actual = _at_rows(out, grads, rows, all_rows)

    exact_forward = softmax_attention(q, k, v, rows, case.causal)
    expected = {"out": exact_forward.out}
    if grad_out is not None:
        exact_grads = softmax_attention_grads(q, k, v, grad_out, rows, case.causal, exact_forward)
        expected.update(dq=exact_grads.dq, dk=exact_grads.dk, dv=exact_grads.dv)

    own = _own_reference(implementation, case, options, q, k, v, grad_out, rows, all_rows)
    judged_against = "own" if own is not None else "exact" if implementation.exact else None
    tolerance = implementation.tolerance(case.dtype)
    exact_figures = _figures(actual, expected, tolerance if judged_against == "exact" else None)
    own_figures = _figures(actual, own, tolerance) if own is not None else None

    judged = own_figures if judged_against == "own" else exact_figures if judged_against == "exact" else {}
    what = "its own float64 reference" if judged_against == "own" else "float64 softmax attention"
    failures = tuple(
        f"{name} vs {what}: max abs error {figures.max_abs:.3g} > {figures.bound:.3g} "
        f"({case.dtype_name} tolerance atol={tolerance.atol:g}, rtol={tolerance.rtol:g} of max |ref|)"
        for name, figures in judged.items()
        if not figures.passed
    )
    return Correctness(
        rows_checked=len(rows),
        exact=exact_figures,
        own=own_figures,
        judged_against=judged_against,
        failures=failures,
    )


def _at_rows(out: torch.Tensor, grads: Grads | None, rows: torch.Tensor, all_rows: bool) -> dict[str, torch.Tensor]:
    """The implementation's tensors at the checked rows, in float64 on the CPU."""
    actual = {"out": out.detach()[:, :, rows.to(out.device)]}
    if grads is not None:
        actual["dq"] = grads["dq"][:, :, rows.to(out.device)]
        if all_rows:
            actual.update(dk=grads["dk"], dv=grads["dv"])
    return {name: tensor.to("cpu", torch.float64) for name, tensor in actual.items()}


def _own_reference(
    implementation: Implementation,
    case: Case,
    options: Mapping[str, Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor | None,
    rows: torch.Tensor,
    all_rows: bool,
) -> dict[str, torch.Tensor] | None:
    """The implementation's own float64 reference; in training mode, with its gradients by autograd.

    Gradients only when every row is checked: an approximation may mix query rows (Nyström's
    landmarks average them), so its dq at one row depends on the upstream gradient of all rows.
    """
    if type(implementation).reference is Implementation.reference:
        return None
    with_grads = grad_out is not None and all_rows
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
        figures[name] = ErrorFigures(
            max_abs=float(difference.abs().max()),
            rel_fro=float(difference.norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny)),
            bound=tolerance.bound(reference_max) if tolerance is not None else None,
        )
    return figures
