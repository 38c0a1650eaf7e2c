"""Work counts: the FLOPs of exact attention, and the key of a device's matmul yardstick."""

from __future__ import annotations

from attnbench.contract.case import Case
from attnbench.contract.work import exact_attention


def attention_flops(case: Case) -> float:
    """4·B·H·N²·D forward (two matmuls), halved when causal; a training step counts 3.5× the
    forward (as FlashAttention's benchmarks count): attnbench.contract.work.exact_attention."""
    return exact_attention(case).flops


def matmul_key(device: str, dtype_name: str, slot: str = "") -> str:
    """E.g. "cpu/float32"; on a cluster the node (and GPU) comes first: "host/1a2b3c4d|cpu/float32"."""
    return f"{slot}|{device}/{dtype_name}" if slot else f"{device}/{dtype_name}"


def slot_of_key(key: str) -> str:
    """The slot in a key matmul_key made; empty for the machine that started the run."""
    return key.partition("|")[0] if "|" in key else ""
