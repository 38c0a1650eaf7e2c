"""Runs a suite: every (implementation, case) becomes exactly one row, written as it finishes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import traceback
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from attnbench.analysis import matmul_key
from attnbench.case import Case, device_unavailable_reason
from attnbench.environment import Environment, capture_environment
from attnbench.errors import UserError
from attnbench.grid import expand, group_key
from attnbench.implementation import Implementation, complexity_exponent, effective_options, reasons_not_to_run
from attnbench.isolation import run_isolated
from attnbench.matmul import matmul_flops
from attnbench.predict import extrapolate
from attnbench.registry import Registry
from attnbench.results import Latency, Measurement, Row, RowWriter, read_rows_tolerantly
from attnbench.run_folder import ENVIRONMENT_FILE, ROWS_FILE, SUITE_COPY, declared_of, write_declared
from attnbench.suite import Limits, Measure, Suite
from attnbench.units import format_bytes
from attnbench.worker import Job


class ProgressListener(Protocol):
    def started(self, total: int) -> None: ...
    def point(self, implementation: str, case: Case) -> None: ...
    def finished(self, row: Row) -> None: ...


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    rows: tuple[Row, ...]
    environment: Environment
    warnings: tuple[str, ...] = ()  # e.g. a resumed run whose code version cannot be checked

    @property
    def rows_path(self) -> Path:
        return self.run_dir / ROWS_FILE


def run_suite(
    suite: Suite,
    registry: Registry,
    *,
    output: Path | None = None,
    progress: ProgressListener | None = None,
    resume: Path | None = None,
) -> RunResult:
    """Measure every implementation of the suite on every case of its sweep.

    Cases run in grid order; within a case the implementations take turns, in rounds, so that
    implementations compared with each other are measured side by side, not an hour apart.
    ``resume``: a run folder of the same suite and code; only its missing points are measured.
    """
    implementations = [registry.get(name) for name in suite.implementations]
    options = {impl.name: effective_options(impl, suite.options.get(impl.name, {})) for impl in implementations}
    cases = expand(suite.sweep)
    if resume is not None:
        run_dir = resume
        environment, done, warnings = _resumed(run_dir, suite)
    else:
        environment = capture_environment(threads=suite.measure.threads)
        if suite.measure.latency is not None:
            throughputs = _matmul_throughputs(cases, suite.measure.latency.min_run_time_s, suite.measure.threads)
            environment = dataclasses.replace(environment, matmul_flops=throughputs)
        run_dir = _new_run_dir(output or suite.output, suite.name, environment)
        (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment.to_json(), indent=2) + "\n")
        write_declared(run_dir, declared_of(implementations))
        shutil.copyfile(suite.path, run_dir / SUITE_COPY)
        done = []
        busy = environment.busy_warning()
        warnings = (busy,) if busy else ()

    latency = suite.measure.latency
    curves = _Curves(suite.limits, latency.min_samples if latency else 1, latency.rounds if latency else 1)
    for row in done:  # earlier points still inform predictions and budgets
        curves.record(row)
    recorded = {(row.implementation, row.case) for row in done}
    writer = RowWriter(run_dir / ROWS_FILE)
    rows: list[Row] = list(done)
    if progress:
        progress.started(len(cases) * len(implementations) - len(recorded))
    try:
        for case in cases:
            todo = [impl for impl in implementations if (impl.name, case) not in recorded]
            for row in _run_case(case, todo, options, suite, curves, run_dir.name, progress):
                curves.record(row)
                writer.write(row)
                rows.append(row)
                if progress:
                    progress.finished(row)
    finally:
        writer.close()
    return RunResult(run_dir, tuple(rows), environment, warnings)


def _resumed(run_dir: Path, suite: Suite) -> tuple[Environment, list[Row], tuple[str, ...]]:
    """The run's environment and finished rows, after checking that the suite and the code are
    the ones it started with; a torn last line (a kill mid-write) is cut off."""
    rows_path = run_dir / ROWS_FILE
    if not rows_path.exists() or not (run_dir / SUITE_COPY).exists():
        raise UserError(f"--resume {run_dir}: not a run folder (no {ROWS_FILE} or {SUITE_COPY})")
    if (run_dir / SUITE_COPY).read_text() != suite.path.read_text():
        raise UserError(f"--resume {run_dir}: {suite.path} has changed since this run started (its copy is "
                        f"{run_dir / SUITE_COPY}); start a new run instead of mixing two suites")
    stored = read_rows_tolerantly(rows_path)  # refuses unreadable rows before anything is measured
    try:
        environment = Environment.from_json(json.loads((run_dir / ENVIRONMENT_FILE).read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"--resume {run_dir}: {ENVIRONMENT_FILE} cannot be read ({type(error).__name__}: {error}); "
                        "start a new run") from None
    now = capture_environment()
    then = environment.git_commit
    if then != now.git_commit:
        raise UserError(f"--resume {run_dir}: the code has changed since this run started (commit {then} then, "
                        f"{now.git_commit} now); start a new run instead of mixing two versions")
    warnings = []
    if environment.git_dirty or now.git_dirty:
        warnings.append(f"--resume {run_dir}: uncommitted changes (then or now): whether the code changed "
                        "cannot be told")
    if stored.torn_tail:
        with rows_path.open("r+b") as file:
            file.truncate(stored.complete_bytes)
    return environment, stored.rows, tuple(warnings)


def _matmul_throughputs(cases: Sequence[Case], min_run_time_s: float, threads: int | None) -> dict[str, float]:
    """Matmul FLOP/s per (device, dtype) the sweep uses and this machine has: the yardstick of the
    report's throughput fractions, measured once, before the points, as long as the suite times."""
    measured = {}
    for device, dtype_name in dict.fromkeys((case.device, case.dtype_name) for case in cases):
        if device_unavailable_reason(device) is None:
            measured[matmul_key(device, dtype_name)] = matmul_flops(device, dtype_name, min_run_time_s, threads)
    return measured


def memory_cap_bytes(limits: Limits, device: str) -> int | None:
    """The suite's cap, or half of physical RAM on the CPU; on a GPU its own memory is the cap."""
    if limits.memory_gb is not None:
        return int(limits.memory_gb * 2**30)
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return None


def _run_case(
    case: Case,
    implementations: Sequence[Implementation],
    options: dict[str, dict],
    suite: Suite,
    curves: _Curves,
    run_id: str,
    progress: ProgressListener | None,
) -> Iterator[Row]:
    """The rows of one case, each as soon as it is final.

    Each implementation's first round checks correctness, times it and measures its memory;
    the later rounds only time it, the implementations taking turns in an order that rotates
    each round. A point that fails in any round ends there with that failure.
    """
    latency = suite.measure.latency
    rounds = latency.rounds if latency else 1
    first_round = dataclasses.replace(suite.measure, latency=latency.per_round() if latency else None)
    later_round = dataclasses.replace(first_round, correctness=None, memory=False)
    cap = memory_cap_bytes(suite.limits, case.device)
    timed: list[_Point] = []
    for implementation in implementations:
        if progress:
            progress.point(implementation.name, case)
        point = _Point(implementation, case, options[implementation.name], run_id, rounds)
        ended = point.refusal(curves, cap) or point.run_round(first_round, suite, cap)
        if ended:
            yield ended
        elif rounds == 1:
            yield point.finished_row()
        else:
            timed.append(point)
    for round_index in range(1, rounds):
        turn = round_index % len(timed) if timed else 0
        for point in timed[turn:] + timed[:turn]:
            if progress:
                progress.point(point.implementation.name, case)
            ended = point.run_round(later_round, suite, cap)
            if ended:
                timed.remove(point)
                yield ended
    for point in timed:
        yield point.finished_row()


@dataclass
class _Point:
    """One (implementation, case) while its rounds are measured."""

    implementation: Implementation
    case: Case
    options: dict
    run_id: str
    rounds: int
    measurements: list[Measurement] = field(default_factory=list)
    wall_time_s: float = 0.0

    def row(self, status: str, reasons: Sequence[str], **fields) -> Row:
        return Row(run_id=self.run_id, implementation=self.implementation.name, case=self.case, status=status,
                   reasons=tuple(reasons), options=self.options, wall_time_s=self.wall_time_s, **fields)

    def refusal(self, curves: _Curves, cap: int | None) -> Row | None:
        """The row of a point that is not run: no such device, not supported, or predicted too big."""
        try:
            reasons = reasons_not_to_run(self.implementation, self.case)
        except Exception as error:  # a plugin bug is that plugin's error row, not the end of the sweep
            return self.row("error", [f"not_supported_reasons raised {type(error).__name__}: {error}"],
                            detail=traceback.format_exc())
        if reasons:
            return self.row("unsupported", reasons)
        skip = curves.skip_reason(self.implementation, self.case, cap)
        return self.row("skipped", [skip]) if skip else None

    def run_round(self, measure: Measure, suite: Suite, cap: int | None) -> Row | None:
        """Runs one round in a fresh worker; the point's final row when it failed there."""
        job = Job(self.implementation, self.case, self.options, measure, suite.seed, cap)
        result = run_isolated(job, suite.limits.timeout_s)
        self.wall_time_s += result.wall_time_s
        outcome = result.outcome
        if isinstance(outcome, Measurement):
            self.measurements.append(outcome)
            return None
        where = f" (in round {len(self.measurements) + 1} of {self.rounds})" if self.measurements else ""
        reasons = [reason + where for reason in outcome.reasons]
        return self.row(outcome.status, reasons, detail=outcome.detail or result.log_tail)

    def finished_row(self) -> Row:
        first = self.measurements[0]
        latencies = [m.latency for m in self.measurements if m.latency is not None]
        incorrect = any(m.status == "incorrect" for m in self.measurements)
        return self.row(
            "incorrect" if incorrect else "ok",
            list(dict.fromkeys(reason for m in self.measurements for reason in m.reasons)),
            correctness=first.correctness,
            latency=Latency.merge(latencies) if latencies else None,
            memory=first.memory,
            notes=tuple(dict.fromkeys(note for m in self.measurements for note in m.notes)),
        )


class _Curves:
    """The rows measured so far per scaling curve, and the time spent per implementation."""

    def __init__(self, limits: Limits, samples_per_point: int, rounds: int) -> None:
        self.limits = limits
        # A point makes at least: per round a first call and a block-size estimate, the samples,
        # and the memory call.
        self.calls_per_point = samples_per_point + 2 * rounds + 1
        self.rows: dict[tuple[str, Case], list[Row]] = defaultdict(list)
        self.spent_s: dict[str, float] = defaultdict(float)

    def record(self, row: Row) -> None:
        self.rows[(row.implementation, group_key(row.case))].append(row)
        self.spent_s[row.implementation] += row.wall_time_s

    def skip_reason(self, implementation: Implementation, case: Case, memory_cap: int | None) -> str | None:
        name = implementation.name
        earlier = self.rows[(name, group_key(case))]
        budget = self.limits.budget_s
        if budget is not None and self.spent_s[name] >= budget:
            return f"time budget of {budget:g} s for {name} is spent ({self.spent_s[name]:.0f} s)"
        for previous in earlier:
            if previous.status in ("oom", "timeout") and previous.case.seq_len < case.seq_len:
                return f"the smaller N={previous.case.seq_len} already ended as {previous.status}"

        memory_points = [(r.case.seq_len, r.memory.peak_bytes) for r in earlier if r.memory and r.memory.peak_bytes]
        memory = extrapolate(memory_points, case.seq_len, complexity_exponent(implementation.memory_complexity))
        if memory and memory_cap is not None and memory.value > memory_cap:
            return (f"predicted peak memory {format_bytes(memory.value)} > memory cap "
                    f"{format_bytes(memory_cap)} ({memory.basis})")

        latency_points = [(r.case.seq_len, r.latency.median_s) for r in earlier if r.latency]
        latency = extrapolate(latency_points, case.seq_len, complexity_exponent(implementation.time_complexity))
        if latency:
            point_s = latency.value * self.calls_per_point
            if point_s > self.limits.timeout_s:
                return (f"predicted to take >= {point_s:.0f} s ({self.calls_per_point} calls of "
                        f"{latency.value:.3g} s, {latency.basis}) > case timeout {self.limits.timeout_s:g} s")
            if budget is not None and self.spent_s[name] + point_s > budget:
                return (f"time budget: {self.spent_s[name]:.0f} s of {budget:g} s spent for {name}, and this "
                        f"point is predicted to take >= {point_s:.0f} s ({latency.basis})")
        return None


def _new_run_dir(output: Path, suite_name: str, environment: Environment) -> Path:
    """results/<suite>/<UTC time>-<short commit>/, unique even for two runs in one second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{stamp}-{environment.git_commit[:7]}" if environment.git_commit else stamp
    candidate = output / suite_name / run_id
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = output / suite_name / f"{run_id}-{suffix}"
    candidate.mkdir(parents=True)
    return candidate
