"""Which points not to run: the rows measured so far per scaling curve predict a point's cost."""

from __future__ import annotations

from collections import defaultdict

from attnbench.contract.case import CURVE_LABEL, Case, curve_x, group_key
from attnbench.contract.implementation import Implementation, complexity_of_shape
from attnbench.execution.predict import extrapolate
from attnbench.settings.suite import Limits
from attnbench.storage.results import Row
from attnbench.support.units import format_bytes


class SkipPredictor:
    """The rows measured so far per scaling curve, and the time spent per implementation."""

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

    def skip_reason(self, name: str, implementation: Implementation, case: Case, memory_cap: int | None) -> str | None:
        """Why the series ``name`` (running ``implementation``) should not run ``case``; None: run it."""
        earlier = self.rows[(name, group_key(case))]
        budget = self.limits.budget_s
        if budget is not None and self.spent_s[name] >= budget:
            return f"time budget of {budget:g} s for {name} is spent ({self.spent_s[name]:.0f} s)"
        for previous in earlier:
            if previous.status in ("oom", "timeout") and curve_x(previous.case) < curve_x(case):
                return f"the smaller {CURVE_LABEL}={curve_x(previous.case)} already ended as {previous.status}"

        memory_points = [(curve_x(r.case), r.memory.peak_bytes) for r in earlier if r.memory and r.memory.peak_bytes]
        _, memory_exponent = complexity_of_shape(implementation, "memory", case)
        _, time_exponent = complexity_of_shape(implementation, "latency", case)
        memory = extrapolate(memory_points, curve_x(case), memory_exponent) if memory_exponent is not None else None
        if memory and memory_cap is not None and memory.value > memory_cap:
            return (f"predicted peak memory {format_bytes(memory.value)} > memory cap "
                    f"{format_bytes(memory_cap)} ({memory.basis})")

        latency_points = [(curve_x(r.case), r.latency.median_s) for r in earlier if r.latency]
        latency = extrapolate(latency_points, curve_x(case), time_exponent) if time_exponent is not None else None
        if latency:
            point_s = latency.value * self.calls_per_point
            if point_s > self.limits.timeout_s:
                return (f"predicted to take >= {point_s:.0f} s ({self.calls_per_point} calls of "
                        f"{latency.value:.3g} s, {latency.basis}) > case timeout {self.limits.timeout_s:g} s")
            if budget is not None and self.spent_s[name] + point_s > budget:
                return (f"time budget: {self.spent_s[name]:.0f} s of {budget:g} s spent for {name}, and this "
                        f"point is predicted to take >= {point_s:.0f} s ({latency.basis})")
        return None
