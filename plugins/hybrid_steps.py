"""hybrid for fewer queries than keys (chunked prefill, a decode step): the same weights as the
square pass (exact exp(s) on the band, (1/m) φ(q)·φ(k) off it, one normaliser), computed from

- the "far" keys, before every query's band: only through their feature sums
  Σ φ(k)ᵀ[v, 1] (m × (D+1) per kv head, on one stabiliser), the state a decode step keeps;
- the "near" keys, from the band of the first query on: exact where on a query's band,
  estimated with their own features where off it (the later queries' oldest keys).

A decode step therefore reads window + q keys and a fixed-size state, whatever the cache holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnbench import Case

STATE_CHUNK = 4096  # far keys summed per pass: their (chunk × m) features stay small


@dataclass(frozen=True)
class FarSums:
    """Σ_far exp(x̃·ω − |x̃|²/2 − c) [v, 1] (B, KV, 1, m, D+1) and its stabiliser c (B, KV, 1, 1, 1)."""

    sums: torch.Tensor
    stabiliser: torch.Tensor


class FewQueries:
    """Hybrid attention of the last ``query_len`` positions over ``key_len`` keys."""

    def __init__(self, case: Case, window: int, projection: torch.Tensor) -> None:
        self.projection = projection  # (D, m), scaled by d^-¼
        self.groups = case.heads // case.kv_heads
        self.scale, self.half_norm_scale = case.head_dim**-0.5, 0.5 * case.head_dim**-0.5
        first = case.key_len - case.query_len
        self.far = max(0, first - window)  # keys [0, far) are off every query's band
        offset = torch.arange(first, case.key_len).unsqueeze(1) - torch.arange(self.far, case.key_len).unsqueeze(0)
        on_band = (offset <= window) & (offset >= (0 if case.causal else -window))
        estimated = ~on_band & (offset >= 0) if case.causal else ~on_band
        self.outside_band = (~on_band).to(case.device)  # (Q, K_near)
        self.estimated = estimated.to(case.device, torch.float32)

    def far_sums(self, k: torch.Tensor, v: torch.Tensor) -> FarSums:
        """The far keys' feature sums: k, v (B, KV, far, D), summed a chunk at a time with a
        running stabiliser (as FlashAttention rescales its running softmax)."""
        batch, kv_heads, _, dim = v.shape
        compute = _compute_dtype(k)
        sums = torch.zeros(batch, kv_heads, 1, self.projection.shape[1], dim + 1, dtype=compute, device=k.device)
        stabiliser = torch.full((batch, kv_heads, 1, 1, 1), float("-inf"), dtype=compute, device=k.device)
        for chunk_k, chunk_v in zip(k.split(STATE_CHUNK, dim=2), v.split(STATE_CHUNK, dim=2), strict=True):
            if not chunk_k.shape[2]:
                continue  # no far keys: the sums stay empty (zero, on a stabiliser of −inf)
            logits, half_norm = self._logits(chunk_k.to(compute).unsqueeze(2))
            new = torch.maximum(stabiliser, logits.detach().amax(dim=(-2, -1), keepdim=True))
            features = (logits - half_norm - new).exp_()
            values = _with_ones(chunk_v.to(compute)).unsqueeze(2)  # (B, KV, 1, chunk, D+1)
            sums = sums * torch.exp(stabiliser - new) + features.transpose(-1, -2) @ values
            stabiliser = new
        return FarSums(sums, stabiliser)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Chunked prefill: every key is given; the far ones enter through their sums."""
        return self.attend(q, k[:, :, self.far:], v[:, :, self.far:], self.far_sums(k[:, :, : self.far],
                                                                                    v[:, :, : self.far]))

    def attend(self, q: torch.Tensor, k_near: torch.Tensor, v_near: torch.Tensor, far: FarSums) -> torch.Tensor:
        """q (B, H, Q, D) over the near keys and values (B, KV, K_near, D) and the far sums."""
        batch, heads, rows, dim = q.shape
        compute = _compute_dtype(q)
        q = q.to(compute).view(batch, heads // self.groups, self.groups, rows, dim)
        k_near, v1 = k_near.to(compute).unsqueeze(2), _with_ones(v_near.to(compute)).unsqueeze(2)

        scores = (q * self.scale) @ k_near.transpose(-1, -2)  # (B, KV, G, Q, K_near)
        scores.masked_fill_(self.outside_band, float("-inf"))
        band_max = scores.detach().amax(dim=-1, keepdim=True)  # finite: a query's own key is on its band
        exact = scores.sub_(band_max).exp_() @ v1

        q_logits, q_half_norm = self._logits(q)
        query_max = q_logits.detach().amax(dim=-1, keepdim=True)  # stabilisers: constants, no gradient
        eq = (q_logits - q_half_norm - query_max).exp_()
        k_logits, k_half_norm = self._logits(k_near)
        stabiliser = torch.maximum(far.stabiliser, k_logits.detach().amax(dim=(-2, -1), keepdim=True))
        ek = (k_logits - k_half_norm - stabiliser).exp_()
        estimate = eq @ (far.sums * torch.exp(far.stabiliser - stabiliser))
        estimate += ((eq @ ek.transpose(-1, -2)) * self.estimated) @ v1

        # One normaliser: e_q·e_k ≈ m·exp(s − c_q − c_k); both parts to the larger of the scales.
        estimate_log_scale = query_max + stabiliser - math.log(self.projection.shape[1])
        common = torch.maximum(band_max, estimate_log_scale)
        total = exact * torch.exp(band_max - common) + estimate * torch.exp(estimate_log_scale - common)
        return (total[..., :-1] / total[..., -1:]).reshape(batch, heads, rows, dim)

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̃·ω, |x̃|²/2)."""
        return x @ self.projection.to(x.dtype), x.square().sum(dim=-1, keepdim=True) * self.half_norm_scale


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Features in float32 for float16 and bfloat16, whose range the exponentials would leave."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
