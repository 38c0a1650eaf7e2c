"""xformers: ``xformers.ops.memory_efficient_attention`` (Lefaudeux et al., xFormers; the kernel
follows Rabe & Staats, "Self-attention Does Not Need O(n²) Memory", 2021, and FlashAttention).

An optional dependency (``pip install 'attnbench[xformers]'``). Whether a case runs is asked
of xformers itself, on a tiny call of the same kind, so the reasons are its own: on a CPU,
``device=cpu (supported: {'cuda'})``. xformers lays tensors out as (B, N, H, D): the callable
transposes views in and out, and grouped-query heads use its 5-D (B, N, KV, G, D) form with
keys and values broadcast over the group. Fewer queries than keys (chunked prefill, decode
steps) take its bottom-right causal mask; a decode step writes its tokens into a KV cache first.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from attnbench_plugins.decoding import cached_step

import attnbench
from attnbench import AttentionFn, Case

INSTALL_HINT = "pip install 'attnbench[xformers]'"


class XformersAttention(attnbench.Implementation):
    name = "xformers"
    description = "xformers.ops.memory_efficient_attention (CUDA kernels; exact, O(N) memory)"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "n"
    decode_memory_complexity = "n"  # the KV cache

    def not_supported_reasons(self, case: Case) -> list[str]:
        xformers_ops, load_problem = _load_xformers()
        if xformers_ops is None:
            return [load_problem]
        refusals = _refusals(xformers_ops, case.device, case.dtype, case.heads, case.kv_heads,
                             case.head_dim, case.causal, case.backward, case.query_len < case.key_len)
        if refusals and load_problem:
            refusals = (*refusals, load_problem)
        return list(refusals)

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        xformers_ops, load_problem = _load_xformers()
        if xformers_ops is None:
            raise RuntimeError(load_problem)
        bias = _causal_bias(xformers_ops, case.causal, case.query_len < case.key_len)
        groups = case.heads // case.kv_heads

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = xformers_ops.memory_efficient_attention(
                _query_layout(q, groups), _key_value_layout(k, groups), _key_value_layout(v, groups), attn_bias=bias
            )
            return _from_xformers_layout(out)

        return attention

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        return cached_step(case, k_cache, v_cache, self.prepare(case, options))


def _causal_bias(xformers_ops: ModuleType, causal: bool, fewer_queries: bool) -> Any:
    """xformers' causal mask: aligned bottom-right when there are fewer queries than keys."""
    if not causal:
        return None
    if fewer_queries:
        return xformers_ops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    return xformers_ops.LowerTriangularMask()


def _query_layout(q: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H, D), or (B, N, KV, G, D) for grouped-query heads (views, no copy)."""
    q = q.transpose(1, 2)
    return q if groups == 1 else q.unflatten(2, (q.shape[2] // groups, groups))


def _key_value_layout(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, N, D) -> (B, N, KV, D), or (B, N, KV, G, D) broadcast over the group."""
    x = x.transpose(1, 2)
    return x if groups == 1 else x.unsqueeze(3).expand(*x.shape[:3], groups, x.shape[-1])


def _from_xformers_layout(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 5:
        out = out.flatten(2, 3)
    return out.transpose(1, 2)


@functools.cache
def _load_xformers() -> tuple[ModuleType | None, str]:
    """(xformers.ops or None, a problem to report: not installed, or why its kernels did not load)."""
    with _captured_log("xformers") as messages:
        try:
            import xformers.ops as xformers_ops
        except ImportError as error:
            return None, f"xformers is not installed ({INSTALL_HINT}; it needs torch>=2.10): {error}"
        except Exception as error:  # a broken install must not break `attnbench list`
            return None, f"xformers failed to import: {type(error).__name__}: {error}"
    # xformers logs why its compiled kernels did not load (e.g. built for another torch).
    problem = " ".join(" ".join(messages).split())
    problem = re.sub(r"^WARNING\[XFORMERS\]:\s*", "", problem).split(" Please reinstall")[0]
    return xformers_ops, f"xformers: {problem}" if problem else ""


@functools.cache
def _refusals(
    xformers_ops: ModuleType,
    device: str,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    causal: bool,
    backward: bool,
    fewer_queries: bool,
) -> tuple[str, ...]:
    """xformers' reasons for refusing a tiny call of this kind, each with the operators refusing it."""
    groups = heads // kv_heads

    def tiny(count: int, rows: int) -> torch.Tensor:  # (1, heads, rows, D), like the harness's inputs
        return torch.zeros(1, count, rows, head_dim, dtype=dtype, device=device, requires_grad=backward)

    q = _query_layout(tiny(heads, 4 if fewer_queries else 8), groups)
    kv = _key_value_layout(tiny(kv_heads, 8), groups)
    bias = _causal_bias(xformers_ops, causal, fewer_queries)
    try:
        out = xformers_ops.memory_efficient_attention(q, kv, kv, attn_bias=bias)
        if backward:
            out.sum().backward()
    except NotImplementedError as error:
        return _parse_refusal(str(error))
    return ()


def _parse_refusal(message: str) -> tuple[str, ...]:
    """Turn xformers' "No operator found ... `op` is not supported because: ..." into reasons."""
    operators_by_reason: dict[str, list[str]] = {}
    operator = None
    for line in message.splitlines():
        header = re.match(r"\s*`(.+)` is not supported because:", line)
        if header:
            operator = header.group(1)
        elif operator and line.startswith("    ") and line.strip():
            operators_by_reason.setdefault(line.strip(), []).append(operator)
    if not operators_by_reason:
        return (" ".join(message.split()),)
    return tuple(f"{reason} [xformers {', '.join(ops)}]" for reason, ops in operators_by_reason.items())


@contextmanager
def _captured_log(name: str) -> Iterator[list[str]]:
    """Collect what the named logger says, instead of letting it print to stderr."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(XformersAttention())
