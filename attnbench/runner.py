"""Runs a suite: every (implementation, case) becomes exactly one row, written as it finishes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from attnbench.analysis import matmul_key
from attnbench.case import Case, device_unavailable_reason
from attnbench.environment import Environment, capture_environment
from attnbench.errors import UserError
from attnbench.grid import expand, group_key
from attnbench.implementation import Implementation, complexity_exponent, effective_options
from attnbench.isolation import run_isolated
from attnbench.matmul import matmul_flops
from attnbench.predict import extrapolate
from attnbench.registry import Registry
from attnbench.results import Measurement, Row, RowWriter, read_rows_tolerantly
from attnbench.run_folder import ENVIRONMENT_FILE, ROWS_FILE, SUITE_COPY, declared_of, write_declared
from attnbench.suite import Limits, Suite
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

    Cases run in grid order and, within a case, implementations in suite order, so that
    implementations compared with each other are measured minutes apart, not an hour.
    ``resume``: a run folder of the same suite and code; only its missing points are measured.
    """
    implementations = [registry.get(name) for name in suite.implementations]
    options = {impl.name: effective_options(impl, suite.options.get(impl.name, {})) for impl in implementations}
    cases = expand(suite.sweep)
    if resume is not None:
        run_dir, environment, done, warnings = _resumed(resume, suite)
    else:
        environment = capture_environment()
        if suite.measure.latency is not None:
            throughputs = _matmul_throughputs(cases, suite.measure.latency.min_run_time_s)
            environment = dataclasses.replace(environment, matmul_flops=throughputs)
        run_dir = _new_run_dir(output or suite.output, suite.name, environment)
        (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment.to_json(), indent=2) + "\n")
        write_declared(run_dir, declared_of(implementations))
        shutil.copyfile(suite.path, run_dir / SUITE_COPY)
        done = []
        busy = environment.busy_warning()
        warnings = (busy,) if busy else ()

    curves = _Curves(suite.limits, suite.measure.latency.min_samples if suite.measure.latency else 1)
    for row in done:  # earlier points still inform predictions and budgets
        curves.record(row)
    recorded = {(row.implementation, row.case) for row in done}
    writer = RowWriter(run_dir / ROWS_FILE)
    rows: list[Row] = list(done)
    if progress:
        progress.started(len(cases) * len(implementations) - len(recorded))
    try:
        for case in cases:
            for implementation in implementations:
                if (implementation.name, case) in recorded:
                    continue
                if progress:
                    progress.point(implementation.name, case)
                row = _run_point(implementation, case, options[implementation.name], suite, curves, run_dir.name)
                curves.record(row)
                writer.write(row)
                rows.append(row)
                if progress:
                    progress.finished(row)
    finally:
        writer.close()
    return RunResult(run_dir, tuple(rows), environment, warnings)


def _resumed(run_dir: Path, suite: Suite) -> tuple[Path, Environment, list[Row], tuple[str, ...]]:
    """The run's environment and finished rows, after checking that the suite and the code are
    the ones it started with; a torn last line (a kill mid-write) is cut off."""
    rows_path = run_dir / ROWS_FILE
    if not rows_path.exists() or not (run_dir / SUITE_COPY).exists():
        raise UserError(f"--resume {run_dir}: not a run folder (no {ROWS_FILE} or {SUITE_COPY})")
    if (run_dir / SUITE_COPY).read_text() != suite.path.read_text():
        raise UserError(f"--resume {run_dir}: {suite.path} has changed since this run started (its copy is "
                        f"{run_dir / SUITE_COPY}); start a new run instead of mixing two suites")
    stored_environment = json.loads((run_dir / ENVIRONMENT_FILE).read_text())
    now = capture_environment()
    then = stored_environment.get("git_commit")
    if then != now.git_commit:
        raise UserError(f"--resume {run_dir}: the code has changed since this run started (commit {then} then, "
                        f"{now.git_commit} now); start a new run instead of mixing two versions")
    warnings = []
    if stored_environment.get("git_dirty") or now.git_dirty:
        warnings.append(f"--resume {run_dir}: uncommitted changes (then or now): whether the code changed "
                        "cannot be told")
    stored = read_rows_tolerantly(rows_path)
    if stored.torn_tail:
        with rows_path.open("r+b") as file:
            file.truncate(stored.complete_bytes)
    environment = Environment(**stored_environment)
    return run_dir, environment, stored.rows, tuple(warnings)


def _matmul_throughputs(cases: Sequence[Case], min_run_time_s: float) -> dict[str, float]:
    """Matmul FLOP/s per (device, dtype) the sweep uses and this machine has: the yardstick of the
    report's throughput fractions, measured once, before the points, as long as the suite times."""
    measured = {}
    for device, dtype_name in dict.fromkeys((case.device, case.dtype_name) for case in cases):
        if device_unavailable_reason(device) is None:
            measured[matmul_key(device, dtype_name)] = matmul_flops(device, dtype_name, min_run_time_s)
    return measured


def memory_cap_bytes(limits: Limits, device: str) -> int | None:
    """The suite's cap, or half of physical RAM on the CPU; on a GPU its own memory is the cap."""
    if limits.memory_gb is not None:
        return int(limits.memory_gb * 2**30)
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return None


def _run_point(
    implementation: Implementation,
    case: Case,
    options: dict,
    suite: Suite,
    curves: _Curves,
    run_id: str,
) -> Row:
    def row(status: str, reasons: Sequence[str], **fields) -> Row:
        return Row(run_id=run_id, implementation=implementation.name, case=case, status=status,
                   reasons=tuple(reasons), options=options, **fields)

    unavailable = device_unavailable_reason(case.device)
    if unavailable:
        return row("unsupported", [unavailable])
    try:
        reasons = implementation.not_supported_reasons(case)
    except Exception as error:  # a plugin bug is that plugin's error row, not the end of the sweep
        return row("error", [f"not_supported_reasons raised {type(error).__name__}: {error}"],
                   detail=traceback.format_exc())
    if reasons:
        return row("unsupported", reasons)
    cap = memory_cap_bytes(suite.limits, case.device)
    skip = curves.skip_reason(implementation, case, cap)
    if skip:
        return row("skipped", [skip])

    job = Job(implementation, case, options, suite.measure, suite.seed, cap)
    result = run_isolated(job, suite.limits.timeout_s)
    outcome = result.outcome
    if isinstance(outcome, Measurement):
        return row(outcome.status, outcome.reasons, correctness=outcome.correctness, latency=outcome.latency,
                   memory=outcome.memory, wall_time_s=result.wall_time_s, notes=outcome.notes)
    detail = outcome.detail or result.log_tail
    return row(outcome.status, outcome.reasons, wall_time_s=result.wall_time_s, detail=detail)


class _Curves:
    """The rows measured so far per scaling curve, and the time spent per implementation."""

    def __init__(self, limits: Limits, samples_per_point: int) -> None:
        self.limits = limits
        # A point makes at least: first call, block-size estimate, the samples, the memory call.
        self.calls_per_point = samples_per_point + 3
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
