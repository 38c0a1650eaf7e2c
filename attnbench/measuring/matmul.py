"""The device's matmul throughput: the yardstick for attention's FLOP/s (measured in workers, best kept)."""

from __future__ import annotations

import torch
from torch.utils import benchmark

from attnbench.contract.case import DTYPES

# Square matmuls this large run near the device's best sustained rate without taking long; which
# size is fastest depends on the caches, so the best of two is the rate.
SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192), "mps": (2048, 4096)}


def matmul_flops(device: str, dtype_name: str, min_run_time_s: float = 1.0) -> float:
    """FLOP/s of an n×n by n×n matmul (2n³ FLOPs), in the fastest of torch.utils.benchmark's
    blocks: a peak rate, with this process's torch threads. The runner measures it in workers,
    again and again during a run, and keeps the best (attnbench.execution.runner)."""
    sizes = SIZES.get(device.split(":")[0], SIZES["cpu"])
    return max(_rate(device, DTYPES[dtype_name], n, min_run_time_s / len(sizes)) for n in sizes)


def _rate(device: str, dtype: torch.dtype, n: int, min_run_time_s: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    # With the threads the attention calls get: Timer's default of one thread would halve the yardstick.
    timer = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                            num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    return 2.0 * n**3 / min(measurement.times)
