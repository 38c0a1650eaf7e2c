"""torch's fused scaled_dot_product_attention, each backend pinned as an implementation of its own.

- flash: the FlashAttention backend (Dao et al., 2022): tiles with an online softmax, so the N×N
  scores never exist in memory (time n², memory n). torch has it on the CPU and on CUDA.
- sdpa_mem_efficient: the memory-efficient backend (Rabe & Staats, 2021; xFormers' kernel),
  CUDA only; it takes float32 and head dims flash does not.
- sdpa_cudnn: NVIDIA cuDNN's fused attention, CUDA only, on the GPUs and versions cuDNN supports.

Fewer queries than keys (chunked prefill, decode steps) align a causal mask bottom-right, as
torch's ``causal_lower_right`` does; a decode step writes its tokens into a KV cache, then attends.

``sdpa_kernel`` pins the one backend, so a case that backend cannot take fails with torch's own
reasons instead of silently running another kernel; whether it can is asked of torch itself, on
a tiny call of the same kind.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from attnbench_plugins.decoding import SlotCache, cached_step, lower_right_allowed
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnbench
from attnbench import AttentionFn, Case

# How torch says no kernel of the pinned backend takes the call: on CUDA, "No available kernel.
# Aborting execution." after its reasons as warnings; on the CPU, "No viable backend ...".
REFUSAL_MARKERS = ("No available kernel", "No viable backend")


class PinnedSdpa(attnbench.Implementation):
    """scaled_dot_product_attention held to one backend."""

    backend: SDPBackend
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "n"
    decode_memory_complexity = "n"  # the KV cache

    def not_supported_reasons(self, case: Case) -> list[str]:
        declared = super().not_supported_reasons(case)
        if declared:
            return declared  # the backend cannot be asked on a device it does not run on
        return list(_backend_refusals(self.backend, case.device, case.dtype, case.heads, case.kv_heads,
                                      case.head_dim, case.causal, case.backward, case.query_len < case.key_len))

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        return _pinned_attention(self.backend, case.kv_heads != case.heads, *_causality(case))

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        if case.kv_heads == case.heads or (case.device_type == "cuda" and case.causal and case.query_len > 1):
            return cached_step(case, k_cache, v_cache, self.prepare(case, options))
        cache = SlotCache(case, k_cache, v_cache)
        # Grouped-query heads folded into query rows: each kv head's G query heads become G·q rows
        # over its own keys, so the cache is read once, not copied G times (enable_gqa's CPU path).
        groups = case.heads // case.kv_heads
        attention = _pinned_attention(self.backend, False, _folded_mask(case, groups), False)

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, heads, rows, dim = q.shape
            out = attention(q.reshape(batch, case.kv_heads, groups * rows, dim), *cache.append(k, v))
            return out.reshape(batch, heads, rows, dim)

        return step


def _folded_mask(case: Case, groups: int) -> torch.Tensor | None:
    """The bottom-right mask of a decode step, repeated for each query head folded into the rows."""
    allowed = lower_right_allowed(case)
    return allowed.repeat(groups, 1) if allowed is not None else None


def _causality(case: Case) -> tuple[Any, bool]:
    """(attn_mask, is_causal): SDPA's own causal flag for a square pass, else the bottom-right mask."""
    if case.causal and case.query_len == case.key_len:
        return None, True
    return _lower_right_mask(case), False


def _pinned_attention(backend: SDPBackend, grouped: bool, mask: Any, is_causal: bool) -> AttentionFn:
    def pinned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=grouped)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        try:
            return pinned(q, k, v)
        except RuntimeError as error:  # a limit the tiny call could not show (e.g. on N)
            reasons = _refusals(lambda: pinned(q, k, v))
            if not reasons:
                raise
            raise attnbench.NotSupported("; ".join(reasons)) from error

    return attention


def _lower_right_mask(case: Case) -> Any:
    """Fewer queries than keys, causal: on CUDA torch's lower-right causal bias (its kernels take
    the alignment without a mask in memory); on the CPU that bias would be materialised in every
    call, so the boolean mask is built once here."""
    if case.device_type == "cuda":
        # Imported here: torch.nn.attention.bias imports torch._dynamo, a second or more that
        # every attnbench process would otherwise pay on loading the plugins.
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(case.query_len, case.key_len) if case.causal and case.query_len > 1 else None
    return lower_right_allowed(case)


class FlashAttention(PinnedSdpa):
    name = "flash"
    description = "torch scaled_dot_product_attention pinned to its FlashAttention backend"
    backend = SDPBackend.FLASH_ATTENTION
    devices = ("cpu", "cuda")


class MemoryEfficientSdpa(PinnedSdpa):
    name = "sdpa_mem_efficient"
    description = "torch scaled_dot_product_attention pinned to its memory-efficient backend (CUDA)"
    backend = SDPBackend.EFFICIENT_ATTENTION
    devices = ("cuda",)  # torch's CPU dispatch has only the flash and math kernels


class CudnnSdpa(PinnedSdpa):
    name = "sdpa_cudnn"
    description = "torch scaled_dot_product_attention pinned to its cuDNN backend (CUDA)"
    backend = SDPBackend.CUDNN_ATTENTION
    devices = ("cuda",)


@functools.cache
def _backend_refusals(
    backend: SDPBackend, device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
    causal: bool, backward: bool, fewer_queries: bool,
) -> tuple[str, ...]:
    """Ask the backend itself, on a tiny call of the same kind: torch knows its constraints
    (dtype, head_dim, GPU architecture, grouped-query support, masks) better than a copied list."""
    queries = 4 if fewer_queries else 8
    q = torch.zeros(1, heads, queries, head_dim, dtype=dtype, device=device, requires_grad=backward)
    k = torch.zeros(1, kv_heads, 8, head_dim, dtype=dtype, device=device, requires_grad=backward)
    tiny = Case(batch=1, heads=heads, kv_heads=kv_heads, seq_len=8, q_len=queries, head_dim=head_dim, dtype=dtype,
                device=device, causal=causal, mode="forward_backward" if backward else "forward")
    mask = _lower_right_mask(tiny) if fewer_queries else None

    def tiny_call() -> None:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=causal and not fewer_queries,
                                                 enable_gqa=kv_heads != heads)
        if backward:
            out.sum().backward()

    return _refusals(tiny_call)


def _refusals(call: Callable[[], Any]) -> tuple[str, ...]:
    """Why torch refused the pinned call (empty: it ran, or failed otherwise). torch gives its
    reasons as warnings, then raises a generic error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except RuntimeError as error:
            if not any(marker in str(error) for marker in REFUSAL_MARKERS):
                return ()  # not a refusal: an error of the call itself
            reasons = [_clean(str(warning.message)) for warning in caught] or [_clean(str(error))]
            return tuple(dict.fromkeys(reason for reason in reasons if reason))
    return ()


def _clean(message: str) -> str:
    """One line, without torch's '(Triggered internally at ...)' source location."""
    message = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", message)
    return " ".join(message.split())


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    for implementation in (FlashAttention(), MemoryEfficientSdpa(), CudnnSdpa()):
        registry.add(implementation)
