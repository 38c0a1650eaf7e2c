"""naive: attention written out as softmax(Q Kᵀ / √d) V (Vaswani et al., 2017, eq. 1).

The readable baseline: it materialises the (N × N) scores and probabilities, so its memory
grows as n² and it is the first to hit a memory cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import attnbench
from attnbench import AttentionFn, Case


class NaiveAttention(attnbench.Implementation):
    name = "naive"
    description = "matmul, softmax, matmul: materialises the N×N scores (the readable baseline)"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n^2"

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        scale = case.head_dim**-0.5
        groups = case.heads // case.kv_heads
        # Built here, outside the timer: True above the diagonal, where a query would see the future.
        future = (
            torch.ones(case.seq_len, case.seq_len, dtype=torch.bool, device=case.device).triu_(1)
            if case.causal
            else None
        )

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if groups > 1:  # grouped-query: each kv head serves `groups` query heads
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if future is not None:
                scores.masked_fill_(future, float("-inf"))  # in place: no third N×N tensor
            probabilities = scores.softmax(dim=-1)  # (B, H, N, N); scores and these are the peak
            del scores
            return probabilities @ v  # (B, H, N, D)

        return attention


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(NaiveAttention())
