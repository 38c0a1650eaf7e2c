"""axial: axial attention (Ho et al., "Axial Attention in Multidimensional Transformers", 2019).

The sequence is laid out row-major on a rows × cols grid (the ``shape`` option, or the most
square factorisation of N). Attention runs along each row, then along each column with the
row pass's output as values, so every query reaches every position in two hops:

    out_i = Σ_{j in column(i)} softmax_j(q_i·k_j/√d) · Σ_{l in row(j)} softmax_l(q_j·k_l/√d) v_l.

Each query meets cols + rows keys: time n^1.5. Both passes are fused attention calls on
(rows × cols) views, so no score matrix is stored: memory n. Causal: each pass looks only
backwards (earlier columns, then earlier rows), so a query reaches the positions above and to
its left on the grid, never a later one. Its float64 reference is the same two passes written
out densely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import attnbench
from attnbench import AttentionFn, Case
from attnbench.contract.work import timed_call

MOST_ELONGATED = 16  # a grid with cols > 16 × rows is no longer axial in any useful sense


class AxialAttention(attnbench.Implementation):
    name = "axial"
    description = "axial attention: along the rows of a grid, then along its columns"
    exact = False
    time_complexity = "n^1.5"
    memory_complexity = "n"
    default_options = {"shape": None}  # [rows, cols]; None: the most square factorisation of N
    # Two float32 passes in a row: the row pass's rounding enters the column pass's values and its
    # gradient, so training in float32 lands up to about twice one pass's error (dq has been seen
    # 6% over the default on structured inputs); twice the default, within the harness's cap.
    tolerances = {**attnbench.Implementation.tolerances, torch.float32: attnbench.Tolerance(atol=2e-6, rtol=2e-5)}
    unsupported_because = {
        "chunked_prefill": "its column pass takes the row pass's output at every earlier position, which needs "
                           "their queries, and a chunk brings only its own",
        "decode": "its column pass takes the row pass's output at every earlier position, which needs their "
                  "queries, and a KV cache does not keep them",
    }

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        shape = options["shape"]
        valid = shape is None or (
            isinstance(shape, (list, tuple)) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
        )
        return {} if valid else {"shape": f"expected null or [rows, cols] with positive integers, got {shape!r}"}

    def not_supported_reasons(self, case: Case) -> list[str]:
        rows, cols = most_square_grid(case.seq_len)
        if cols > MOST_ELONGATED * rows:
            what = "is prime" if rows == 1 else f"factors at best as {rows} × {cols}"
            return [
                f"seq_len={case.seq_len} {what}: no useful grid for axial attention "
                f"(supported: N = rows × cols with cols <= {MOST_ELONGATED} × rows, or a shape option)"
            ]
        return []

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        rows, cols = _grid(case, options)
        causal = case.causal
        groups = case.heads // case.kv_heads

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, heads, seq_len, dim = q.shape
            if groups > 1:  # each pass pairs queries and keys of the same head
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            q, k, v = (t.reshape(batch, heads * rows, cols, dim) for t in (q, k, v))
            along_rows = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H·rows, cols, D)

            def by_column(t: torch.Tensor) -> torch.Tensor:  # (B, H·rows, cols, D) -> (B, H·cols, rows, D)
                return t.view(batch, heads, rows, cols, dim).transpose(2, 3).reshape(batch, heads * cols, rows, dim)

            along_columns = F.scaled_dot_product_attention(by_column(q), by_column(k), by_column(along_rows),
                                                           is_causal=causal)
            return along_columns.view(batch, heads, cols, rows, dim).transpose(2, 3).reshape(batch, heads, seq_len, dim)

        return attention

    def flops(self, case: Case, options: Mapping[str, Any]) -> attnbench.FlopCount:
        """Each query meets the cols keys of its row, then the rows keys of its column:
        4·B·H·N·(rows+cols)·D; causal, each pass looks back only: 2·B·H·N·(rows+cols+2)·D."""
        rows, cols = _grid(case, options)
        b, h, n, d = case.batch, case.heads, case.seq_len, case.head_dim
        if case.causal:
            return timed_call(case, 2.0 * b * h * n * (rows + cols + 2) * d,
                              f"2·B·H·N·(rows+cols+2)·D, grid {rows}×{cols}")
        return timed_call(case, 4.0 * b * h * n * (rows + cols) * d, f"4·B·H·N·(rows+cols)·D, grid {rows}×{cols}")

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The two passes with explicit softmax matrices, in float64: (rows × cols²) + (S × rows) scores."""
        grid_rows, grid_cols = _grid(case, options)
        groups = case.heads // case.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        batch, heads, _, dim = q.shape
        scale = dim**-0.5
        grid = [t.reshape(batch, heads, grid_rows, grid_cols, dim) for t in (q, k, v)]
        qg, kg, vg = grid
        row_scores = (qg @ kg.transpose(-1, -2)) * scale  # (B, H, rows, cols, cols)
        if case.causal:
            later = torch.ones(grid_cols, grid_cols, dtype=torch.bool).triu(1)
            row_scores = row_scores.masked_fill(later, float("-inf"))
        along_rows = row_scores.softmax(dim=-1) @ vg  # (B, H, rows, cols, D)
        query_row, query_col = rows // grid_cols, rows % grid_cols  # the sampled queries on the grid
        column_keys = kg[:, :, :, query_col].transpose(2, 3)  # (B, H, S, rows, D): each query's column
        column_values = along_rows[:, :, :, query_col].transpose(2, 3)
        queries = q[:, :, rows].unsqueeze(-2)  # (B, H, S, 1, D)
        column_scores = (queries @ column_keys.transpose(-1, -2)).squeeze(-2) * scale  # (B, H, S, rows)
        if case.causal:
            column_scores = column_scores.masked_fill(torch.arange(grid_rows) > query_row.unsqueeze(-1),
                                                      float("-inf"))
        return (column_scores.softmax(dim=-1).unsqueeze(-2) @ column_values).squeeze(-2)


def most_square_grid(seq_len: int) -> tuple[int, int]:
    """(rows, cols) with rows · cols = N and rows the largest divisor not above √N."""
    rows = next(d for d in range(math.isqrt(seq_len), 0, -1) if seq_len % d == 0)
    return rows, seq_len // rows


def _grid(case: Case, options: Mapping[str, Any]) -> tuple[int, int]:
    if options["shape"] is None:
        return most_square_grid(case.seq_len)
    rows, cols = options["shape"]
    if rows * cols != case.seq_len:
        raise attnbench.NotSupported(
            f"shape=[{rows}, {cols}] does not tile seq_len={case.seq_len} (supported: rows × cols = N)"
        )
    return rows, cols


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(AxialAttention())
