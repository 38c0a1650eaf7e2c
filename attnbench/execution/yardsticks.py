"""The yardsticks: the device's matmul rate, against which implausible speed is judged and achieved
FLOP/s are put, and its copy rate (memory bandwidth)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from attnbench.contract.case import Case, device_unavailable_reason
from attnbench.execution.executor import Executor, YardstickRound
from attnbench.measuring.flops import matmul_key
from attnbench.measuring.outcome import Yardstick

# The yardstick is measured again before a case once this long has passed since the last time:
# the best of the run is the device's rate, whatever was running at any one moment.
YARDSTICK_INTERVAL_S = 30.0
YARDSTICK_RUN_TIME_S = 0.5
YARDSTICK_FIRST_REPEATS = 3  # before the first point: one disturbed measurement must not be the yardstick


class Yardsticks:
    """Matmul FLOP/s and copy bytes/s per (device, dtype) the sweep uses and this machine has,
    measured in workers (as the points are) at the start and again between cases; the best so far
    is the yardstick."""

    def __init__(self, executor: Executor, cases: Sequence[Case], threads: int, timeout_s: float,
                 stored_flops: dict[str, list[float]], stored_copy: dict[str, list[float]]) -> None:
        self.executor = executor
        # float32 on every device too: the ceiling for lower precisions without fast matmuls there
        # (attnbench.storage.flags).
        pairs = [pair for case in cases for pair in ((case.device, case.dtype_name), (case.device, "float32"))]
        self.keys = [(device, dtype) for device, dtype in dict.fromkeys(pairs)
                     if device_unavailable_reason(device) is None]
        self.threads = threads
        self.timeout_s = timeout_s
        self.samples: dict[str, list[float]] = {key: list(values) for key, values in stored_flops.items()}
        self.copy_samples: dict[str, list[float]] = {key: list(values) for key, values in stored_copy.items()}
        self.last = -float("inf")

    @property
    def best(self) -> dict[str, float]:
        """Matmul FLOP/s."""
        return _best(self.samples)

    @property
    def best_copy(self) -> dict[str, float]:
        """Copy bytes/s."""
        return _best(self.copy_samples)

    def measure_if_due(self) -> None:
        if time.monotonic() - self.last < YARDSTICK_INTERVAL_S:
            return
        for device, dtype in self.keys:
            key = matmul_key(device, dtype)
            for _ in range(1 if self.samples.get(key) else YARDSTICK_FIRST_REPEATS):
                self.executor.submit(YardstickRound(device, dtype, YARDSTICK_RUN_TIME_S, self.timeout_s, self.threads))
        for finished in self.executor.finished():
            unit = finished.unit
            if isinstance(finished.outcome, Yardstick) and isinstance(unit, YardstickRound):
                key = matmul_key(unit.device, unit.dtype_name)
                self.samples.setdefault(key, []).append(float(f"{finished.outcome.flops:.6g}"))
                self.copy_samples.setdefault(key, []).append(float(f"{finished.outcome.copy_bytes_per_s:.6g}"))
        self.last = time.monotonic()


def _best(samples: dict[str, list[float]]) -> dict[str, float]:
    return {key: max(values) for key, values in samples.items() if values}
