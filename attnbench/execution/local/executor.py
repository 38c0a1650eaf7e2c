"""The local executor: each unit in its own forked worker on this machine, one at a time.

One at a time, in the order submitted: points measured side by side must not share the machine.
The implementation a unit names is looked up in this process's registry and sent to the worker
(attnbench.execution.local.isolation pickles it, so a plugin that cannot travel is an error row).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

from attnbench.contract.inputs import BUILTIN_SOURCES
from attnbench.contract.registry import Registry
from attnbench.execution.executor import Finished, StartedCallback, WorkUnit, YardstickRound
from attnbench.execution.local.isolation import run_isolated
from attnbench.execution.local.worker import Job, YardstickJob
from attnbench.measuring import outcome
from attnbench.settings.suite import Limits
from attnbench.storage.environment import Environment, capture_environment


class LocalExecutor:
    def __init__(self, registry: Registry, started: StartedCallback | None = None) -> None:
        self.registry = registry
        self.started = started or (lambda unit: None)
        self.pending: deque[WorkUnit] = deque()

    def submit(self, unit: WorkUnit) -> None:
        self.pending.append(unit)

    def finished(self) -> Iterator[Finished]:
        while self.pending:
            unit = self.pending.popleft()
            self.started(unit)
            yield self._run(unit)

    def cancel(self) -> None:
        self.pending.clear()

    def memory_cap_bytes(self, limits: Limits, device: str) -> int | None:
        return memory_cap_bytes(limits, device)

    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        return capture_environment(threads=threads, plugins=plugins)

    def _run(self, unit: WorkUnit) -> Finished:
        if isinstance(unit, YardstickRound):
            result = run_isolated(YardstickJob(unit.device, unit.dtype_name, unit.run_time_s), unit.timeout_s,
                                  unit.threads)
            return Finished(unit, result.outcome, result.wall_time_s, result.log_tail, result.notes)
        ref = unit.implementation
        if ref.name not in self.registry or self.registry.plugin_of(ref.name) != ref.plugin:
            return Finished(unit, outcome.not_here(ref.name, ref.plugin), 0.0)
        registered = self.registry.input_sources.get(unit.case.inputs)
        if registered is None:
            return Finished(unit, outcome.no_such_source(unit.case.inputs), 0.0)
        source = registered.configured(unit.source_options)
        job = Job(self.registry.get(ref.name), unit.case, unit.options, unit.measure, unit.seed,
                  memory_cap_bytes(unit.limits, unit.case.device), unit.verifier,
                  None if source is BUILTIN_SOURCES.get(source.name) else source)
        result = run_isolated(job, unit.limits.timeout_s, unit.threads)
        return Finished(unit, result.outcome, result.wall_time_s, result.log_tail, result.notes)


def memory_cap_bytes(limits: Limits, device: str) -> int | None:
    """The suite's cap, or half of physical RAM on the CPU; on a GPU its own memory is the cap."""
    if limits.memory_gb is not None:
        return int(limits.memory_gb * 2**30)
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return None
