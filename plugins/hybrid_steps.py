"""hybrid's band of exact pairs, and hybrid for fewer queries than keys (chunked prefill, a
decode step): the same weights as the square pass (exact exp(s) on the band, (1/m) φ(q)·φ(k)
off it, one normaliser), computed from

- the "far" keys, before every query's band: only through their feature sums
  Σ φ(k)ᵀ[v, 1] (m × (D+1) per kv head, on one stabiliser), the state a decode step keeps;
- the "near" keys, from the band of the first query on: exact where on a query's band,
  estimated with their own features where off it (the later queries' oldest keys).

A decode step therefore reads its window's blocks, q keys and a fixed-size state, whatever the
cache holds; it keeps the near keys' projections too, so a step projects only its own new keys.
Each kv head's G query heads are folded into G·q rows, so nothing is broadcast (copied) over
the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from attnbench_plugins.performer import with_ones
from attnbench_plugins.precision import compute_dtype

from attnbench import Case

STATE_CHUNK = 4096  # far keys summed per pass: their (chunk × m) features stay small


def block_and_reach(key_len: int, window: int, block_size: int) -> tuple[int, int]:
    """(b, r): positions fall in blocks of b = min(block_size, keys), and the exact window spans
    r = ⌈window / b⌉ blocks on each side of a query's own, so it covers at least ±window."""
    block = min(block_size, key_len)
    return block, math.ceil(window / block)


def on_band(queries: torch.Tensor, keys: torch.Tensor, block: int, reach: int, causal: bool) -> torch.Tensor:
    """Which (query, key) position pairs (broadcast against each other) get exact weights: keys
    whose block is within ``reach`` blocks of the query's; causal: its own block or the ``reach``
    before it, and never a later key."""
    apart = torch.div(queries, block, rounding_mode="floor") - torch.div(keys, block, rounding_mode="floor")
    if causal:
        return (apart >= 0) & (apart <= reach) & (keys <= queries)
    return apart.abs() <= reach


def band_pairs(key_len: int, block: int, reach: int, causal: bool) -> int:
    """The number of exact pairs of a square pass over ``key_len`` positions (without an N × N mask)."""
    positions = torch.arange(key_len)
    own = positions // block
    first = ((own - reach) * block).clamp(min=0)
    last = positions + 1 if causal else ((own + reach + 1) * block).clamp(max=key_len)
    return int((last - first).sum())


@dataclass(frozen=True)
class FarSums:
    """Σ_far exp(x̃·ω − |x̃|²/2 − c) [v, 1] (B, KV, m, D+1) and its stabiliser c (B, KV, 1, 1)."""

    sums: torch.Tensor
    stabiliser: torch.Tensor


@dataclass(frozen=True)
class Projected:
    """Keys' x̃·ω (B, KV, K, m) and |x̃|²/2 (B, KV, K, 1)."""

    logits: torch.Tensor
    half_norm: torch.Tensor


class FewQueries:
    """Hybrid attention of the last ``query_len`` positions over ``key_len`` keys."""

    def __init__(self, case: Case, window: int, block_size: int, projection: torch.Tensor) -> None:
        self.projection = projection  # (D, m), scaled by d^-¼
        self.groups = case.heads // case.kv_heads
        self.scale, self.half_norm_scale = case.head_dim**-0.5, 0.5 * case.head_dim**-0.5
        first = case.key_len - case.query_len
        block, reach = block_and_reach(case.key_len, window, block_size)
        self.far = max(0, (first // block - reach) * block)  # keys [0, far) are off every query's band
        queries, keys = torch.arange(first, case.key_len).unsqueeze(1), torch.arange(self.far, case.key_len)
        band = on_band(queries, keys, block, reach, case.causal)
        estimated = ~band & (keys <= queries) if case.causal else ~band
        self.on_band = band  # (Q, K_near)
        # Per folded row (query head g of the group, then query i): (G·Q, K_near).
        self.outside_band = (~band).repeat(self.groups, 1).to(case.device)
        self.estimated = estimated.repeat(self.groups, 1).to(case.device, torch.float32)

    def project(self, x: torch.Tensor) -> Projected:
        """x (B, KV, K, D) in the compute dtype."""
        return Projected(x @ self.projection.to(x.dtype), x.square().sum(dim=-1, keepdim=True) * self.half_norm_scale)

    def far_sums(self, k: torch.Tensor, v: torch.Tensor) -> FarSums:
        """The far keys' feature sums: k, v (B, KV, far, D), summed a chunk at a time with a
        running stabiliser (as FlashAttention rescales its running softmax)."""
        batch, kv_heads, _, dim = v.shape
        compute = compute_dtype(k)
        sums = torch.zeros(batch, kv_heads, self.projection.shape[1], dim + 1, dtype=compute, device=k.device)
        stabiliser = torch.full((batch, kv_heads, 1, 1), float("-inf"), dtype=compute, device=k.device)
        for chunk_k, chunk_v in zip(k.split(STATE_CHUNK, dim=2), v.split(STATE_CHUNK, dim=2), strict=True):
            if not chunk_k.shape[2]:
                continue  # no far keys: the sums stay empty (zero, on a stabiliser of −inf)
            keys = self.project(chunk_k.to(compute))
            new = torch.maximum(stabiliser, keys.logits.detach().amax(dim=(-2, -1), keepdim=True))
            features = (keys.logits - keys.half_norm - new).exp_()
            sums = sums * torch.exp(stabiliser - new) + features.transpose(-1, -2) @ with_ones(chunk_v.to(compute))
            stabiliser = new
        return FarSums(sums, stabiliser)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Chunked prefill: every key is given; the far ones enter through their sums."""
        far = self.far_sums(k[:, :, : self.far], v[:, :, : self.far])
        near_k = k[:, :, self.far:].to(compute_dtype(k))
        return self.attend(q, near_k, with_ones(v[:, :, self.far:].to(compute_dtype(v))), self.project(near_k), far)

    def attend(self, q: torch.Tensor, k_near: torch.Tensor, v1_near: torch.Tensor, keys: Projected,
               far: FarSums) -> torch.Tensor:
        """q (B, H, Q, D) over the near keys (B, KV, K_near, D) in the compute dtype, their [v, 1]
        (B, KV, K_near, D+1) and projections, and the far sums."""
        batch, heads, rows, dim = q.shape
        q = q.to(compute_dtype(q)).reshape(batch, heads // self.groups, self.groups * rows, dim)  # (B, KV, G·Q, D)

        scores = (q * self.scale) @ k_near.transpose(-1, -2)  # (B, KV, G·Q, K_near)
        scores.masked_fill_(self.outside_band, float("-inf"))
        band_max = scores.detach().amax(dim=-1, keepdim=True)  # finite: a query's own key is on its band
        exact = scores.sub_(band_max).exp_() @ v1_near

        queries = self.project(q)
        query_max = queries.logits.detach().amax(dim=-1, keepdim=True)  # stabilisers: constants, no gradient
        eq = (queries.logits - queries.half_norm - query_max).exp_()
        stabiliser = torch.maximum(far.stabiliser, keys.logits.detach().amax(dim=(-2, -1), keepdim=True))
        ek = (keys.logits - keys.half_norm - stabiliser).exp_()
        estimate = eq @ (far.sums * torch.exp(far.stabiliser - stabiliser))
        estimate = estimate + ((eq @ ek.transpose(-1, -2)) * self.estimated) @ v1_near

        # One normaliser: e_q·e_k ≈ m·exp(s − c_q − c_k); both parts to the larger of the scales.
        estimate_log_scale = query_max + stabiliser - math.log(self.projection.shape[1])
        common = torch.maximum(band_max, estimate_log_scale)
        total = exact * torch.exp(band_max - common) + estimate * torch.exp(estimate_log_scale - common)
        return (total[..., :-1] / total[..., -1:]).reshape(batch, heads, rows, dim)

