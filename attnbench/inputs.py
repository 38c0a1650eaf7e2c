"""Seeded attention inputs: every implementation sees the same tensors for a case."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbench.case import Case


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor  # (B, KV, N, D)
    v: torch.Tensor  # (B, KV, N, D)
    grad_out: torch.Tensor | None  # (B, H, N, D), the upstream gradient in training mode


def make_inputs(case: Case, seed: int) -> Inputs:
    """Standard normal q, k, v (and grad_out in training mode), drawn in float32 on the CPU.

    Drawn on the CPU so the values do not depend on the device's random generator, then
    cast: the float64 reference is computed from these cast values, so rounding the inputs
    to a low-precision dtype is not counted as the implementation's error.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(heads: int) -> torch.Tensor:
        shape = (case.batch, heads, case.seq_len, case.head_dim)
        return torch.randn(shape, generator=generator).to(device=case.device, dtype=case.dtype)

    q, k, v = normal(case.heads), normal(case.kv_heads), normal(case.kv_heads)
    grad_out = normal(case.heads) if case.backward else None
    if case.backward:
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return Inputs(q, k, v, grad_out)
