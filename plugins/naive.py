"""naive: attention written out as softmax(Q Kᵀ / √d) V (Vaswani et al., 2017, eq. 1).

The readable baseline: it materialises the (N × N) scores and probabilities, so its memory
grows as n² and it is the first to hit a memory cap. Chunked prefill and decode steps are the
same products with fewer query rows; a decode step writes its tokens into a KV cache first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from attnbench_plugins.decoding import cached_step, lower_right_allowed

import attnbench
from attnbench import AttentionFn, Case


class NaiveAttention(attnbench.Implementation):
    name = "naive"
    description = "matmul, softmax, matmul: materialises the N×N scores (the readable baseline)"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n^2"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "n"  # one row of scores per new token
    decode_memory_complexity = "n"  # the KV cache

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        return _attention(case)

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        return cached_step(case, k_cache, v_cache, _attention(case))


def _attention(case: Case) -> AttentionFn:
    scale = case.head_dim**-0.5
    groups = case.heads // case.kv_heads
    # Built here, outside the timer: True where a query would see the future.
    allowed = lower_right_allowed(case)
    future = ~allowed if allowed is not None else None

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if groups > 1:  # grouped-query: each kv head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, q, N)
        if future is not None:
            scores.masked_fill_(future, float("-inf"))  # in place: no third N×N tensor
        probabilities = scores.softmax(dim=-1)  # (B, H, q, N); scores and these are the peak
        del scores
        return probabilities @ v  # (B, H, q, D)

    return attention


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(NaiveAttention())
