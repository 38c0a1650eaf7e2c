"""The device's matmul throughput, measured once per run: the yardstick for attention's FLOP/s."""

from __future__ import annotations

import torch
from torch.utils import benchmark

from attnbench.case import DTYPES

# Square matmuls this large run near the device's best sustained rate without taking long.
SIZE = {"cpu": 2048, "cuda": 8192, "mps": 4096}


def matmul_flops(device: str, dtype_name: str, min_run_time_s: float = 1.0, threads: int | None = None) -> float:
    """FLOP/s of an n×n by n×n matmul (2n³ FLOPs), in the fastest of torch.utils.benchmark's
    blocks: a peak rate. (Separate processes here measured 132 to 179 GFLOP/s by the median.)"""
    n = SIZE.get(device.split(":")[0], 2048)
    dtype = DTYPES[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    # With the threads the attention calls get: Timer's default of one thread would halve the yardstick.
    timer = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                            num_threads=threads or torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    return 2.0 * n**3 / min(measurement.times)
