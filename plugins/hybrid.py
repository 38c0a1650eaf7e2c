"""hybrid: sparse + low-rank, as in Scatterbrain (Chen et al., "Scatterbrain: Unifying Sparse and
Low-rank Attention Approximation", NeurIPS 2021).

Exact softmax weights on a sliding window (±window; causal: the window looks back) and a FAVOR+
random-feature estimate (Choromanski et al., 2021) of the weights everywhere else, under one
normaliser. Scatterbrain writes it as low-rank + a sparse correction that replaces the
estimate on the band by the exact value, so no pair is counted twice; computed directly:

    out_i = [Σ_{j in band} exp(s_ij) [v_j, 1] + (1/m) Σ_{j not in band} φ(q_i)·φ(k_j) [v_j, 1]]  →  num / den

with φ the positive random features of the performer plugin (no epsilon: both parts are sums
of positive terms, so the denominator cannot vanish). Blocks of ``block_size`` queries meet
the key blocks their window reaches one offset at a time (contiguous slices, an online softmax
across offsets for the exact part), so no (N × window) tensor is held; the estimate's sum over
keys beyond a block's window is a prefix (and, unless causal, suffix) sum of per-block
φ(K)ᵀ[V, 1] states. Time O(N·(window + m)·d), memory O(N·m).
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

        # For each block offset o in the window (offset-major): which of its keys are on the band
        # (exact) and which off it (estimated); offsets with no off-band key skip the estimate.
        queries = torch.arange(blocks * block).view(1, blocks, block, 1)
        offsets = torch.arange(-before, after + 1).view(-1, 1, 1, 1)
        keys = (torch.arange(blocks).view(1, blocks, 1, 1) + offsets) * block + torch.arange(block).view(1, 1, 1, block)
        real = (keys >= 0) & (keys < seq_len)
        distance = queries - keys  # (O, N/b, b, b)
        on_band = real & (distance <= window) & (distance >= (0 if causal else -window))
        on_band = on_band | ((queries >= seq_len) & real)  # padded query rows: anything finite
        off_band = real & ~on_band & ((distance >= 0) if causal else True)  # never a later key
        estimated_offsets = [o for o in range(len(off_band)) if bool(off_band[o].any())]
        outside_band = (~on_band).to(case.device)
        off_band = off_band.to(torch.float32).to(case.device)
        real_key = (torch.arange(blocks * block) < seq_len).to(torch.float32).view(blocks, 1, 1, 1, block, 1)
        real_key = real_key.to(case.device)
        outside_band = outside_band.view(len(outside_band), blocks, 1, 1, 1, block, block)
        off_band = off_band.view(len(off_band), blocks, 1, 1, 1, block, block)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, heads, _, dim = q.shape
            dtype = q.dtype
            compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            # Block-major (N/b, B, KV, G, b, C): a run of consecutive key blocks is then one
            # contiguous slice whose leading dimensions merge, so products on it copy nothing.
            q = _block_major(q.to(compute), block, pad, groups)
            k, v = (_block_major(t.to(compute), block, pad, 1) for t in (k, v))
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [v, 1]: numerator and denominator
            eq, query_max = _features(q, projection, half_norm_scale, dims=(-1,))
            ek, key_max = _features(k, projection, half_norm_scale, dims=(0, -2, -1))
            ek = ek * real_key  # padded keys must add nothing to the estimate
            states = ek.transpose(-1, -2) @ v1  # (N/b, B, KV, 1, m, D+1): each block's Σ e_k [v, 1]
            estimate = eq @ _outside_window(states, before, after)  # keys beyond the window's blocks

            k_near, v1_near, ek_near = (_pad_blocks(t, before, after) for t in (k, v1, ek))
            q = q * scale
            # In-place updates below (mul_, add_, sub_, exp_) keep memory traffic down; none of them
            # touches a tensor autograd saved.
            exact, band_max = None, torch.full_like(query_max, float("-inf"))
            for o in range(before + after + 1):  # exact part: an online softmax over the offsets
                scores = q @ k_near[o : o + blocks].transpose(-1, -2)  # (N/b, B, KV, G, b, b)
                scores.masked_fill_(outside_band[o], float("-inf"))
                new_max = torch.maximum(band_max, scores.detach().amax(dim=-1, keepdim=True))
                finite = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                part = scores.sub_(finite).exp_() @ v1_near[o : o + blocks]
                exact = part if exact is None else exact.mul_(torch.exp(band_max - finite)).add_(part)
                band_max = new_max
            for o in estimated_offsets:  # estimated part inside the window, off the band
                near = (eq @ ek_near[o : o + blocks].transpose(-1, -2)).mul_(off_band[o])
                estimate = estimate.add_(near @ v1_near[o : o + blocks])

            # One normaliser: e_q·e_k ≈ m·exp(s − c_q − c_k); both parts to the larger of the scales.
            estimate_log_scale = query_max + key_max - math.log(features)
            common = torch.maximum(band_max, estimate_log_scale)
            total = exact.mul_(torch.exp(band_max - common)).add_(estimate.mul_(torch.exp(estimate_log_scale - common)))
            out = (total[..., :-1] / total[..., -1:]).permute(1, 2, 3, 0, 4, 5)  # (B, KV, G, N/b, b, D)
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


def _block_major(x: torch.Tensor, block: int, pad: int, groups: int) -> torch.Tensor:
    """(B, heads, N, C) -> (N'/b, B, heads/groups, groups, b, C), padded to whole blocks (one copy)."""
    batch, heads, _, width = x.shape
    x = F.pad(x, (0, 0, 0, pad)).view(batch, heads // groups, groups, -1, block, width)
    return x.permute(3, 0, 1, 2, 4, 5).contiguous()


def _pad_blocks(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero blocks before and after along the block axis, so offset o's keys are x[o : o + N/b]."""
    return torch.cat([x.new_zeros((before, *x.shape[1:])), x, x.new_zeros((after, *x.shape[1:]))])


def _outside_window(states: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Σ of the per-block states (block axis 0) over blocks entirely before (and, unless causal,
    after) each block's window: exclusive prefix and suffix sums."""
    blocks = states.shape[0]
    prefix = torch.cat([torch.zeros_like(states[:1]), states.cumsum(dim=0)])  # prefix[b] = Σ_{c < b}
    outside = prefix[(torch.arange(blocks) - before).clamp(min=0)]
    if after:
        outside = outside + prefix[-1:] - prefix[(torch.arange(blocks) + after + 1).clamp(max=blocks)]
    return outside


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(HybridAttention())
