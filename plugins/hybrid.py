"""hybrid: sparse + low-rank, as in Scatterbrain (Chen et al., "Scatterbrain: Unifying Sparse and
Low-rank Attention Approximation", NeurIPS 2021).

Exact softmax weights on a sliding window of blocks and a FAVOR+ random-feature estimate
(Choromanski et al., 2021) of the weights everywhere else, under one normaliser. The window is
block-granular, as in Scatterbrain's block-sparse component (and BigBird's sliding blocks):
positions fall in blocks of ``block_size``, and query i sees exactly every key whose block is
within r = ⌈window / block_size⌉ blocks of its own (causal: its own and the r before, up to i),
so every query's exact keys cover at least ±window. Scatterbrain writes it as low-rank + a
sparse correction that replaces the estimate on the band by the exact value, so no pair is
counted twice; computed directly:

    out_i = [Σ_{j in band} exp(s_ij) [v_j, 1] + (1/m) Σ_{j not in band} φ(q_i)·φ(k_j) [v_j, 1]]  →  num / den

with φ the positive random features of the performer plugin (no epsilon: both parts are sums
of positive terms, so the denominator cannot vanish). Each block of queries meets its window's
key blocks one offset at a time (contiguous slices, an online softmax across offsets), so no
(N × window) tensor is held and no exact product is spent on a pair the estimate then covers;
the estimate, over whole blocks outside the window, comes from prefix sums of per-block
φ(K)ᵀ[V, 1] states (before the window, and unless causal, after it). Queries go ``chunk_size``
at a time, which keeps every temporary small: cache-resident, and not mapped and page-faulted
afresh at each call. The exact window spans (2r + 1)·b keys (causal: (r + 1)·b), more than
±window, and its products are counted as what they are (``flops``).
Time O(N·(window + m)·d), memory O(N·m). Chunked prefill and decode steps: hybrid_steps.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from attnbench_plugins.hybrid_steps import FewQueries, band_pairs, block_and_reach, on_band
from attnbench_plugins.performer import LOG2_E, random_projection, scaled_square_norms, with_ones
from attnbench_plugins.precision import compute_dtype, compute_dtype_for

import attnbench
from attnbench import AttentionFn, Case
from attnbench.contract.work import random_features, timed_call

REFERENCE_KEY_BLOCK = 4096  # keys per block of the float64 reference


class HybridAttention(attnbench.Implementation):
    name = "hybrid"
    description = "Scatterbrain: exact sliding window + random-feature estimate of the rest, one softmax"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "1"  # the window's keys and a fixed-size feature state
    decode_memory_complexity = "1"
    default_options = {"window": 256, "features": 256, "seed": 0, "block_size": 128, "chunk_size": 512}
    # Judged against its own float64 formula: the one normaliser over an exact and an estimated
    # part, and the estimate beyond the window as a prefix sum subtracted from the total, leave
    # gradients up to ~1.6e-5 of their largest entry from it on some random inputs (30 seeds at
    # N=128), over the default 1e-5. A bug is off by orders more.
    tolerances = {**attnbench.Implementation.tolerances, torch.float32: attnbench.Tolerance(atol=1e-6, rtol=5e-5)}

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        problems = {}
        for key, minimum in (("window", 0), ("features", 1), ("block_size", 16), ("chunk_size", 1)):
            if options[key] < minimum:
                problems[key] = f"must be at least {minimum}, got {options[key]}"
        return problems

    def flops(self, case: Case, options: Mapping[str, Any]) -> attnbench.FlopCount:
        """Exact weights on the band's P pairs, 4·B·H·P·D, and the FAVOR+ estimate of the rest,
        4·B·(H+KV)·N·m·D; causal, less the S first rows' product with the state of keys outside
        their window (they have none), 2·B·H·S·m·D."""
        window, block_size = options["window"], options["block_size"]
        estimate, formula = random_features(case, options["features"])
        if case.query_len < case.key_len:
            pairs = int(FewQueries(case, window, block_size, torch.zeros(case.head_dim, 1)).on_band.sum())
        else:
            block, reach = block_and_reach(case.key_len, window, block_size)
            pairs = band_pairs(case.key_len, block, reach, case.causal)
            if case.causal:
                inside = min(case.key_len, (reach + 1) * block)
                estimate -= 2.0 * case.batch * case.heads * inside * options["features"] * case.head_dim
                formula += f" − 2·B·H·S·m·D, S={inside}"
        return timed_call(case, 4.0 * case.batch * case.heads * pairs * case.head_dim + estimate,
                          f"4·B·H·P·D + {formula}, P={pairs} pairs (window {window} in blocks of {block_size})")

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        """Keeps the keys and values of the cache's last window of blocks (and slots for the new
        tokens) and the feature sums of the keys before it; the rest of the cache is dropped."""
        few = FewQueries(case, options["window"], options["block_size"], _projection(case, options).to(case.device))
        far = few.far_sums(k_cache[:, :, : few.far], v_cache[:, :, : few.far])
        compute, new = compute_dtype(k_cache), case.query_len
        # The near keys (and their projections, and [v, 1]) with q empty slots that steps overwrite.
        k_near = _with_slots(k_cache[:, :, few.far:].to(compute), new)
        v1_near = _with_slots(with_ones(v_cache[:, :, few.far:].to(compute)), new)
        v1_near[:, :, -new:, -1] = 1.0
        near = few.project(k_near)
        del k_cache, v_cache

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k = k.to(compute)
            k_near[:, :, -new:] = k
            v1_near[:, :, -new:, :-1] = v
            projected = few.project(k)
            near.logits[:, :, -new:] = projected.logits
            near.half_norm[:, :, -new:] = projected.half_norm
            return few.attend(q, k_near, v1_near, near, far).to(q.dtype)

        return step

    def step_bytes(self, case: Case, options: Mapping[str, Any]) -> attnbench.ByteCount:
        """The near keys and values, the far sums (float32, m × (D+1) per kv head), the projection,
        the queries and the output."""
        near = case.key_len - FewQueries(case, options["window"], options["block_size"],
                                         torch.zeros(case.head_dim, 1)).far
        b, h, kv, q, d, m = case.batch, case.heads, case.kv_heads, case.query_len, case.head_dim, options["features"]
        size = case.dtype.itemsize
        return attnbench.ByteCount(size * (2.0 * b * kv * near * d + 2.0 * b * h * q * d) + 4.0 * (b * kv * m * (d + 1)
                                                                                                  + d * m),
                                   f"(2·B·KV·K·D + 2·B·H·q·D) × {size} + (B·KV·m·(D+1) + D·m) × 4 bytes, "
                                   f"K={near} near keys, m={m}")

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        if case.chunked:
            few = FewQueries(case, options["window"], options["block_size"],
                             _projection(case, options).to(case.device))
            return lambda q, k, v: few.attention(q, k, v).to(q.dtype)
        # Weights in base 2 (log₂e folded into the projection and the scores' scale): exp2 runs
        # at about twice exp's rate on CPUs.
        projection = _projection(case, options).to(case.device) * LOG2_E  # (D, m), scaled by d^-¼
        features = projection.shape[1]
        causal, groups = case.causal, case.heads // case.kv_heads
        block, reach = block_and_reach(case.seq_len, options["window"], options["block_size"])
        blocks = math.ceil(case.seq_len / block)
        chunk = math.ceil(options["chunk_size"] / block)  # query blocks per chunk
        before, after = reach, 0 if causal else reach
        seq_len, pad = case.seq_len, blocks * block - case.seq_len
        scale, half_norm_scale = case.head_dim**-0.5 * LOG2_E, 0.5 * case.head_dim**-0.5 * LOG2_E

        # For each block offset o in the window (offset-major), the keys of its existing blocks
        # that are not exact: padding, and (causal) later keys in the query's own block. Only
        # offsets holding such a key are masked.
        queries = torch.arange(blocks * block).view(1, blocks, block, 1)
        offsets = torch.arange(-before, after + 1).view(-1, 1, 1, 1)
        key_blocks = torch.arange(blocks).view(1, blocks, 1, 1) + offsets
        keys = key_blocks * block + torch.arange(block).view(1, 1, 1, block)
        real = (keys >= 0) & (keys < seq_len)
        band = real & (on_band(queries, keys, block, reach, causal) | (queries >= seq_len))  # padded rows: finite
        masked = ~band & (key_blocks >= 0) & (key_blocks < blocks)  # (O, N/b, b, b)
        masked_offsets = {o for o in range(len(masked)) if bool(masked[o].any())}
        outside_band = masked.view(len(masked), blocks, 1, 1, 1, block, block).to(case.device)
        # [v, 1] for real keys, zeros for padding: padded keys then add nothing to any sum.
        real_key = (torch.arange(blocks * block) < seq_len).view(blocks, 1, 1, 1, block, 1).to(case.device)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, heads, _, dim = q.shape
            dtype = q.dtype
            compute = compute_dtype_for(dtype)
            # Block-major (N/b, B, KV, G, b, C): a run of consecutive blocks is one contiguous
            # slice whose leading dimensions merge, so products on it copy nothing.
            q = _block_major(q.to(compute), block, pad, groups)
            k, v = (_block_major(t.to(compute), block, pad, 1) for t in (k, v))
            v1 = torch.cat([v, real_key.to(compute).expand(*v.shape[:-1], 1)], dim=-1)
            ek, key_max = _features(k, projection, half_norm_scale, dims=(0, -2, -1))
            prefix = _BlockPrefixSum.apply(ek.transpose(-1, -2) @ v1)  # (N/b, B, KV, 1, m, D+1): Σ_{c ≤ b}

            # Queries go chunk by chunk so that every temporary stays small: cache-resident, and
            # reused by the allocator instead of mapped and faulted in afresh at every call.
            spans = [(lo, min(lo + chunk, blocks)) for lo in range(0, blocks, chunk)]
            q_chunks = q.split(chunk)

            def tiles(x: torch.Tensor, shift: int) -> list[tuple[slice, torch.Tensor]]:
                """For each chunk: its query blocks b whose block b + shift of ``x`` exists (as rows
                of the chunk) and those blocks of ``x``. Views from one split, not slices: the
                backward of each slice fills a gradient as large as ``x``."""
                rows = [slice(max(lo, -shift) - lo, max(lo, min(hi, blocks - shift)) - lo) for lo, hi in spans]
                sizes = [max(0, r.stop - r.start) for r in rows]
                start, stop = min(blocks, max(0, shift)), max(0, blocks + min(0, shift))
                pieces = x.split([start, *sizes, blocks - stop])[1:-1]
                return list(zip(rows, pieces, strict=True))

            offsets = range(-before, after + 1)
            near = {shift: (tiles(k, shift), tiles(v1, shift)) for shift in offsets}
            # Keys beyond the window's blocks: Σ_{c < b-before} from prefix[b-before-1] and, unless
            # causal, Σ_{c > b+after} = total - prefix[b+after]; the two states are added before
            # the queries meet them (one product, not two).
            outside_before = tiles(prefix, -before - 1)
            outside_after = tiles(prefix, after) if after else None
            total_state = prefix[-1]

            def outside_states(index: int) -> tuple[slice, torch.Tensor] | None:
                """For a chunk: the query blocks with keys outside their window, and those keys' state."""
                (rows, state), size = outside_before[index], len(q_chunks[index])
                if outside_after is not None:
                    after_rows, after_state = outside_after[index]
                    beyond = total_state - after_state
                    combined = beyond.new_zeros(size, *beyond.shape[1:])
                    _rows(combined, after_rows).add_(beyond)
                    _rows(combined, rows).add_(state)
                    rows, state = slice(0, size), combined
                return (rows, state) if rows.start < rows.stop else None

            def chunk_out(index: int) -> torch.Tensor:
                """[Σ_j w_ij v_j, Σ_j w_ij] for one chunk of query blocks, on one scale."""
                lo = spans[index][0]
                q_chunk = q_chunks[index]
                eq, query_max = _features(q_chunk, projection, half_norm_scale, dims=(-1,))
                q_scaled = q_chunk * scale
                outside = outside_states(index)
                if outside is not None and _covers(outside[0], eq):
                    estimate = eq @ outside[1]
                else:
                    estimate = torch.zeros(*eq.shape[:-1], dim + 1, dtype=eq.dtype, device=eq.device)
                    if outside is not None:
                        estimate[outside[0]] = eq[outside[0]] @ outside[1]
                exact = torch.zeros_like(estimate)
                band_max = torch.full_like(query_max, float("-inf"))
                for shift in offsets:  # the window's key blocks, one offset at a time
                    (rows, keys), (_, values) = near[shift][0][index], near[shift][1][index]
                    if rows.start >= rows.stop:
                        continue
                    o, blocks_here = shift + before, slice(lo + rows.start, lo + rows.stop)
                    scores = _rows(q_scaled, rows) @ keys.transpose(-1, -2)
                    if o in masked_offsets:
                        scores.masked_fill_(outside_band[o, blocks_here], float("-inf"))
                    # Exact part: an online softmax across offsets.
                    old_max = band_max[rows]
                    new_max = torch.maximum(old_max, scores.detach().amax(dim=-1, keepdim=True))
                    finite = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                    part = scores.sub_(finite).exp2_() @ values
                    _rows(exact, rows).mul_(torch.exp2(old_max - finite)).add_(part)
                    band_max[rows] = new_max
                # One normaliser: e_q·e_k ≈ m·2^(s − c_q − c_k); both parts to the larger of the scales.
                estimate_log_scale = query_max + key_max - math.log2(features)
                common = torch.maximum(band_max, estimate_log_scale)
                estimate.mul_(torch.exp2(estimate_log_scale - common))
                total = exact.mul_(torch.exp2(band_max - common)).add_(estimate)
                return total[..., :-1] / total[..., -1:]

            # Concatenated, not written into slices of one tensor, for the same reason as tiles.
            chunks = [chunk_out(index).permute(1, 2, 3, 0, 4, 5) for index in range(len(spans))]
            out = torch.cat(chunks, dim=3)  # (B, KV, G, N/b, b, D)
            return out.view(batch, heads, blocks * block, dim)[:, :, :seq_len].to(dtype)

        return attention

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The same weights written out in float64: exact exp(s) on the band, (1/m) φ·φ off it;
        one softmax, accumulated over blocks of keys per kv head (never an N × m tensor per
        query head, so a long decode cache is checked in bounded memory)."""
        projection = _projection(case, options).to(q.dtype)
        batch, heads, _, dim = q.shape
        half_norm_scale = 0.5 * case.head_dim**-0.5
        block, reach = block_and_reach(k.shape[-2], options["window"], options["block_size"])
        positions = rows + (k.shape[-2] - q.shape[-2])  # the queries are the last positions
        queries = q[:, :, rows].reshape(batch, case.kv_heads, heads // case.kv_heads, len(rows), dim)
        phi_q = torch.exp(queries @ projection - queries.square().sum(-1, keepdim=True) * half_norm_scale)
        running_max = torch.full((*queries.shape[:-1], 1), float("-inf"), dtype=q.dtype)
        numerator, denominator, start = 0.0, 0.0, 0
        for block_k, block_v in zip(k.split(REFERENCE_KEY_BLOCK, dim=2), v.split(REFERENCE_KEY_BLOCK, dim=2),
                                    strict=True):
            block_k, block_v = block_k.unsqueeze(2), block_v.unsqueeze(2)  # (B, KV, 1, b, D)
            logits = queries @ block_k.transpose(-1, -2) * case.head_dim**-0.5  # (B, KV, G, S, b)
            phi_k = torch.exp(block_k @ projection - block_k.square().sum(-1, keepdim=True) * half_norm_scale)
            estimate = torch.log(phi_q @ phi_k.transpose(-1, -2) / projection.shape[1])
            key_positions = torch.arange(start, start + block_k.shape[-2])
            offset = positions.unsqueeze(-1) - key_positions
            band = on_band(positions.unsqueeze(-1), key_positions, block, reach, case.causal)
            weights = torch.where(band, logits, estimate)
            if case.causal:
                weights = weights.masked_fill(offset < 0, float("-inf"))
            new_max = torch.maximum(running_max, weights.detach().amax(dim=-1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            probabilities = torch.exp(weights - new_max)
            numerator = numerator * rescale + probabilities @ block_v
            denominator = denominator * rescale + probabilities.sum(dim=-1, keepdim=True)
            running_max, start = new_max, start + block_k.shape[-2]
        return (numerator / denominator).reshape(batch, heads, len(rows), dim)


def _with_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """x (B, KV, K, C) followed by ``slots`` empty rows."""
    return torch.cat([x, x.new_empty(*x.shape[:2], slots, x.shape[-1])], dim=2)


def _projection(case: Case, options: Mapping[str, Any]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options["seed"])
    omega = random_projection(options["features"], case.head_dim, True, generator)
    return (omega * case.head_dim**-0.25).T.contiguous()


def _features(
    x: torch.Tensor, projection: torch.Tensor, half_norm_scale: float, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^(x̃·ω − |x̃|²/2 − c), c) in base-2 units (``projection`` and ``half_norm_scale`` carry
    log₂e), with c the maximum of x̃·ω over ``dims`` (a constant: detached)."""
    logits = x @ projection.to(x.dtype)
    stabiliser = logits.detach().amax(dim=dims, keepdim=True)
    norms = scaled_square_norms(x, half_norm_scale)
    features = logits.sub_(norms + stabiliser).exp2_()
    return features, stabiliser.amax(dim=-1, keepdim=True)


def _covers(rows: slice, x: torch.Tensor) -> bool:
    return rows.start == 0 and rows.stop >= x.shape[0]


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """``x[rows]``, or ``x`` itself where that is all of it: each slice costs autograd's backward
    a zero-filled gradient the size of ``x``."""
    return x if _covers(rows, x) else x[rows]


class _BlockPrefixSum(torch.autograd.Function):
    """Inclusive prefix sums along dim 0, in place, by a loop of adds over the leading dimension:
    at N=32768 that took 5 ms where ``cumsum(dim=0)`` took 185 ms. (Autograd through the loop
    itself would copy the whole gradient once per block: quadratic.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        for b in range(1, x.shape[0]):
            x[b].add_(x[b - 1])
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()  # suffix sums: every prefix from b on contains x[b]
        for b in range(grad.shape[0] - 2, -1, -1):
            grad[b].add_(grad[b + 1])
        return grad


def _block_major(x: torch.Tensor, block: int, pad: int, groups: int) -> torch.Tensor:
    """(B, heads, N, C) -> (N'/b, B, heads/groups, groups, b, C), padded to whole blocks (one copy
    where no padding is needed, two where it is)."""
    batch, heads, _, width = x.shape
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    x = x.reshape(batch, heads // groups, groups, -1, block, width)  # a view of contiguous inputs
    return x.permute(3, 0, 1, 2, 4, 5).contiguous()


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(HybridAttention())
