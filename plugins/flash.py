"""flash: torch's fused scaled_dot_product_attention, held to its FlashAttention backend.

FlashAttention (Dao et al., 2022) tiles the computation with an online softmax so the N×N
scores never exist in memory: time n², memory n. ``sdpa_kernel`` pins the backend, so a
case the backend cannot take fails with torch's reasons instead of silently running
another kernel.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnbench
from attnbench import AttentionFn, Case


class FlashAttention(attnbench.Implementation):
    name = "flash"
    description = "torch scaled_dot_product_attention pinned to its FlashAttention backend"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"
    devices = ("cpu", "cuda")

    def not_supported_reasons(self, case: Case) -> list[str]:
        declared = super().not_supported_reasons(case)
        if declared:
            return declared  # the backend cannot be asked on a device it does not run on
        return list(
            _backend_refusals(
                case.device, case.dtype, case.heads, case.kv_heads, case.head_dim, case.causal, case.backward
            )
        )

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        causal = case.causal
        grouped = case.kv_heads != case.heads

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=grouped)

        return attention


@functools.cache
def _backend_refusals(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, causal: bool, backward: bool
) -> tuple[str, ...]:
    """Ask the backend itself, on a tiny call of the same kind: torch knows its constraints
    (dtype, head_dim, GPU architecture, grouped-query support) better than a copied list."""
    q = torch.zeros(1, heads, 8, head_dim, dtype=dtype, device=device, requires_grad=backward)
    k = torch.zeros(1, kv_heads, 8, head_dim, dtype=dtype, device=device, requires_grad=backward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, k, is_causal=causal, enable_gqa=kv_heads != heads)
            if backward:
                out.sum().backward()
        except RuntimeError as error:
            reasons = [_clean(str(warning.message)) for warning in caught] or [_clean(str(error))]
            return tuple(dict.fromkeys(reason for reason in reasons if reason))
    return ()


def _clean(message: str) -> str:
    """One line, without torch's '(Triggered internally at ...)' source location."""
    message = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", message)
    return " ".join(message.split())


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(FlashAttention())
