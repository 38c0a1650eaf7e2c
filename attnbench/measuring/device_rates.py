"""The device's matmul and copy rates: the yardsticks for attention's FLOP/s and bytes moved
(measured in workers, the best kept)."""

from __future__ import annotations

import torch
from torch.utils import benchmark

from attnbench.contract.case import DTYPES

# Square matmuls this large run near the device's best sustained rate without taking long; which
# size is fastest depends on the caches, so the best is the rate. Tried smallest first: a size
# whose one call would outlast its share of the time at the best rate so far is left out (a
# dtype without fast kernels, float16 on many CPUs, runs at a hundredth of the rate).
SIZES = {"cpu": (256, 1024, 2048), "cuda": (1024, 4096, 8192), "mps": (1024, 2048, 4096)}
# Copies this large go through memory, not a cache (a GPU's L2 and a CPU's last level are smaller).
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30, "mps": 512 * 2**20}


def matmul_flops(device: str, dtype_name: str, min_run_time_s: float = 1.0) -> float:
    """FLOP/s of an n×n by n×n matmul (2n³ FLOPs), in the fastest of torch.utils.benchmark's
    blocks: a peak rate, with this process's torch threads. The runner measures it in workers,
    again and again during a run, and keeps the best (attnbench.execution.yardsticks)."""
    sizes = SIZES.get(device.split(":")[0], SIZES["cpu"])
    share_s = min_run_time_s / len(sizes)
    best = 0.0
    for n in sizes:
        if best and 2.0 * n**3 / best > share_s:
            break
        best = max(best, _matmul_rate(device, DTYPES[dtype_name], n, share_s))
    return best


def copy_bytes_per_s(device: str, dtype_name: str, min_run_time_s: float = 0.5) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of a large tensor,
    in the fastest of torch.utils.benchmark's blocks: the memory bandwidth a kernel can reach."""
    dtype = DTYPES[dtype_name]
    elements = COPY_BYTES.get(device.split(":")[0], COPY_BYTES["cpu"]) // dtype.itemsize
    source = torch.ones(elements, dtype=dtype, device=device)
    target = torch.empty_like(source)
    seconds = _fastest("target.copy_(source)", {"target": target, "source": source}, min_run_time_s)
    return 2.0 * elements * dtype.itemsize / seconds


def _matmul_rate(device: str, dtype: torch.dtype, n: int, min_run_time_s: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2.0 * n**3 / _fastest("torch.mm(a, b)", {"torch": torch, "a": a, "b": b}, min_run_time_s)


def _fastest(statement: str, names: dict[str, object], min_run_time_s: float) -> float:
    # With the threads the attention calls get: Timer's default of one thread would halve the yardstick.
    timer = benchmark.Timer(statement, globals=names, num_threads=torch.get_num_threads())
    return min(timer.blocked_autorange(min_run_time=min_run_time_s).times)
