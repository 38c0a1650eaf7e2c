"""Seeded attention inputs: every implementation sees the same tensors for a case.

The values come from the case's input source (attnbench.contract.inputs); here they are drawn
from the seed, given an upstream gradient in training mode, cast and moved to the device.
"""

from __future__ import annotations

import dataclasses

import torch

from attnbench.contract.case import Case
from attnbench.contract.errors import NotSupported
from attnbench.contract.inputs import BUILTIN_SOURCES, Inputs, InputSource, source_reasons


def make_inputs(case: Case, seed: int, source: InputSource | None = None, device: str | None = None) -> Inputs:
    """Drawn in float32 on the CPU (values independent of the device's generator), then cast.

    ``source``: the case's input source (default: the built-in one of that name); a case it
    cannot give raises NotSupported with its reasons (the point is ``unsupported``); ``device``:
    where they go (default: the case's). The float64 reference is computed from the cast values,
    so rounding the inputs to a low-precision dtype is not counted as the implementation's error.
    """
    source = source if source is not None else BUILTIN_SOURCES[case.inputs]
    drawn = every_position(case)
    reasons = source_reasons(source, drawn)
    if reasons:
        raise NotSupported("; ".join(reasons))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = source.draw(drawn, generator)
    q = q[:, :, case.key_len - case.query_len:]  # the last positions are the queries
    grad_out = torch.randn((case.batch, case.heads, case.query_len, case.head_dim), generator=generator) \
        if case.backward else None
    cast = Inputs(*(t.to(dtype=case.dtype).contiguous() for t in (q, k, v)),
                  grad_out.to(dtype=case.dtype) if grad_out is not None else None)
    return on_device(cast, case, device or case.device)


def on_device(inputs: Inputs, case: Case, device: str | None = None) -> Inputs:
    """The inputs as a call receives them: on ``device`` (default: the case's), contiguous (as
    activations are: fused kernels refuse a strided last dimension), q, k and v requiring
    gradients in training mode."""
    device = device or case.device
    q, k, v = (t.detach().to(device=device).contiguous() for t in (inputs.q, inputs.k, inputs.v))
    grad_out = inputs.grad_out.detach().to(device=device) if inputs.grad_out is not None else None
    if case.backward:
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return Inputs(q, k, v, grad_out)


def draw_set(case: Case, seed: int, source: InputSource | None, primary: Inputs | None) -> Inputs:
    """One input set of the case on the CPU: the primary set (``primary`` None), or another that
    shares the primary's decode cache (only the new tokens differ: the cache is built once)."""
    drawn = make_inputs(case, seed, source, device="cpu")
    return drawn if primary is None else with_cache_of(drawn, primary, case)


def every_position(case: Case) -> Case:
    """The square case a source draws from: every one of the case's key positions (a decode
    step's new tokens included); the queries are then the last ``query_len`` of them."""
    if case.query_len == case.key_len:
        return case
    return dataclasses.replace(case, seq_len=case.key_len, q_len=None, mode="forward")


def decode_cache(inputs: Inputs, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values already in a decode step's cache (its first seq_len positions), as
    tensors of their own."""
    return tuple(t.detach()[:, :, : case.seq_len].clone() for t in (inputs.k, inputs.v))  # type: ignore[return-value]


def decode_step_inputs(inputs: Inputs, case: Case) -> Inputs:
    """What a decode step is called with: the new tokens' q, k and v (the last q_len positions),
    as tensors of their own."""
    new = slice(case.seq_len, case.key_len)
    return Inputs(inputs.q, inputs.k[:, :, new].clone(), inputs.v[:, :, new].clone(), None)


def with_cache_of(fresh: Inputs, primary: Inputs, case: Case) -> Inputs:
    """Fresh new tokens on the primary inputs' cache: a decode step's cache is built once, so a
    call on fresh values changes only what the step is called with."""
    if not case.decode:
        return fresh
    k, v = (torch.cat([old[:, :, : case.seq_len], new[:, :, case.seq_len:]], dim=2)
            for old, new in ((primary.k, fresh.k), (primary.v, fresh.v)))
    return Inputs(fresh.q, k, v, fresh.grad_out)
