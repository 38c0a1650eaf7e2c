"""Exact softmax attention in float64, computed in key blocks: never an N×N matrix.

q may have fewer rows than k and v (chunked prefill, a decode step): its rows are then the last
positions, and a causal mask is aligned bottom-right.

The forward pass keeps a running max and normaliser per query row (the online softmax of
Milakov & Gimelshein, 2018, as FlashAttention uses it); the backward pass recomputes each
block's probabilities from the saved log-sum-exp. Only the sampled query rows are computed,
so checking N=32768 costs rows × N × D work, not N² × D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KEY_BLOCK = 1024
QUERY_BLOCK = 512  # query rows per block when every row is needed (dk, dv at sampled keys)

# (query positions (S, 1), key positions (1, K)) -> bool (S, K): True where a query may attend
# to a key, as FlexAttention's mask_mod. Structured implementations describe their pattern so.
MaskMod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReferenceOutput:
    out: torch.Tensor  # (B, H, S, D) at the sampled rows
    lse: torch.Tensor  # (B, H, S) log-sum-exp of the scaled scores, for the backward pass


@dataclass(frozen=True)
class ReferenceGrads:
    dq: torch.Tensor  # (B, H, S, D) at the sampled rows
    dk: torch.Tensor | None  # (B, KV, N, D), only when every row was sampled
    dv: torch.Tensor | None


def sample_rows(seq_len: int, max_rows: int, seed: int) -> torch.Tensor:
    """Sorted positions to check: all of them, or a seeded sample with both ends."""
    if seq_len <= max_rows:
        return torch.arange(seq_len)
    generator = torch.Generator().manual_seed(seed)
    inner = torch.randperm(seq_len - 2, generator=generator)[: max_rows - 2] + 1
    return torch.cat([torch.tensor([0, seq_len - 1]), inner]).sort().values


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, causal: bool, mask: MaskMod | None = None
) -> ReferenceOutput:
    """softmax(q kᵀ / √D) v at query ``rows``, over the keys ``mask`` allows (all by default;
    only earlier ones when causal); k and v may have fewer heads (grouped-query)."""
    batch, heads, _, head_dim = q.shape
    q_rows, row_positions = _grouped_rows(q, k, rows, head_dim)
    shape = q_rows.shape[:-1]  # (B, KV, G·S)
    running_max = torch.full(shape, float("-inf"), dtype=torch.float64, device=q.device)
    normaliser = torch.zeros(shape, dtype=torch.float64, device=q.device)
    accumulator = torch.zeros_like(q_rows)
    for _, keys, values, allowed in _key_blocks(k, v, row_positions, causal, mask):
        scores = q_rows @ keys.transpose(-1, -2)  # (B, KV, G·S, block)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        finite_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probabilities = torch.exp(scores - finite_max.unsqueeze(-1))
        rescale = torch.exp(running_max - finite_max)
        normaliser = normaliser * rescale + probabilities.sum(dim=-1)
        accumulator = accumulator * rescale.unsqueeze(-1) + probabilities @ values
        running_max = new_max
    out = accumulator / normaliser.unsqueeze(-1)
    lse = running_max + torch.log(normaliser)
    sampled = len(rows)
    return ReferenceOutput(
        out=out.reshape(batch, heads, sampled, head_dim),
        lse=lse.reshape(batch, heads, sampled),
    )


def softmax_attention_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    causal: bool,
    forward: ReferenceOutput,
    mask: MaskMod | None = None,
) -> ReferenceGrads:
    """Gradients of sum(out * grad_out): dq at ``rows``; dk and dv when ``rows`` is every row.

    dq_i depends only on grad_out_i, so sampled rows give exact dq there; dk and dv sum over
    all query rows and are only complete when all were sampled.
    """
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    all_rows = len(rows) == seq_len
    q_rows, row_positions = _grouped_rows(q, k, rows, head_dim)
    grad_rows = _group(grad_out[:, :, rows], kv_heads)  # (B, KV, G·S, D)
    out_rows = _group(forward.out, kv_heads)
    lse = forward.lse.reshape(batch, kv_heads, -1)
    delta = (grad_rows * out_rows).sum(dim=-1, keepdim=True)  # rowsum(dO ∘ O)
    dq = torch.zeros_like(q_rows)
    dk = torch.zeros_like(k) if all_rows else None
    dv = torch.zeros_like(v) if all_rows else None
    for start, keys, values, allowed in _key_blocks(k, v, row_positions, causal, mask):
        scores = q_rows @ keys.transpose(-1, -2)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probabilities = torch.exp(scores - lse.unsqueeze(-1))
        grad_scores = probabilities * (grad_rows @ values.transpose(-1, -2) - delta)
        dq += grad_scores @ keys
        if all_rows:
            stop = start + keys.shape[-2]
            dv[:, :, start:stop] += probabilities.transpose(-1, -2) @ grad_rows
            dk[:, :, start:stop] += grad_scores.transpose(-1, -2) @ q_rows  # q_rows carries the scale
    dq *= head_dim**-0.5
    return ReferenceGrads(dq=dq.reshape(batch, heads, len(rows), head_dim), dk=dk, dv=dv)


def softmax_attention_key_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, key_rows: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk and dv of sum(out * grad_out) at key positions ``key_rows``: (B, KV, S, D) each.

    dk_j and dv_j sum over every query row, so this needs the log-sum-exp and rowsum(dO ∘ O) of
    all rows: a full float64 forward pass, in blocks of query rows (never an N×N matrix).
    """
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    keys, values = k[:, :, key_rows], v[:, :, key_rows]  # (B, KV, S, D)
    dk = torch.zeros_like(keys)
    dv = torch.zeros_like(values)
    for start in range(0, seq_len, QUERY_BLOCK):
        rows = torch.arange(start, min(start + QUERY_BLOCK, seq_len))
        forward = softmax_attention(q, k, v, rows, causal)
        q_rows, row_positions = _grouped_rows(q, k, rows, head_dim)  # (B, KV, G·r, D), scaled
        grad_rows = _group(grad_out[:, :, rows], kv_heads)
        delta = (grad_rows * _group(forward.out, kv_heads)).sum(dim=-1, keepdim=True)
        scores = q_rows @ keys.transpose(-1, -2)  # (B, KV, G·r, S)
        if causal:
            scores = scores.masked_fill(key_rows.unsqueeze(0) > row_positions.unsqueeze(1), float("-inf"))
        probabilities = torch.exp(scores - forward.lse.reshape(batch, kv_heads, groups * len(rows), 1))
        dv += probabilities.transpose(-1, -2) @ grad_rows
        grad_scores = probabilities * (grad_rows @ values.transpose(-1, -2) - delta)
        dk += grad_scores.transpose(-1, -2) @ q_rows  # q_rows carries the scale
    return dk, dv


def _grouped_rows(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled q at ``rows``, shaped (B, KV, G·S, D) so each kv head meets its G query heads, and
    the rows' positions among the keys: q holds the last positions when it has fewer rows.

    Query head h uses kv head h // G (the convention of repeat_interleave and of
    scaled_dot_product_attention's enable_gqa).
    """
    kv_heads = k.shape[1]
    q_rows = _group(q[:, :, rows] * head_dim**-0.5, kv_heads)
    groups = q.shape[1] // kv_heads
    offset = k.shape[-2] - q.shape[-2]  # bottom-right alignment
    return q_rows, (rows.to(q.device) + offset).repeat(groups)


def _group(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, heads, sampled, head_dim = tensor.shape
    return tensor.reshape(batch, kv_heads, (heads // kv_heads) * sampled, head_dim)


def _key_blocks(
    k: torch.Tensor, v: torch.Tensor, row_positions: torch.Tensor, causal: bool, mask: MaskMod | None
):
    """(start, keys, values, allowed mask or None) per key block; causal stops past the last row."""
    seq_len = k.shape[-2]
    last_row = int(row_positions.max())
    for start in range(0, seq_len, KEY_BLOCK):
        if causal and start > last_row:
            break
        stop = min(start + KEY_BLOCK, seq_len)
        query_positions = row_positions.unsqueeze(1)  # (G·S, 1)
        key_positions = torch.arange(start, stop, device=k.device).unsqueeze(0)  # (1, block)
        allowed = None
        if causal:
            allowed = key_positions <= query_positions
        if mask is not None:
            pattern = mask(query_positions, key_positions)
            allowed = pattern if allowed is None else allowed & pattern
        yield start, k[:, :, start:stop], v[:, :, start:stop], allowed
