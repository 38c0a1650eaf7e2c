"""The seam between deciding what runs (the scheduler) and running it (an executor).

A unit of work is plain data: it names its implementation (plugin and name) instead of carrying
the object, so it can run wherever the same plugins are installed. What depends on the machine
(the memory cap, the matmul rate, the environment) is computed by the executor where the work
runs. An executor runs units in any order it likes and hands back each one's outcome as it
finishes; the scheduler turns outcomes into rows (attnbench.measuring.outcome decides statuses).

The local executor (attnbench.execution.local) runs one unit at a time in a forked worker; a
distributed one submits to a cluster and yields results as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from attnbench.contract.case import Case
from attnbench.measuring.correctness import Verifier
from attnbench.measuring.outcome import Outcome
from attnbench.settings.suite import Limits, Measure
from attnbench.storage.environment import Environment


@dataclass(frozen=True)
class ImplementationRef:
    """An implementation by the plugin that registered it and its name."""

    plugin: str
    name: str


@dataclass(frozen=True)
class PointRound:
    """One round of one point: measure ``implementation`` on ``case``."""

    implementation: ImplementationRef
    series: str  # the row's name: the implementation's, or a variant's (attnbench.settings.variants)
    case: Case
    options: Mapping[str, Any]  # the implementation's defaults with the suite's options laid over
    measure: Measure
    limits: Limits  # the memory cap is computed from them where the round runs
    seed: int
    threads: int
    verifier: Verifier | None = None  # round 1's references, for the later rounds
    source_options: Mapping[str, Any] = field(default_factory=dict)  # the case's input source's parameters
    round_index: int = 0  # which of the point's rounds (0-based): each has its own fresh inputs
    rounds: int = 1  # the point's rounds in all


@dataclass(frozen=True)
class YardstickRound:
    """The device's matmul and copy rates, measured in a worker as the points are."""

    device: str
    dtype_name: str
    run_time_s: float
    timeout_s: float
    threads: int


WorkUnit = PointRound | YardstickRound


@dataclass(frozen=True)
class Finished:
    """A unit's outcome (attnbench.measuring.outcome), with what the executor saw of its worker."""

    unit: WorkUnit
    outcome: Outcome
    wall_time_s: float  # worker start to result
    log_tail: str = ""  # the worker's last output, kept for failures
    notes: tuple[str, ...] = ()  # what the executor did about the worker (processes it left, its output)


class Executor(Protocol):
    """Runs units of work. ``finished`` yields each submitted unit's outcome once, as it ends,
    until none is pending; ``cancel`` drops what has not started (a signal stops what has)."""

    def submit(self, unit: WorkUnit) -> None: ...

    def finished(self) -> Iterator[Finished]: ...

    def cancel(self) -> None: ...

    def memory_cap_bytes(self, limits: Limits, device: str) -> int | None:
        """The cap a point on ``device`` will run under (the scheduler predicts against it)."""
        ...

    def memory_cap_held(self, limits: Limits, device: str) -> str:
        """That cap, and how it is held where the points run (for each row)."""
        ...

    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        """What the work runs on: versions, CPU, devices, commit, the protections its workers run under."""
        ...

    def close(self) -> None:
        """Let go of whatever the work left on this machine (scratch folders, input sets)."""
        ...


StartedCallback = Callable[[WorkUnit], None]
