"""A case as the unit placed on a machine: what the driver sends, and the runner that measures it
where it lands.

All implementations of a case and all their rounds run on one device, interleaved
(attnbench.execution.scheduler), in forked workers of the machine the case landed on; the
machine's own yardsticks are measured there before its first case and again between cases, and
each row is flagged against them and says where it ran.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from attnbench.contract.case import Case
from attnbench.execution.executor import Executor
from attnbench.execution.scheduler import SweepPlan, run_case
from attnbench.execution.yardsticks import Yardsticks
from attnbench.measuring.flops import slot_of_key
from attnbench.storage import flags
from attnbench.storage.environment import Environment
from attnbench.storage.results import Row, Where


@dataclass(frozen=True)
class CaseWork:
    """One case to measure: its series (in the suite's order) and the ones the driver's skip
    predictor refused, with why."""

    case: Case
    series: tuple[str, ...]
    skips: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # added to every row: e.g. that the case was retried after a node was lost


@dataclass(frozen=True)
class CaseEnd:
    """A case has no more rows; the yardstick samples of the machine that ran it, so far."""

    work: CaseWork
    matmul_flops_samples: Mapping[str, list[float]]
    copy_bytes_per_s_samples: Mapping[str, list[float]]


class CaseRunner:
    """Measures cases on this machine: ``executor`` runs their rounds (the local executor's forked
    workers); ``node`` is the cluster node's id, empty on the machine that started the run."""

    def __init__(self, plan: SweepPlan, executor: Executor, environment: Environment, node: str = "",
                 stored_flops: Mapping[str, list[float]] | None = None,
                 stored_copy: Mapping[str, list[float]] | None = None) -> None:
        self.plan = plan
        self.executor = executor
        self.environment = environment
        self.node = node
        self.yardsticks = Yardsticks(executor, plan.threads, plan.suite.limits.timeout_s, stored_flops or {},
                                     stored_copy or {})

    def run(self, work: CaseWork) -> Iterator[Row | CaseEnd]:
        """Each row of the case as it is final, then its CaseEnd."""
        case = work.case
        where = dataclasses.replace(where_on(self.environment, case.device, self.node),
                                    memory_cap=self.executor.memory_cap_held(self.plan.suite.limits, case.device))
        self.yardsticks.slot = where.slot  # a GPU's yardsticks are its own
        if self.plan.suite.measure.latency is not None and len(work.series) > len(work.skips):
            self.yardsticks.measure_if_due(case)
        for row in run_case(case, work.series, work.skips, self.plan, self.executor):
            row = dataclasses.replace(row, where=where, notes=(*row.notes, *work.notes))
            yield flags.with_flags(row, self.plan.exact.get(row.implementation, False), self.yardsticks.best)
        yield CaseEnd(work, _own(self.yardsticks.samples, where.slot), _own(self.yardsticks.copy_samples, where.slot))


def _own(samples: Mapping[str, list[float]], slot: str) -> dict[str, list[float]]:
    """The samples of ``slot``'s yardsticks (those of other slots came from an earlier part of the run)."""
    return {key: list(values) for key, values in samples.items() if slot_of_key(key) == slot}


def where_on(environment: Environment, device: str, node: str) -> Where:
    """The machine and device ``device`` names here: the CPU's model, or the GPU's name and UUID."""
    host = environment.hostname or platform.node()
    kind, _, index = device.partition(":")
    if kind == "cuda":
        gpu = environment.gpus.get(f"cuda:{index or 0}", {})
        return Where(host, gpu.get("name", "unknown GPU"), gpu.get("uuid", ""), node)
    if kind == "cpu":
        return Where(host, environment.cpu_model, "", node)
    return Where(host, environment.devices.get(device, device), "", node)
