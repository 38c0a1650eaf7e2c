"""The yardsticks: the device's matmul rate, against which implausible speed is judged and achieved
FLOP/s are put, and its copy rate (memory bandwidth)."""

from __future__ import annotations

import time
from collections.abc import Mapping

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
    """Matmul FLOP/s and copy bytes/s per (device, dtype) the cases use and this machine has,
    measured in workers (as the points are) before the first case that needs them and again
    between cases; the best so far is the yardstick. ``slot`` names the machine (and GPU) in the
    keys on a cluster (attnbench.storage.results.Where.slot); empty on the machine that started
    the run."""

    def __init__(self, executor: Executor, threads: int, timeout_s: float, stored_flops: Mapping[str, list[float]],
                 stored_copy: Mapping[str, list[float]], slot: str = "") -> None:
        self.executor = executor
        self.keys: list[tuple[str, str]] = []
        self.tried: set[tuple[str, str]] = set()
        self.threads = threads
        self.timeout_s = timeout_s
        self.slot = slot
        self.samples: dict[str, list[float]] = {key: list(values) for key, values in stored_flops.items()}
        self.copy_samples: dict[str, list[float]] = {key: list(values) for key, values in stored_copy.items()}
        self.last = -float("inf")

    @property
    def best(self) -> dict[str, float]:
        """Matmul FLOP/s."""
        return best_of(self.samples)

    @property
    def best_copy(self) -> dict[str, float]:
        """Copy bytes/s."""
        return best_of(self.copy_samples)

    def measure_if_due(self, case: Case) -> None:
        """Before ``case``: its device's yardsticks if they have none yet, and every one when
        YARDSTICK_INTERVAL_S has passed."""
        # float32 on every device too: the ceiling for lower precisions without fast matmuls there
        # (attnbench.storage.flags).
        for pair in ((case.device, case.dtype_name), (case.device, "float32")):
            if pair not in self.keys and device_unavailable_reason(case.device) is None:
                self.keys.append(pair)
        due = time.monotonic() - self.last >= YARDSTICK_INTERVAL_S
        unmeasured = [pair for pair in self.keys if pair not in self.tried]
        if not due and not unmeasured:
            return
        for device, dtype in self.keys if due else unmeasured:
            self.tried.add((device, dtype))
            key = matmul_key(device, dtype, self.slot)
            for _ in range(1 if self.samples.get(key) else YARDSTICK_FIRST_REPEATS):
                self.executor.submit(YardstickRound(device, dtype, YARDSTICK_RUN_TIME_S, self.timeout_s, self.threads))
        for finished in self.executor.finished():
            unit = finished.unit
            if isinstance(finished.outcome, Yardstick) and isinstance(unit, YardstickRound):
                key = matmul_key(unit.device, unit.dtype_name, self.slot)
                self.samples.setdefault(key, []).append(float(f"{finished.outcome.flops:.6g}"))
                self.copy_samples.setdefault(key, []).append(float(f"{finished.outcome.copy_bytes_per_s:.6g}"))
        if due:
            self.last = time.monotonic()


def best_of(samples: Mapping[str, list[float]]) -> dict[str, float]:
    """Each key's best sample: the device's rate, whatever ran beside any one measurement."""
    return {key: max(values) for key, values in samples.items() if values}
