"""Work counts: the FLOPs of exact attention, and the key of a device's matmul yardstick."""

from __future__ import annotations

from attnbench.contract.case import Case


def attention_flops(case: Case) -> float:
    """4·B·H·N²·D forward (two matmuls), halved when causal; backward counts 2.5× forward (as
    FlashAttention's benchmarks count)."""
    forward = 4.0 * case.batch * case.heads * case.seq_len**2 * case.head_dim
    if case.causal:
        forward /= 2
    return forward * (3.5 if case.backward else 1.0)


def matmul_key(device: str, dtype_name: str) -> str:
    return f"{device}/{dtype_name}"
