"""A suite's settings, typed and immutable: the sweep, what to measure, the limits.

Worker-side code depends on these alone; attnbench.settings.loader reads them from YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnbench.contract.case import AXES

# The grid: one tuple of values per axis of Case (attnbench.contract.case.AXES), defaulting to
# the axis's own default; every combination is one case. A None axis (kv_heads) takes the value
# of the axis it is the same as. dtypes are named ("float32"), as in the suite file.
Sweep = dataclasses.make_dataclass(
    "Sweep",
    [(name, "tuple[Any, ...] | None", field(default=axis.default)) for name, axis in AXES.items()],
    frozen=True,
)
Sweep.__module__ = __name__  # where pickle finds it


@dataclass(frozen=True)
class CorrectnessSettings:
    # Query rows compared with the float64 reference (all rows when seq_len is not larger), and
    # in training mode as many key rows for dk and dv; drawn afresh for every point.
    rows: int = 256
    # dk and dv at sampled key rows need a float64 pass over every query row (quadratic in N):
    # on as many (batch, kv head) pairs as fit this budget, none when one does not.
    max_reference_gflop: float = 20.0


CACHE_STATES = ("cold", "warm")


@dataclass(frozen=True)
class LatencySettings:
    min_run_time_s: float = 0.5  # adaptive repeats run at least this long (wall time, flushes included)...
    max_run_time_s: float = 10.0  # ...and stop here even when still noisy
    min_samples: int = 3  # topped up to this many samples for slow calls
    # The samples are taken in this many rounds, each in a fresh worker, the case's
    # implementations taking turns, so that a slow spell of the machine or one process's bad
    # luck touches all of them alike. The run times and min_samples are for all rounds together.
    rounds: int = 3
    # On CUDA, "cold": the L2 cache is flushed before each timed call (as triton.testing.do_bench
    # does), so a call is not timed on inputs the previous call left in the cache; "warm": calls
    # back to back. CPU timing is always warm; each row records which it was.
    cache: str = "cold"

    def per_round(self) -> LatencySettings:
        return dataclasses.replace(
            self,
            min_run_time_s=self.min_run_time_s / self.rounds,
            max_run_time_s=self.max_run_time_s / self.rounds,
            min_samples=-(-self.min_samples // self.rounds),
            rounds=1,
        )


@dataclass(frozen=True)
class Measure:
    correctness: CorrectnessSettings | None = CorrectnessSettings()
    latency: LatencySettings | None = LatencySettings()
    memory: bool = True
    # Threads for torch in each worker; None: torch's default (every usable core). One thread
    # is the steadier choice on a small shared machine (see benchmarks/stability.py).
    threads: int | None = None


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 600.0  # per case: the worker is killed after this
    memory_gb: float | None = None  # per case; None: half of RAM on CPU, the device's memory on GPU
    budget_s: float | None = None  # wall time per implementation over the whole run


# Bounds on the relative Frobenius error of the output against float64 exact attention within
# which an approximation is compared with anything (the report's answer, crossovers, plots):
# 1e-2 is about what bfloat16 rounding costs a long sum; 1e-1 a rough sketch of the pattern.
DEFAULT_ERROR_BUDGETS: tuple[float, ...] = (1e-2, 1e-1)
MAX_ERROR_BUDGETS = 4  # columns of the report's answer


@dataclass(frozen=True)
class OptionSweep:
    """An option given several values: one variant of the implementation per value
    (attnbench.settings.variants)."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class ReportSettings:
    error_budgets: tuple[float, ...] = DEFAULT_ERROR_BUDGETS  # ascending


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    description: str = ""
    implementations: tuple[str, ...] = ()
    # implementation -> option -> value, or an OptionSweep of values
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # input source -> parameters
    # The grids whose cases the suite measures: usually one; several when their shapes differ
    # (a model's inputs come in its own heads and head_dim), their cases taken in order.
    sweeps: tuple[Sweep, ...] = (Sweep(),)
    measure: Measure = Measure()
    limits: Limits = Limits()
    report: ReportSettings = ReportSettings()
    seed: int = 0
    output: Path = Path("results")
