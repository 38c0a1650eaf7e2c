"""Which points not to run: the rows measured so far per scaling curve predict a point's cost."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from attnbench.contract.case import CURVE_LABEL, Case, curve_x, group_key
from attnbench.contract.implementation import Implementation, complexity_of_shape
from attnbench.execution.predict import Prediction, extrapolate
from attnbench.settings.suite import Limits
from attnbench.storage.results import Row
from attnbench.support.units import format_bytes

# A point may start before a smaller one of its curve has finished only when what has finished
# predicts it well inside the limits: this fraction of the memory cap and of the case timeout.
COMFORTABLE_FRACTION = 0.25


@dataclass(frozen=True)
class _Predicted:
    memory: Prediction | None  # peak bytes
    latency: Prediction | None  # one call's seconds
    point_s: float | None  # the whole point's calls


class SkipPredictor:
    """The rows measured so far per scaling curve and device, and the time spent per implementation."""

    def __init__(self, limits: Limits, samples_per_point: int, rounds: int) -> None:
        self.limits = limits
        # A point makes at least: per round a first call, a block-size estimate and a call on
        # fresh inputs, the samples, and the memory call.
        self.calls_per_point = samples_per_point + 3 * rounds + 1
        self.rows: dict[tuple[str, Case], list[Row]] = defaultdict(list)
        self.spent_s: dict[str, float] = defaultdict(float)

    def record(self, row: Row) -> None:
        self.rows[(row.implementation, group_key(row.case))].append(row)
        self.spent_s[row.implementation] += row.wall_time_s

    def skip_reason(self, name: str, implementation: Implementation, case: Case, memory_cap: int | None,
                    device_name: str = "") -> str | None:
        """Why the series ``name`` (running ``implementation``) should not run ``case`` on the
        device called ``device_name`` (its curve's points on other devices do not count); None: run it."""
        earlier = self._earlier(name, case, device_name)
        budget = self.limits.budget_s
        if budget is not None and self.spent_s[name] >= budget:
            return f"time budget of {budget:g} s for {name} is spent ({self.spent_s[name]:.0f} s)"
        for previous in earlier:
            if previous.status in ("oom", "timeout") and curve_x(previous.case) < curve_x(case):
                return f"the smaller {CURVE_LABEL}={curve_x(previous.case)} already ended as {previous.status}"
        predicted = self._predict(implementation, case, earlier)
        memory = predicted.memory
        if memory and memory_cap is not None and memory.value > memory_cap:
            return (f"predicted peak memory {format_bytes(memory.value)} > memory cap "
                    f"{format_bytes(memory_cap)} ({memory.basis})")
        latency, point_s = predicted.latency, predicted.point_s
        if latency and point_s is not None:
            if point_s > self.limits.timeout_s:
                return (f"predicted to take >= {point_s:.0f} s ({self.calls_per_point} calls of "
                        f"{latency.value:.3g} s, {latency.basis}) > case timeout {self.limits.timeout_s:g} s")
            if budget is not None and self.spent_s[name] + point_s > budget:
                return (f"time budget: {self.spent_s[name]:.0f} s of {budget:g} s spent for {name}, and this "
                        f"point is predicted to take >= {point_s:.0f} s ({latency.basis})")
        return None

    def comfortably_within_limits(self, name: str, implementation: Implementation, case: Case,
                                  memory_cap: int | None, device_name: str = "") -> bool:
        """Whether what has finished predicts the point far inside its limits, so that it need not
        wait for a smaller point of its curve still running (on a cluster)."""
        predicted = self._predict(implementation, case, self._earlier(name, case, device_name))
        if predicted.point_s is None or predicted.point_s > COMFORTABLE_FRACTION * self.limits.timeout_s:
            return False
        if memory_cap is None:
            return True
        return predicted.memory is not None and predicted.memory.value <= COMFORTABLE_FRACTION * memory_cap

    def _earlier(self, name: str, case: Case, device_name: str) -> list[Row]:
        return [row for row in self.rows[(name, group_key(case))]
                if row.where is None or not device_name or row.where.device_name == device_name]

    def _predict(self, implementation: Implementation, case: Case, earlier: list[Row]) -> _Predicted:
        memory_points = [(curve_x(r.case), r.memory.peak_bytes) for r in earlier if r.memory and r.memory.peak_bytes]
        _, memory_exponent = complexity_of_shape(implementation, "memory", case)
        _, time_exponent = complexity_of_shape(implementation, "latency", case)
        memory = extrapolate(memory_points, curve_x(case), memory_exponent) if memory_exponent is not None else None
        latency_points = [(curve_x(r.case), r.latency.median_s) for r in earlier if r.latency]
        latency = extrapolate(latency_points, curve_x(case), time_exponent) if time_exponent is not None else None
        return _Predicted(memory, latency, latency.value * self.calls_per_point if latency else None)
