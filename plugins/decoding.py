"""What the built-in exact implementations share for inference shapes: a KV cache whose new-token
slots every decode step overwrites, and the bottom-right causal mask of fewer queries than keys.
"""

from __future__ import annotations

import torch

import attnbench
from attnbench import AttentionFn, Case


class SlotCache:
    """The cached keys and values followed by ``q_len`` slots for a step's new tokens.

    Each step writes its tokens into the same slots, as a serving engine appends to a cache
    preallocated for them, so every step attends over the same ``seq_len + q_len`` keys.
    """

    def __init__(self, case: Case, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        shape = (case.batch, case.kv_heads, case.key_len, case.head_dim)
        self.k = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
        self.v = torch.empty(shape, dtype=v_cache.dtype, device=v_cache.device)
        self.k[:, :, : case.seq_len] = k_cache
        self.v[:, :, : case.seq_len] = v_cache
        self.cached = case.seq_len

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's keys and values written into their slots; the whole cache returned."""
        self.k[:, :, self.cached:] = k
        self.v[:, :, self.cached:] = v
        return self.k, self.v


def cached_step(case: Case, k_cache: torch.Tensor, v_cache: torch.Tensor,
                attention: AttentionFn) -> attnbench.DecodeStep:
    """A decode step that writes its tokens into a SlotCache, then runs ``attention`` (prepared
    for the case: its q_len queries over all key_len keys) over the whole cache."""
    cache = SlotCache(case, k_cache, v_cache)
    return lambda q, k, v: attention(q, *cache.append(k, v))


def lower_right_allowed(case: Case) -> torch.Tensor | None:
    """(query_len, key_len) bool, True where a query may attend (query i sees keys up to
    key_len − query_len + i); None when every query sees every key (not causal, or one query)."""
    if not case.causal or case.query_len == 1:
        return None
    queries, keys = case.query_len, case.key_len
    return torch.ones(queries, keys, dtype=torch.bool, device=case.device).tril_(keys - queries)
