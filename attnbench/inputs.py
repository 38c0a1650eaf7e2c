"""Seeded attention inputs: every implementation sees the same tensors for a case.

Two distributions (the suite's ``inputs`` axis):

- ``gaussian``: q, k, v i.i.d. N(0, 1). Attention logits q·k/√d have standard deviation 1:
  attention is spread thin over many keys, with no structure to exploit.
- ``structured``: attention with strong local and some global mass, as trained language models
  show. q and k share a smooth positional code, so each query's largest logits (about 8) fall
  on keys within a few dozen positions; 16 evenly spaced "hub" keys carry a direction every
  query shares (logit about 8); the rest is background (logits with standard deviation about 1).
  Measured with a ±256 window: at N=4096, 71% of the attention mass is inside the window, 25% on
  hubs outside it, 4% elsewhere; at N=16384, 48% / 35% / 17%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnbench.case import Case

LOCAL_LOGIT = 8.0  # a query's logit on its own position
HUB_LOGIT = 8.0  # every query's logit on each hub key
HUBS = 16
CORRELATION_LENGTH = 32  # positions over which the positional code stays similar
NOISE = 0.25  # per-component noise on q and k, in units of d^¼


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor  # (B, KV, N, D)
    v: torch.Tensor  # (B, KV, N, D)
    grad_out: torch.Tensor | None  # (B, H, N, D), the upstream gradient in training mode


def make_inputs(case: Case, seed: int) -> Inputs:
    """Drawn in float32 on the CPU (values independent of the device's generator), then cast.

    The float64 reference is computed from the cast values, so rounding the inputs to a
    low-precision dtype is not counted as the implementation's error.
    """
    generator = torch.Generator().manual_seed(seed)
    if case.inputs == "structured":
        q, k, v = _structured(case, generator)
    else:
        q, k, v = (_normal(case, heads, generator) for heads in (case.heads, case.kv_heads, case.kv_heads))
    grad_out = _normal(case, case.heads, generator) if case.backward else None
    q, k, v = (t.to(device=case.device, dtype=case.dtype) for t in (q, k, v))
    if grad_out is not None:
        grad_out = grad_out.to(device=case.device, dtype=case.dtype)
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return Inputs(q, k, v, grad_out)


def _normal(case: Case, heads: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((case.batch, heads, case.seq_len, case.head_dim), generator=generator)


def _structured(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, groups, seq_len, dim = case.batch, case.heads // case.kv_heads, case.seq_len, case.head_dim
    root = dim**0.25  # q·k/√d = (a·b) when q = a·d^¼·x and k = b·d^¼·y with x·y = 1
    position = _smooth_unit_codes(case, generator)  # (B, KV, N, D): p_i·p_j ≈ exp(−(i−j)²/4ℓ²)
    hub_direction = F.normalize(torch.randn((batch, case.kv_heads, 1, dim), generator=generator), dim=-1)
    is_hub = (torch.arange(seq_len) % max(1, seq_len // HUBS) == 0).to(torch.float32).view(1, 1, seq_len, 1)
    hub_share = math.sqrt(HUB_LOGIT)
    k = root * (math.sqrt(LOCAL_LOGIT) * position + hub_share * is_hub * hub_direction)
    q = root * (math.sqrt(LOCAL_LOGIT) * position + hub_share * hub_direction)
    q = q.repeat_interleave(groups, dim=1)  # the query heads of a group share their kv head's code
    q = q + NOISE * root * torch.randn(q.shape, generator=generator)
    k = k + NOISE * root * torch.randn(k.shape, generator=generator)
    v = torch.randn((batch, case.kv_heads, seq_len, dim), generator=generator)
    return q, k, v


def _smooth_unit_codes(case: Case, generator: torch.Generator) -> torch.Tensor:
    """White noise smoothed along the sequence by a Gaussian of width ℓ, rows scaled to unit norm."""
    noise = torch.randn((case.batch * case.kv_heads * case.head_dim, 1, case.seq_len), generator=generator)
    offsets = torch.arange(-3 * CORRELATION_LENGTH, 3 * CORRELATION_LENGTH + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / CORRELATION_LENGTH) ** 2).view(1, 1, -1)
    smooth = F.conv1d(noise, kernel, padding=kernel.shape[-1] // 2)  # (B·KV·D, 1, N)
    smooth = smooth.view(case.batch, case.kv_heads, case.head_dim, case.seq_len).transpose(-1, -2)
    return F.normalize(smooth, dim=-1)
