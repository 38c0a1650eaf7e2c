"""sparse: sliding-window attention with optional global tokens (the Longformer / BigBird family:
Beltagy et al., 2020; Zaheer et al., 2020).

Query i attends to key j when |i − j| <= window (causal: 0 <= i − j <= window), or when either
is one of the first ``global_tokens`` positions (global tokens attend everywhere and are
attended by all). Softmax attention is exact on that pattern; against full attention it is an
approximation, and both errors are reported (the first is judged: a bug otherwise).

Two computations, neither ever forming an N×N matrix, not even a masked one:

- ``flex``: torch's FlexAttention, compiled in ``prepare``, with a block mask built here from the
  pattern block by block (torch's create_block_mask evaluates all N² pairs: 16 GiB and 40 s
  at N=32768 on this CPU). FlexAttention has no backward on the CPU.
- ``blocked``: plain PyTorch. The sequence is cut into blocks; each query block meets the
  key blocks its window can reach, (B, H, N/b, b, span) scores with span ≈ 2·window + b, plus
  a column per global token, under one softmax; global tokens' own rows are full attention.

Fewer queries than keys (chunked prefill, a decode step) read only the keys those queries can
see: the global tokens' and the last window before the first query; a decode step keeps only
those between steps, so its time and state do not grow with the cache.

``backend: auto`` takes flex where it runs (forward on any device, training on CUDA: its fused
kernel skips the blocks outside the window and never holds a block's scores) and blocked
otherwise, or when compilation is unavailable; the row then carries the note why. The two cut
the sequence into blocks of their own sizes (``flex_block_size``, ``block_size``).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import attnbench
from attnbench import AttentionFn, Case
from attnbench.contract.work import banded_pairs, timed_call
from attnbench.measuring.reference import softmax_attention

BACKENDS = ("auto", "flex", "blocked")
FLEX_CPU_BACKWARD = "FlexAttention has no backward on the CPU"
# The flex block mask's block per device type. On the CPU, blocks of 64 skip more of the pairs
# outside the window than 128 do, and run faster at every length measured (benchmarks/
# before_after.py); GPU kernels tile queries by up to 128 rows and require the block to be a
# multiple of their tile.
FLEX_BLOCK_SIZE = {"cpu": 64, "default": 128}


@dataclass(frozen=True)
class SlidingWindow:
    """Which (query, key) pairs attend: the window, the global tokens, and causality."""

    window: int
    global_tokens: int
    causal: bool

    def allows(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Elementwise over broadcast position tensors (also FlexAttention's mask_mod)."""
        offset = query - key
        near = (offset <= self.window) & (offset >= -self.window)
        if self.global_tokens:
            near = near | (query < self.global_tokens) | (key < self.global_tokens)
        return near & (offset >= 0) if self.causal else near

    def mask_mod(self, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return self.allows(query, key)


class SparseAttention(attnbench.Implementation):
    name = "sparse"
    description = "sliding-window attention (±window) with optional global tokens, exact on its pattern"
    exact = False
    time_complexity = "n"  # n·window
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "1"  # window + global keys, whatever n
    decode_memory_complexity = "1"  # the last window of the cache and the global tokens' keys
    # block_size: the blocked backend's blocks; flex_block_size: the flex block mask's (None:
    # FLEX_BLOCK_SIZE for the case's device).
    default_options = {"window": 256, "global_tokens": 0, "backend": "auto", "block_size": 128,
                       "flex_block_size": None}

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        problems = {}
        for key, minimum in (("window", 0), ("global_tokens", 0), ("block_size", 16)):
            if options[key] < minimum:
                problems[key] = f"must be at least {minimum}, got {options[key]}"
        flex_block = options["flex_block_size"]
        if flex_block is not None and (type(flex_block) is not int or flex_block < 16):
            problems["flex_block_size"] = f"must be null (per device) or an integer of at least 16, got {flex_block!r}"
        if options["backend"] not in BACKENDS:
            problems["backend"] = f"unknown backend {options['backend']!r} (allowed: {', '.join(BACKENDS)})"
        return problems

    def flops(self, case: Case, options: Mapping[str, Any]) -> attnbench.FlopCount:
        """Exact attention on the pattern's P (query, key) pairs: 4·B·H·P·D (the blocked backend's
        padding is not counted: it shows as a lower throughput)."""
        if case.query_len < case.key_len:
            pairs = int(VisibleKeys(_pattern(case, options), case).allowed.sum())
        else:
            pairs = banded_pairs(case.seq_len, options["window"], case.causal, options["global_tokens"])
        return timed_call(case, 4.0 * case.batch * case.heads * pairs * case.head_dim,
                          f"4·B·H·P·D, P={pairs} pairs (window {options['window']}, "
                          f"{options['global_tokens']} global)")

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        pattern = _pattern(case, options)
        if case.chunked:
            return VisibleKeys(pattern, case).attention
        backend = options["backend"]
        flex_refusal = _flex_refusal(case)
        if backend == "flex" and flex_refusal:
            raise attnbench.NotSupported(f"backend=flex: {flex_refusal} (supported: backend blocked or auto)")
        if backend == "flex" or (backend == "auto" and not flex_refusal):
            block = _flex_block_size(case, options["flex_block_size"])
            try:
                return compiled_flex(case, window_block_mask(pattern, case.seq_len, block, case.device))
            except Exception as error:  # no compiler here: in auto mode, say so and fall back
                if backend == "flex":
                    raise
                reason = f"FlexAttention unavailable ({type(error).__name__}: {error}); using the blocked path"
                warnings.warn(reason, stacklevel=1)  # stays attributed to this module: a note on the row
        elif backend == "auto":
            warnings.warn(f"blocked path: {flex_refusal}", stacklevel=1)  # stays attributed to this module
        return _blocked(case, pattern, options["block_size"])

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        """Keeps only the cached keys a new token can see (the last window and the global tokens)
        and slots for the new tokens; a step writes its tokens there and attends over them all."""
        visible = VisibleKeys(_pattern(case, options), case)
        k_kept, v_kept = visible.cached(k_cache), visible.cached(v_cache)
        del k_cache, v_cache  # the rest of the cache is not kept

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_kept[:, :, -case.query_len:] = k
            v_kept[:, :, -case.query_len:] = v
            return visible.attend(q, k_kept, v_kept)

        return step

    def step_bytes(self, case: Case, options: Mapping[str, Any]) -> attnbench.ByteCount:
        """The kept keys and values (the window, the global tokens, the new tokens), the queries
        and the output."""
        kept = len(VisibleKeys(_pattern(case, options), case).positions)
        b, h, kv, q, d, size = case.batch, case.heads, case.kv_heads, case.query_len, case.head_dim, case.dtype.itemsize
        return attnbench.ByteCount(size * (2.0 * b * kv * kept * d + 2.0 * b * h * q * d),
                                   f"(2·B·KV·K·D + 2·B·H·q·D) × {size} bytes, K={kept} keys kept")

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax attention under exactly this pattern, in float64 (blockwise, never N×N)."""
        return softmax_attention(q, k, v, rows, causal=False, mask=_pattern(case, options).allows).out


def _pattern(case: Case, options: Mapping[str, Any]) -> SlidingWindow:
    return SlidingWindow(options["window"], min(options["global_tokens"], case.key_len), case.causal)


class VisibleKeys:
    """For fewer queries than keys (the last positions: a chunk, a decode step's new tokens): the
    key positions any of them can see, in order, and which each query sees among them. The work
    is then q × (window + q + global), whatever the number of keys before."""

    def __init__(self, pattern: SlidingWindow, case: Case) -> None:
        first_query, keys = case.key_len - case.query_len, case.key_len
        if first_query < pattern.global_tokens:  # a global token's row sees every key
            ranges = [(0, keys)]
        else:
            ranges = [(0, pattern.global_tokens), (max(pattern.global_tokens, first_query - pattern.window), keys)]
        self.ranges = [(start, stop) for start, stop in ranges if stop > start]
        self.positions = torch.cat([torch.arange(start, stop) for start, stop in self.ranges])
        queries = torch.arange(first_query, keys)
        self.allowed = pattern.allows(queries.unsqueeze(1), self.positions.unsqueeze(0)).to(case.device)
        self.cached_len = case.seq_len
        self.grouped = case.kv_heads != case.heads

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, KV, N, D) -> (B, KV, K, D): the visible positions."""
        parts = [x[:, :, start:stop] for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def cached(self, cache: torch.Tensor) -> torch.Tensor:
        """A decode step's kept keys (or values): the visible cached positions, then empty slots
        for the new tokens (the last positions, beyond the cache)."""
        batch, kv_heads, _, dim = cache.shape
        kept = torch.empty(batch, kv_heads, len(self.positions), dim, dtype=cache.dtype, device=cache.device)
        cached = int((self.positions < self.cached_len).sum())
        kept[:, :, :cached] = cache[:, :, self.positions[:cached].to(cache.device)]
        return kept

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q over the visible keys and values (already gathered), under the pattern."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, enable_gqa=self.grouped)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Chunked prefill: every key is given; only the visible ones are read."""
        return self.attend(q, self.gather(k), self.gather(v))


def _flex_block_size(case: Case, option: int | None) -> int:
    return FLEX_BLOCK_SIZE.get(case.device_type, FLEX_BLOCK_SIZE["default"]) if option is None else option


def _flex_refusal(case: Case) -> str | None:
    if case.backward and case.device_type == "cpu":
        return FLEX_CPU_BACKWARD
    return None


def compiled_flex(case: Case, block_mask: Any) -> AttentionFn:
    """FlexAttention under ``block_mask`` (None: every pair), compiled for the case's shapes."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    grouped = case.kv_heads != case.heads

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=grouped)

    # Compile now, outside the timer, on inputs of the case's shapes (and its backward if needed).
    def zeros(heads: int) -> torch.Tensor:
        shape = (case.batch, heads, case.seq_len, case.head_dim)
        return torch.zeros(shape, dtype=case.dtype, device=case.device, requires_grad=case.backward)

    # Compile in this thread: a pool of compile workers would outlive the compile and run beside
    # the timed calls.
    _quiet_progress_bars()
    with torch._inductor.config.patch(compile_threads=1):
        out = attention(zeros(case.heads), zeros(case.kv_heads), zeros(case.kv_heads))
        if case.backward:
            out.sum().backward()
    return attention


def _quiet_progress_bars() -> None:
    """torch's compiler opens tqdm progress bars, disabled ones too, for which tqdm would start a
    monitor thread (awake beside the timed calls) and a multiprocessing lock (a semaphore the
    worker process leaks): no monitor, and a thread lock instead."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.monitor_interval = 0
    tqdm.set_lock(threading.RLock())


def window_block_mask(pattern: SlidingWindow, seq_len: int, block: int, device: str):
    """FlexAttention's BlockMask for the pattern, from the key blocks each query block can reach.

    Only candidate block pairs are evaluated (the window's neighbours, the global tokens'
    blocks, and every block for rows of global tokens), so building it costs O(N·window), not
    O(N²). A pair is "full" when every position pair in it attends, "partial" otherwise.
    """
    from torch.nn.attention.flex_attention import BlockMask

    blocks = math.ceil(seq_len / block)
    reach = math.ceil(pattern.window / block)
    global_blocks = math.ceil(pattern.global_tokens / block)
    partial: list[list[int]] = []
    full: list[list[int]] = []
    for row_block in range(blocks):
        candidates = set(range(max(0, row_block - reach), min(blocks, row_block + reach + 1)))
        candidates |= set(range(global_blocks))
        if row_block * block < pattern.global_tokens:
            candidates = set(range(blocks))
        queries = torch.arange(row_block * block, min(seq_len, (row_block + 1) * block)).unsqueeze(1)
        row_partial, row_full = [], []
        for key_block in sorted(candidates):
            keys = torch.arange(key_block * block, min(seq_len, (key_block + 1) * block)).unsqueeze(0)
            allowed = pattern.allows(queries, keys)
            if bool(allowed.all()) and allowed.numel() == block * block:
                row_full.append(key_block)
            elif bool(allowed.any()):
                row_partial.append(key_block)
        partial.append(row_partial)
        full.append(row_full)

    def as_tensors(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.tensor([len(row) for row in lists], dtype=torch.int32, device=device).view(1, 1, blocks)
        indices = torch.zeros(1, 1, blocks, blocks, dtype=torch.int32, device=device)
        for row, columns in enumerate(lists):
            indices[0, 0, row, : len(columns)] = torch.tensor(columns, dtype=torch.int32, device=device)
        return counts, indices

    partial_counts, partial_indices = as_tensors(partial)
    full_counts, full_indices = as_tensors(full)
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=block, mask_mod=pattern.mask_mod, seq_lengths=(seq_len, seq_len),
    )


def _blocked(case: Case, pattern: SlidingWindow, block: int) -> AttentionFn:
    """Banded blocks in plain PyTorch; see the module docstring."""
    seq_len, groups = case.seq_len, case.heads // case.kv_heads
    block = min(block, seq_len)
    blocks = math.ceil(seq_len / block)
    left = math.ceil(pattern.window / block)
    right = 0 if pattern.causal else left
    span = (left + 1 + right) * block
    pad = blocks * block - seq_len
    glob = pattern.global_tokens
    scale = case.head_dim**-0.5

    # Masks, built once: (N/b, b, span) for the band, (N/b, b, g) for the global columns.
    queries = torch.arange(blocks * block).view(blocks, block, 1)
    keys = (torch.arange(blocks) * block - left * block).view(blocks, 1, 1) + torch.arange(span).view(1, 1, span)
    in_range = (keys >= glob) & (keys < seq_len)  # global keys get their own columns
    band = (pattern.allows(queries, keys) & in_range) | ((queries >= seq_len) & in_range)  # padded rows: any
    outside_band = (~band).to(case.device)
    outside_globals = (~pattern.allows(queries, torch.arange(glob).view(1, 1, glob))).to(case.device)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = q.shape
        q5 = F.pad(q, (0, 0, 0, pad)).view(batch, heads // groups, groups, blocks, block, dim)
        k_windows = _windows(k, left * block, right * block + pad, span, block)  # (B, KV, 1, N/b, span, D)
        v_windows = _windows(v, left * block, right * block + pad, span, block)
        scores = (q5 * scale) @ k_windows.transpose(-1, -2)  # (B, KV, G, N/b, b, span)
        scores.masked_fill_(outside_band, float("-inf"))  # in place: no second (N × span) tensor
        if glob:
            k_glob, v_glob = k[:, :, None, None, :glob], v[:, :, None, None, :glob]  # (B, KV, 1, 1, g, D)
            glob_scores = ((q5 * scale) @ k_glob.transpose(-1, -2)).masked_fill_(outside_globals, float("-inf"))
            weights = torch.cat([scores, glob_scores], dim=-1).softmax(dim=-1)
            out = weights[..., :span] @ v_windows + weights[..., span:] @ v_glob
        else:
            out = scores.softmax(dim=-1) @ v_windows
        out = out.view(batch, heads, blocks * block, dim)[:, :, :seq_len]
        if glob:  # global tokens' rows attend to every key (every earlier key when causal)
            rows = F.scaled_dot_product_attention(q[:, :, :glob], k, v, is_causal=pattern.causal, enable_gqa=groups > 1)
            out = torch.cat([rows, out[:, :, glob:]], dim=-2)
        return out

    return attention


def _windows(x: torch.Tensor, before: int, after: int, span: int, step: int) -> torch.Tensor:
    """(B, KV, N, D) -> (B, KV, 1, N/b, span, D): each block's reachable keys (a strided view)."""
    padded = F.pad(x, (0, 0, before, after))
    return padded.unfold(-2, span, step).transpose(-1, -2).unsqueeze(2)


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(SparseAttention())
