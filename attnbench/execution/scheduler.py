"""The scheduler of one case: which points run, in which rounds and order, and how rounds merge.

Each implementation's first round checks correctness, times it and measures its memory; the
later rounds time it and check its last timed call and a call on fresh inputs, the
implementations taking turns in an order that rotates each round, so that implementations
compared with each other are measured side by side. A point that fails in any round ends there
with that failure. The executor runs the rounds; attnbench.measuring.outcome names the statuses.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attnbench.contract.case import Case, device_unavailable_reason
from attnbench.execution.executor import Executor, Finished, ImplementationRef, PointRound
from attnbench.measuring import outcome
from attnbench.measuring.correctness import Verifier
from attnbench.measuring.figures import Correctness, Latency, Measurement
from attnbench.measuring.outcome import Failure
from attnbench.settings.suite import Measure, Suite
from attnbench.storage.results import Row


@dataclass(frozen=True)
class SweepPlan:
    """What every case of a sweep shares: plain data, sent once to wherever cases run."""

    suite: Suite
    refs: Mapping[str, ImplementationRef]  # series name -> its implementation's plugin and name
    options: Mapping[str, Mapping[str, Any]]  # series name -> its effective options
    broken: Mapping[str, str]  # series name -> why its options could not be checked
    exact: Mapping[str, bool]  # series name -> whether it computes exact attention (for flags)
    run_id: str
    threads: int


def run_case(case: Case, series: Sequence[str], skips: Mapping[str, str], plan: SweepPlan,
             executor: Executor) -> Iterator[Row]:
    """The rows of one case, each as soon as it is final; ``series``: the names to measure (an
    implementation, or a variant of one), in the suite's order; ``skips``: series -> why the
    skip predictor (attnbench.execution.skips) does not run it; ``executor``: runs the rounds."""
    suite = plan.suite
    latency = suite.measure.latency
    rounds = latency.rounds if latency else 1
    first_round = dataclasses.replace(suite.measure, latency=latency.per_round() if latency else None)
    later_round = dataclasses.replace(first_round, correctness=None, memory=False)

    points: dict[str, _Point] = {}
    for name in series:
        point = _Point(name, case, plan.options.get(name, {}), plan.run_id, rounds)
        refusal = outcome.refused(plan.broken.get(name), device_unavailable_reason(case.device), skips.get(name))
        if refusal:
            yield point.failed(refusal, log_tail="")
            continue
        points[point.implementation] = point
        executor.submit(point.unit(first_round, plan))

    timed: list[_Point] = []
    for finished in executor.finished():
        point = points[finished.unit.series]
        ended = point.add(finished)
        if ended:
            yield ended
        elif rounds == 1:
            yield point.finished_row()
        else:
            timed.append(point)

    for round_index in range(1, rounds):
        turn = round_index % len(timed) if timed else 0
        for point in timed[turn:] + timed[:turn]:
            executor.submit(point.unit(later_round, plan))
        for finished in executor.finished():
            point = points[finished.unit.series]
            ended = point.add(finished)
            if ended:
                timed.remove(point)
                yield ended
    for point in timed:
        yield point.finished_row()


def failed_row(case: Case, name: str, failure: Failure, plan: SweepPlan) -> Row:
    """The row of a point that ended before the case's scheduler ran it (its node was lost)."""
    return _Point(name, case, plan.options.get(name, {}), plan.run_id, 1).failed(failure, log_tail="")


@dataclass
class _Point:
    """One (implementation, case) while its rounds are measured."""

    implementation: str  # the series: an implementation, or a variant of one
    case: Case
    options: Mapping[str, Any]
    run_id: str
    rounds: int
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    verifier: Verifier | None = None
    started_at: float | None = None
    ended_at: float | None = None

    def unit(self, measure: Measure, plan: SweepPlan) -> PointRound:
        suite = plan.suite
        return PointRound(plan.refs[self.implementation], self.implementation, self.case, self.options, measure,
                          suite.limits, suite.seed, plan.threads, self.verifier,
                          suite.source_options.get(self.case.inputs, {}), len(self.measurements), self.rounds)

    def add(self, finished: Finished) -> Row | None:
        """Takes one round's outcome; the point's final row when it failed there."""
        self.wall_time_s += finished.wall_time_s
        self.ended_at = time.time()
        self.started_at = self.started_at or self.ended_at - finished.wall_time_s
        self.notes.extend(finished.notes)
        result = finished.outcome
        if isinstance(result, Measurement):
            self.measurements.append(result)
            self.verifier = self.verifier or result.verifier
            return None
        failure = result if isinstance(result, Failure) else outcome.unexpected_result(result)
        if self.measurements:
            where = f" (in round {len(self.measurements) + 1} of {self.rounds})"
            failure = dataclasses.replace(failure, reasons=tuple(reason + where for reason in failure.reasons))
        return self.failed(failure, finished.log_tail)

    def failed(self, failure: Failure, log_tail: str) -> Row:
        return self._row(failure.status, failure.reasons, detail=failure.detail or log_tail, notes=failure.notes)

    def finished_row(self) -> Row:
        first = self.measurements[0]
        latencies = [m.latency for m in self.measurements if m.latency is not None]
        checks = [m.correctness for m in self.measurements if m.correctness is not None]
        return self._row(
            outcome.point_status([m.status for m in self.measurements]),
            list(dict.fromkeys(reason for m in self.measurements for reason in m.reasons)),
            correctness=Correctness.merge(checks) if checks else None,
            latency=Latency.merge(latencies) if latencies else None,
            memory=first.memory,
            work=first.work,
            traffic=first.traffic,
            notes=tuple(note for m in self.measurements for note in m.notes),
        )

    def _row(self, status: str, reasons: Sequence[str], **fields: Any) -> Row:
        notes = tuple(dict.fromkeys((*self.notes, *fields.pop("notes", ()))))
        return Row(run_id=self.run_id, implementation=self.implementation, case=self.case, status=status,
                   reasons=tuple(reasons), options=self.options, wall_time_s=self.wall_time_s, notes=notes,
                   started_at=self.started_at, ended_at=self.ended_at, **fields)
