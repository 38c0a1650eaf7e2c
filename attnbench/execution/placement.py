"""Where cases run: the slots a sweep's cases are placed on, and what comes back from them.

A slot runs one case at a time (attnbench.execution.cases.CaseRunner): this machine, or on a
cluster one GPU, or one whole node for CPU cases. The dispatcher (attnbench.execution.dispatch)
decides which case goes to which idle slot; a placement starts it there and hands back, one at a
time and as they come, each row, each case's end and each slot it lost.

This machine is a placement with one slot, running each case in this process: the local executor
forks a worker per round. The Ray placement (attnbench.execution.distributed) has a slot per GPU
or node of a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from attnbench.execution.cases import CaseEnd, CaseRunner, CaseWork, where_on
from attnbench.execution.executor import Executor
from attnbench.execution.scheduler import SweepPlan
from attnbench.storage.environment import Environment
from attnbench.storage.results import Row


@dataclass(frozen=True)
class Slot:
    """Where one case at a time runs."""

    name: str  # for messages: "this machine", or the node (and GPU) on a cluster
    node: str  # the machine: while a CPU case runs on it, nothing else does
    kinds: frozenset[str]  # the device kinds it runs cases of ("cpu", "cuda", ...)
    device_names: Mapping[str, str]  # kind -> the device's name (predictions never mix devices)
    memory_caps: Mapping[str, int | None]  # kind -> the cap a point runs under there

    def runs(self, device: str) -> bool:
        return device_kind(device) in self.kinds


@dataclass(frozen=True)
class RowReady:
    slot: Slot
    row: Row


@dataclass(frozen=True)
class CaseDone:
    slot: Slot
    end: CaseEnd


@dataclass(frozen=True)
class SlotLost:
    """The slot is gone (its node died, its process was killed) with ``work`` unfinished."""

    slot: Slot
    work: CaseWork
    reason: str


SlotEvent = RowReady | CaseDone | SlotLost


class Placement(Protocol):
    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        """The machine that started the run (the run folder's environment)."""
        ...

    def open(self, plan: SweepPlan, kinds: set[str], stored_flops: Mapping[str, list[float]],
             stored_copy: Mapping[str, list[float]]) -> list[Slot]:
        """The slots for cases of the device ``kinds``, ready to run ``plan``'s cases; the
        yardstick samples of an earlier part of the run (resume) seed them."""
        ...

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Each slot's machine as it describes itself (empty when it is the machine that started)."""
        ...

    def start(self, slot: Slot, work: CaseWork) -> None: ...

    def next_event(self) -> SlotEvent:
        """The next row, case end or lost slot from any running case (blocks until one comes)."""
        ...

    def close(self) -> None:
        """Stop what runs (a signal, or the sweep's end) and let go of the slots."""
        ...


def device_kind(device: str) -> str:
    return device.partition(":")[0]


class ThisMachine:
    """One slot: cases run one at a time in this process, their rounds in forked workers."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.machine: Environment | None = None
        self.runner: CaseRunner | None = None
        self.running: Iterator[Row | CaseEnd] | None = None
        self.slot: Slot | None = None

    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        self.machine = self.executor.environment(threads, plugins)
        return self.machine

    def open(self, plan: SweepPlan, kinds: set[str], stored_flops: Mapping[str, list[float]],
             stored_copy: Mapping[str, list[float]]) -> list[Slot]:
        machine = self.machine or self.executor.environment(plan.threads, {})
        self.runner = CaseRunner(plan, self.executor, machine, "", stored_flops, stored_copy)
        names = {kind: where_on(machine, kind, "").device_name for kind in kinds}
        self.slot = Slot("this machine", "", frozenset(kinds), names,
                         {kind: self.executor.memory_cap_bytes(plan.suite.limits, kind) for kind in kinds})
        return [self.slot]

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {}

    def start(self, slot: Slot, work: CaseWork) -> None:
        assert self.runner is not None
        self.running = self.runner.run(work)

    def next_event(self) -> SlotEvent:
        assert self.running is not None and self.slot is not None
        item = next(self.running)
        return CaseDone(self.slot, item) if isinstance(item, CaseEnd) else RowReady(self.slot, item)

    def close(self) -> None:
        self.executor.close()
        self.running = None

