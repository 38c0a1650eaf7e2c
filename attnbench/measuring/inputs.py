"""Seeded attention inputs: every implementation sees the same tensors for a case.

Two distributions (the suite's ``inputs`` axis):

- ``gaussian``: q, k, v i.i.d. N(0, 1). Attention logits q·k/√d have standard deviation 1:
  attention is spread thin over many keys, with no structure to exploit.
- ``structured``: strong local and some global attention mass, as trained language models show.
  q and k share a smooth positional code, so each query's largest logits (about 5) fall on
  keys within a few dozen positions; on top, every query shares one direction that keys carry
  with a weight varying smoothly along the sequence (a field with standard deviation 1 in
  logits, correlated over N/16 positions), so some regions draw attention from everywhere.
  The local mass stays fixed while the global field's grows with N: inside a ±256 window lie
  86% of the attention mass at N=1024, 54% at 4096, 24% at 16384 (tests/test_inputs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnbench.contract.case import Case

LOCAL_LOGIT = 5.0  # a query's logit on its own position
GLOBAL_LOGIT = 1.0  # the standard deviation, in logits, of the keys' shared global field
LOCAL_LENGTH = 32  # positions over which the positional code stays similar
REGIONS = 16  # the global field varies over N / REGIONS positions


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
    # Contiguous, as activations are: fused kernels refuse a strided last dimension.
    q, k, v = (t.to(device=case.device, dtype=case.dtype).contiguous() for t in (q, k, v))
    if grad_out is not None:
        grad_out = grad_out.to(device=case.device, dtype=case.dtype)
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return Inputs(q, k, v, grad_out)


def _normal(case: Case, heads: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((case.batch, heads, case.seq_len, case.head_dim), generator=generator)


def _structured(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kv_heads, seq_len, dim = case.batch, case.kv_heads, case.seq_len, case.head_dim
    root = dim**0.25  # q·k/√d = a·b·(x·y) for q = a·d^¼·x and k = b·d^¼·y
    position = _smooth((batch * kv_heads * dim, seq_len), LOCAL_LENGTH, generator)
    position = F.normalize(position.view(batch, kv_heads, dim, seq_len).transpose(-1, -2), dim=-1)  # (B, KV, N, D)
    field = _smooth((batch * kv_heads, seq_len), max(1, seq_len // REGIONS), generator)
    field = (field / field.std(dim=-1, keepdim=True)).view(batch, kv_heads, seq_len, 1)  # std 1 along N
    shared = F.normalize(torch.randn((batch, kv_heads, 1, dim), generator=generator), dim=-1)
    local, glob = math.sqrt(LOCAL_LOGIT), math.sqrt(GLOBAL_LOGIT)
    q = root * (local * position + glob * shared)
    k = root * (local * position + glob * field * shared)
    q = q.repeat_interleave(case.heads // kv_heads, dim=1)  # the query heads of a group share its code
    v = torch.randn((batch, kv_heads, seq_len, dim), generator=generator)
    return q, k, v


def _smooth(shape: tuple[int, int], length: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, N) white noise smoothed along N by a Gaussian of width ``length``."""
    noise = torch.randn((shape[0], 1, shape[1]), generator=generator)
    offsets = torch.arange(-3 * length, 3 * length + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / length) ** 2).view(1, 1, -1)
    return F.conv1d(noise, kernel, padding=kernel.shape[-1] // 2).view(shape)
