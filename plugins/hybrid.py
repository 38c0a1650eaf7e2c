"""hybrid: sparse + low-rank, as in Scatterbrain (Chen et al., "Scatterbrain: Unifying Sparse and
Low-rank Attention Approximation", NeurIPS 2021).

Exact softmax weights on a sliding window (±window; causal: the window looks back) and a FAVOR+
random-feature estimate (Choromanski et al., 2021) of the weights everywhere else, under one
normaliser. Scatterbrain writes it as low-rank + a sparse correction that replaces the
estimate on the band by the exact value, so no pair is counted twice; computed directly:

    out_i = [Σ_{j in band} exp(s_ij) [v_j, 1] + (1/m) Σ_{j not in band} φ(q_i)·φ(k_j) [v_j, 1]]  →  num / den

with φ the positive random features of the performer plugin (no epsilon: both parts are sums
of positive terms, so the denominator cannot vanish). Blocks of ``block`` queries meet their
window's key blocks, as the sparse plugin's blocked path does; the estimate's sum over keys
outside a block's window is a prefix (and, unless causal, suffix) sum of per-block
φ(K)ᵀ[V, 1] states. Time and memory O(N·(window + m)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import attnbench
from attnbench import AttentionFn, Case
from attnbench_plugins.performer import random_projection


class HybridAttention(attnbench.Implementation):
    name = "hybrid"
    description = "Scatterbrain: exact sliding window + random-feature estimate of the rest, one softmax"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    default_options = {"window": 256, "features": 256, "seed": 0, "block_size": 128}

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        problems = {}
        for key, minimum in (("window", 0), ("features", 1), ("block_size", 16)):
            if options[key] < minimum:
                problems[key] = f"must be at least {minimum}, got {options[key]}"
        return problems

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        projection = _projection(case, options).to(case.device)  # (D, m), scaled by d^-¼
        features = projection.shape[1]
        window, causal, groups = options["window"], case.causal, case.heads // case.kv_heads
        block = min(options["block_size"], case.seq_len)
        blocks = math.ceil(case.seq_len / block)
        reach = math.ceil(window / block)  # blocks a window reaches on each side
        before, after = reach, 0 if causal else reach
        seq_len, pad = case.seq_len, blocks * block - case.seq_len
        scale, half_norm_scale = case.head_dim**-0.5, 0.5 * case.head_dim**-0.5

        # Per block: which of its window's keys are on the band (exact), and which are off it (estimated).
        queries = torch.arange(blocks * block).view(blocks, block, 1)
        starts = (torch.arange(blocks).view(blocks, 1) + torch.arange(-before, after + 1)) * block  # (N/b, offsets)
        keys = (starts.unsqueeze(-1) + torch.arange(block)).flatten(1).unsqueeze(1)  # (N/b, 1, span), as _windows
        real = (keys >= 0) & (keys < seq_len)
        offset = queries - keys
        on_band = real & (offset <= window) & (offset >= (0 if causal else -window))
        on_band = on_band | ((queries >= seq_len) & real)  # padded query rows: anything finite
        off_band = real & ~on_band & (offset >= 0) if causal else real & ~on_band  # never a later key
        off_band = off_band.to(torch.float32).to(case.device)
        on_band = on_band.to(case.device)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, heads, _, dim = q.shape
            dtype = q.dtype
            compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            q, k, v = (F.pad(t.to(compute), (0, 0, 0, pad)) for t in (q, k, v))
            q = q.view(batch, heads // groups, groups, blocks, block, dim)  # (B, KV, G, N/b, b, D)
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, KV, N', D+1)

            # Exact part on the band, relative to each row's band maximum.
            scores = (q * scale) @ _windows(k, before, after, block).transpose(-1, -2)  # (…, b, span)
            scores.masked_fill_(~on_band, float("-inf"))
            band_max = scores.detach().amax(dim=-1, keepdim=True)
            v1_windows = _windows(v1, before, after, block)
            exact = torch.exp(scores - band_max) @ v1_windows  # (…, b, D+1)

            # Estimated part off the band: e_q·e_k ≈ m exp(s − c_q − c_k).
            eq, query_max = _features(q, projection, half_norm_scale, dims=(-1,))
            ek, key_max = _features(k.unsqueeze(2), projection, half_norm_scale, dims=(-2, -1))  # (B, KV, 1, N', m)
            key_max = key_max.unsqueeze(-1)  # (B, KV, 1, 1, 1, 1), beside the blocked queries
            ek_blocks = ek.view(batch, -1, 1, blocks, block, features)
            states = ek_blocks.transpose(-1, -2) @ v1.view(batch, -1, 1, blocks, block, dim + 1)  # (…, N/b, m, D+1)
            outside = _outside_window(states, before, after)  # Σ over blocks beyond the window
            inside = (eq @ _windows(ek.squeeze(2), before, after, block).transpose(-1, -2)) * off_band
            estimate = eq @ outside + inside @ v1_windows  # (…, b, D+1)

            # One normaliser: both parts brought to the larger of their two scales.
            estimate_log_scale = query_max + key_max - math.log(features)
            common = torch.maximum(band_max, estimate_log_scale)
            total = exact * torch.exp(band_max - common) + estimate * torch.exp(estimate_log_scale - common)
            out = total[..., :-1] / total[..., -1:]
            return out.reshape(batch, heads, blocks * block, dim)[:, :, :seq_len].to(dtype)

        return attention

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The same weights written out in float64: exact exp(s) on the band, (1/m) φ·φ off it."""
        projection = _projection(case, options).to(q.dtype)
        groups = case.heads // case.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        queries = q[:, :, rows]
        logits = queries @ k.transpose(-1, -2) * case.head_dim**-0.5  # (B, H, S, N)
        offset = rows.unsqueeze(-1) - torch.arange(case.seq_len)
        window = options["window"]
        on_band = (offset <= window) & (offset >= (0 if case.causal else -window))
        half_norm_scale = 0.5 * case.head_dim**-0.5
        phi_q = torch.exp(queries @ projection - queries.square().sum(-1, keepdim=True) * half_norm_scale)
        phi_k = torch.exp(k @ projection - k.square().sum(-1, keepdim=True) * half_norm_scale)
        estimate = torch.log(phi_q @ phi_k.transpose(-1, -2) / projection.shape[1])
        weights = torch.where(on_band, logits, estimate)
        if case.causal:
            weights = weights.masked_fill(offset < 0, float("-inf"))
        return torch.softmax(weights, dim=-1) @ v


def _projection(case: Case, options: Mapping[str, Any]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options["seed"])
    omega = random_projection(options["features"], case.head_dim, True, generator)
    return (omega * case.head_dim**-0.25).T.contiguous()


def _features(
    x: torch.Tensor, projection: torch.Tensor, half_norm_scale: float, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(x̃·ω − |x̃|²/2 − c), c) with c the maximum of x̃·ω over ``dims`` (a constant: detached)."""
    logits = x @ projection.to(x.dtype)
    stabiliser = logits.detach().amax(dim=dims, keepdim=True)
    features = logits.sub_(x.square().sum(dim=-1, keepdim=True).mul_(half_norm_scale)).sub_(stabiliser).exp_()
    return features, stabiliser.amax(dim=-1, keepdim=True)


def _windows(x: torch.Tensor, before: int, after: int, block: int) -> torch.Tensor:
    """(B, KV, N', C) -> (B, KV, 1, N/b, span, C): each query block's reachable key blocks, side by
    side. Built from contiguous shifted slices (one per block offset), not an overlapping view."""
    batch, kv_heads, padded_len, width = x.shape
    blocks = padded_len // block
    padded = F.pad(x, (0, 0, before * block, after * block)).view(batch, kv_heads, -1, block, width)
    shifted = [padded[:, :, start : start + blocks] for start in range(before + after + 1)]
    return torch.cat(shifted, dim=-2).unsqueeze(2)


def _outside_window(states: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Σ of the per-block states over blocks entirely before (and, unless causal, after) each
    block's window: exclusive prefix and suffix sums along the block axis (-3)."""
    blocks = states.shape[-3]
    zero = torch.zeros_like(states[..., :1, :, :])
    prefix = torch.cat([zero, states.cumsum(dim=-3)], dim=-3)  # prefix[b] = Σ_{c < b}
    first_in_window = (torch.arange(blocks) - before).clamp(min=0)
    outside = prefix[..., first_in_window, :, :]
    if after:
        last_in_window = (torch.arange(blocks) + after + 1).clamp(max=blocks)
        outside = outside + prefix[..., -1:, :, :] - prefix[..., last_in_window, :, :]
    return outside


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(HybridAttention())
