"""How much arithmetic a call does: what an implementation declares so that its rows get an achieved
throughput (FLOP/s, and a fraction of the device's measured matmul rate).

Counts are of the algorithm's matrix products, 2 FLOPs per multiply-add, at leading order
(softmax, exponentials and other elementwise work are not counted), as FlashAttention's
benchmarks count exact attention. Work a kernel wastes (padding, masked-out parts of blocks) is
not counted either: it shows as a lower throughput, which is what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbench.contract.case import Case

# A training step (forward, then the backward's two products per forward product and the
# recomputation FlashAttention does) is counted as 3.5× the forward, FlashAttention's convention.
TRAINING_STEP_FACTOR = 3.5


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one timed call for one case, and the formula they come from (for the reader:
    e.g. "4·B·(H+KV)·N·m·D, m=256 features")."""

    flops: float
    formula: str


def timed_call(case: Case, forward_flops: float, forward_formula: str) -> FlopCount:
    """The count for the call the harness times: the forward, or a training step (×3.5)."""
    if case.backward:
        return FlopCount(forward_flops * TRAINING_STEP_FACTOR, f"({forward_formula}) × {TRAINING_STEP_FACTOR:g}")
    return FlopCount(forward_flops, forward_formula)


@dataclass(frozen=True)
class ByteCount:
    """Bytes one decode step must read and write at least, and the formula they come from."""

    bytes: float
    formula: str


def exact_attention(case: Case) -> FlopCount:
    """Exact attention: two (N × N × D) products, 4·B·H·N²·D, halved when causal. With q queries
    onto K keys (chunked prefill; a decode step, K = N + q): 4·B·H·q·K·D, causal 4·B·H·q·(K − q/2)·D."""
    b, h, d = case.batch, case.heads, case.head_dim
    if case.query_len == case.key_len:
        forward = 4.0 * b * h * case.seq_len**2 * d
        if case.causal:
            return timed_call(case, forward / 2, "4·B·H·N²·D / 2 (causal)")
        return timed_call(case, forward, "4·B·H·N²·D")
    q, keys = case.query_len, case.key_len
    key_names = "(N+q)" if case.decode else "N"
    if case.causal:
        return timed_call(case, 4.0 * b * h * q * (keys - q / 2) * d, f"4·B·H·q·({key_names} − q/2)·D (causal)")
    return timed_call(case, 4.0 * b * h * q * keys * d, f"4·B·H·q·{key_names}·D")


def exact_decode_bytes(case: Case) -> ByteCount:
    """A decode step of exact attention reads every cached key and value, the new ones included,
    and the queries, and writes the output and the new keys and values."""
    b, h, kv, n, q, d = case.batch, case.heads, case.kv_heads, case.seq_len, case.query_len, case.head_dim
    size = case.dtype.itemsize
    elements = 2.0 * b * kv * (n + q) * d + 2.0 * b * h * q * d + 2.0 * b * kv * q * d
    return ByteCount(elements * size, f"(2·B·KV·(N+q)·D + 2·B·H·q·D + 2·B·KV·q·D) × {size} bytes")


def banded_pairs(seq_len: int, window: int, causal: bool, global_tokens: int = 0) -> int:
    """(query, key) pairs with |i − j| <= window (causal: 0 <= i − j <= window), or either of them
    among the first ``global_tokens`` positions (causal: never a later key)."""
    i = torch.arange(seq_len)
    low = (i - window).clamp(min=0)
    high = i if causal else (i + window).clamp(max=seq_len - 1)
    per_query = high - low + 1 + low.clamp(max=global_tokens)  # the band, and global keys before it
    every_key = i + 1 if causal else torch.full_like(i, seq_len)
    return int(torch.where(i < global_tokens, every_key, per_query).sum())


def random_features(case: Case, features: int, chunk: int | None = None) -> tuple[float, str]:
    """FAVOR+ forward: features of the queries (per head) and the keys (per kv head), the key
    sums φ(K)ᵀV (per kv head) and their products with φ(Q): 2·B·(H+KV)·N·m·D twice. Causal with
    chunks of c adds each chunk's masked (c × c) products, 2·B·H·N·c·(m + D). With q queries the
    query terms count q rows; a decode step takes in only its q new keys (the rest are its state)."""
    b, h, kv, n, d, m = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim, features
    q = case.query_len
    keys = q if case.decode else case.key_len
    if q == keys == n:
        flops, formula = 4.0 * b * (h + kv) * n * m * d, f"4·B·(H+KV)·N·m·D, m={m}"
    else:
        key_name = "q" if case.decode else "N"
        flops, formula = 4.0 * b * (h * q + kv * keys) * m * d, f"4·B·(H·q + KV·{key_name})·m·D, m={m}"
    if not (case.causal and chunk is not None):
        return flops, formula
    c = min(chunk, q)
    flops += 2.0 * b * h * q * c * (m + d)
    rows = "N" if q == n else "q"
    return flops, f"{formula.split(',')[0]} + 2·B·H·{rows}·c·(m+D), m={m}, c={c}"
