"""Runs a suite: every (implementation, case) becomes exactly one row, written as it finishes."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Protocol

import torch

from attnbench.contract.case import Case, device_unavailable_reason
from attnbench.contract.errors import UserError
from attnbench.contract.implementation import Implementation, complexity_exponent, effective_options
from attnbench.contract.registry import Registry
from attnbench.execution.local.isolation import run_isolated
from attnbench.execution.local.worker import Failure, Job, MatmulJob, Yardstick
from attnbench.execution.predict import extrapolate
from attnbench.measuring.correctness import Verifier
from attnbench.measuring.flops import matmul_key
from attnbench.settings.grid import expand, group_key
from attnbench.settings.suite import Limits, Measure, Suite
from attnbench.storage import flags
from attnbench.storage.environment import Environment, capture_environment, code_version
from attnbench.storage.results import Correctness, Latency, Measurement, Row, RowWriter, read_rows_tolerantly
from attnbench.storage.run_folder import ENVIRONMENT_FILE, ROWS_FILE, SUITE_COPY, declared_of, write_declared
from attnbench.support.containment import Interrupted, PluginFault, contained, deferred_interrupts
from attnbench.support.units import format_bytes, format_seconds

# A sweep this large prints its size and a time estimate before it starts.
LARGE_SWEEP_POINTS = 2000
# The least a run folder needs: rows, reports and plots of a large run take a few MiB.
MIN_FREE_BYTES = 16 * 2**20
# The matmul yardstick is measured again before a case once this long has passed since the last
# time: the best of the run is the device's rate, whatever was running at any one moment.
YARDSTICK_INTERVAL_S = 30.0
YARDSTICK_RUN_TIME_S = 0.5
YARDSTICK_FIRST_REPEATS = 3  # before the first point: one disturbed measurement must not be the yardstick
# What starting a worker, preparing and checking cost a point besides its timed calls (a floor).
POINT_OVERHEAD_S = 0.15


class ProgressListener(Protocol):
    def started(self, total: int) -> None: ...
    def point(self, implementation: str, case: Case) -> None: ...
    def finished(self, row: Row) -> None: ...


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    rows: tuple[Row, ...]
    environment: Environment
    interrupted: Interrupted | None = None  # the signal that stopped the sweep early

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
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Measure every implementation of the suite on every case of its sweep.

    Cases run in grid order; within a case the implementations take turns, in rounds, so that
    implementations compared with each other are measured side by side, not an hour apart.
    ``output``: the --output flag (else the suite's output field); ``resume``: a run folder of the
    same suite and code, of which only the missing points are measured; ``warn``: told anything
    the user should know before the sweep starts (a busy machine, a very large grid).
    A SIGTERM, SIGHUP or Ctrl-C (attnbench.containment.Interrupted) ends the sweep with every
    finished row kept; the result says which signal it was.
    """
    warn = warn or (lambda text: None)
    implementations = [registry.get(name) for name in suite.implementations]
    threads = suite.measure.threads or torch.get_num_threads()
    options, broken = _resolve_options(implementations, suite)
    cases = expand(suite.sweep)
    _announce_size(suite, len(cases) * len(implementations), warn)

    if resume is not None:
        if not (resume / ROWS_FILE).exists() or not (resume / SUITE_COPY).exists():
            raise UserError(f"--resume {resume}: not a run folder (no {ROWS_FILE} or {SUITE_COPY})")
        lock = _lock_run_folder(resume, f"--resume {resume}")  # before its rows are read
        run_dir = resume
        environment, done = _resumed(run_dir, suite, warn)
    else:
        run_dir, lock = _new_run_dir(output, suite)
        environment = capture_environment(threads=threads, plugins=_plugin_sources(registry, implementations))
        busy = environment.busy_warning()
        if busy:
            warn(busy)
        _write_run_files(run_dir, environment, implementations, suite)
        done = []

    latency = suite.measure.latency
    yardsticks = _Yardsticks(cases, threads, suite.limits.timeout_s, environment.matmul_flops_samples)
    curves = _Curves(suite.limits, latency.min_samples if latency else 1, latency.rounds if latency else 1)
    for row in done:  # earlier points still inform predictions and budgets
        curves.record(row)
    recorded = {(row.implementation, row.case) for row in done}
    writer = RowWriter(run_dir / ROWS_FILE)
    rows: list[Row] = list(done)
    interrupted = None
    if progress:
        progress.started(len(cases) * len(implementations) - len(recorded))
    try:
        for case in cases:
            todo = [impl for impl in implementations if (impl.name, case) not in recorded]
            if todo and latency is not None:
                yardsticks.measure_if_due()
            context = _CaseContext(options, broken, suite, curves, run_dir.name, progress, threads)
            for row in _run_case(case, todo, context):
                implementation = registry.get(row.implementation)
                row = flags.with_flags(row, implementation.exact, yardsticks.best)
                curves.record(row)
                with deferred_interrupts():
                    writer.write(row)
                rows.append(row)
                if progress:
                    progress.finished(row)
    except Interrupted as signal_received:
        interrupted = signal_received
    finally:
        writer.close()
        environment = dataclasses.replace(environment, matmul_flops=yardsticks.best,
                                          matmul_flops_samples=yardsticks.samples)
        _write_environment(run_dir, environment)
        lock.close()
    return RunResult(run_dir, tuple(rows), environment, interrupted)


def _resolve_options(
    implementations: Sequence[Implementation], suite: Suite
) -> tuple[dict[str, dict], dict[str, str]]:
    """Each implementation's options; and, for a plugin whose invalid_options fails, why (its
    points become error rows)."""
    options, broken = {}, {}
    for implementation in implementations:
        given = suite.options.get(implementation.name, {})
        resolved = contained(functools.partial(effective_options, implementation, given), "invalid_options",
                             passthrough=(UserError,))
        if isinstance(resolved, PluginFault):
            broken[implementation.name] = resolved.message
        else:
            options[implementation.name] = resolved
    return options, broken


def _announce_size(suite: Suite, points: int, warn: Callable[[str], None]) -> None:
    if points <= LARGE_SWEEP_POINTS:
        return
    latency = suite.measure.latency
    per_point = (latency.min_run_time_s + latency.rounds * POINT_OVERHEAD_S) if latency else POINT_OVERHEAD_S
    warn(f"{suite.path}: this sweep has {points} points (implementations × cases); at least "
         f"{format_seconds(per_point)} each, so at least {points * per_point / 3600:.1f} h in all")


def _plugin_sources(registry: Registry, implementations: Sequence[Implementation]) -> dict[str, dict]:
    sources: dict[str, dict] = {}
    for implementation in implementations:
        plugin = registry.plugin_of(implementation.name)
        source = registry.source_of(implementation.name)
        entry = sources.setdefault(plugin, {"distribution": source.distribution if source else "unknown",
                                            "version": source.version if source else "unknown",
                                            "implementations": []})
        entry["implementations"].append(implementation.name)
    return sources


def _resumed(run_dir: Path, suite: Suite, warn: Callable[[str], None]) -> tuple[Environment, list[Row]]:
    """The run's environment and finished rows, after checking that the suite and the code are
    the ones it started with; a torn last line (a kill mid-write) is cut off."""
    rows_path = run_dir / ROWS_FILE
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
    if environment.git_dirty or now.git_dirty:
        warn(f"--resume {run_dir}: uncommitted changes (then or now): whether the code changed cannot be told")
    busy = now.busy_warning()
    if busy:
        warn(busy)
    if stored.torn_tail:
        with rows_path.open("r+b") as file:
            file.truncate(stored.complete_bytes)
    return environment, stored.rows


def _lock_run_folder(run_dir: Path, label: str) -> IO[str]:
    """An exclusive lock on the run's rows file, held while this process measures into it: two
    processes must never append the same points."""
    try:
        handle = (run_dir / ROWS_FILE).open("a")
    except OSError as error:
        raise UserError(f"{label}: cannot open {ROWS_FILE} there ({error.strerror or error})") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{label}: another attnbench is measuring this run now (its {ROWS_FILE} is locked); "
                        "wait for it to finish or stop it first") from None
    return handle


def _new_run_dir(output: Path | None, suite: Suite) -> tuple[Path, IO[str]]:
    """results/<suite>/<UTC time>-<short commit>/, created and locked; a bad output location is a
    one-line error before anything is measured."""
    base = output if output is not None else suite.output
    label = f"--output {base}" if output is not None else f"{suite.path}: output {base}"
    if base.exists() and not base.is_dir():
        raise UserError(f"{label}: is a file, not a folder")
    commit, _ = code_version()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{stamp}-{commit[:7]}" if commit else stamp
    candidate = base / suite.name / run_id
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base / suite.name / f"{run_id}-{suffix}"
    try:
        candidate.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"{label}: cannot create the run folder there ({error.strerror or error})") from None
    free = shutil.disk_usage(candidate).free
    if free < MIN_FREE_BYTES:
        _remove_empty(candidate)
        raise UserError(f"{label}: the disk is full ({format_bytes(free)} free; a run needs at least "
                        f"{format_bytes(MIN_FREE_BYTES)})")
    return candidate, _lock_run_folder(candidate, label)


def _write_run_files(run_dir: Path, environment: Environment, implementations: Sequence[Implementation],
                     suite: Suite) -> None:
    try:
        _write_environment(run_dir, environment)
        write_declared(run_dir, declared_of(implementations))
        shutil.copyfile(suite.path, run_dir / SUITE_COPY)
    except OSError as error:
        raise UserError(f"{run_dir}: cannot write the run's files ({error.strerror or error})") from None


def _write_environment(run_dir: Path, environment: Environment) -> None:
    (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment.to_json(), indent=2) + "\n")


def _remove_empty(folder: Path) -> None:
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


class _Yardsticks:
    """Matmul FLOP/s per (device, dtype) the sweep uses and this machine has, measured in workers
    (as the points are) at the start and again between cases; the best so far is the yardstick."""

    def __init__(self, cases: Sequence[Case], threads: int, timeout_s: float, stored: dict[str, list[float]]) -> None:
        self.keys = [(device, dtype) for device, dtype in dict.fromkeys((c.device, c.dtype_name) for c in cases)
                     if device_unavailable_reason(device) is None]
        self.threads = threads
        self.timeout_s = timeout_s
        self.samples: dict[str, list[float]] = {key: list(values) for key, values in stored.items()}
        self.last = -float("inf")

    @property
    def best(self) -> dict[str, float]:
        return {key: max(values) for key, values in self.samples.items() if values}

    def measure_if_due(self) -> None:
        if time.monotonic() - self.last < YARDSTICK_INTERVAL_S:
            return
        for device, dtype in self.keys:
            key = matmul_key(device, dtype)
            for _ in range(1 if self.samples.get(key) else YARDSTICK_FIRST_REPEATS):
                result = run_isolated(MatmulJob(device, dtype, YARDSTICK_RUN_TIME_S), self.timeout_s, self.threads)
                if isinstance(result.outcome, Yardstick):
                    self.samples.setdefault(key, []).append(float(f"{result.outcome.flops:.6g}"))
        self.last = time.monotonic()


def memory_cap_bytes(limits: Limits, device: str) -> int | None:
    """The suite's cap, or half of physical RAM on the CPU; on a GPU its own memory is the cap."""
    if limits.memory_gb is not None:
        return int(limits.memory_gb * 2**30)
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return None


@dataclass(frozen=True)
class _CaseContext:
    options: dict[str, dict]
    broken: dict[str, str]  # implementation -> why its options could not be checked
    suite: Suite
    curves: _Curves
    run_id: str
    progress: ProgressListener | None
    threads: int


def _run_case(case: Case, implementations: Sequence[Implementation], context: _CaseContext) -> Iterator[Row]:
    """The rows of one case, each as soon as it is final.

    Each implementation's first round checks correctness, times it and measures its memory;
    the later rounds time it and check its last timed call and a call on fresh inputs, the
    implementations taking turns in an order that rotates each round. A point that fails in
    any round ends there with that failure.
    """
    suite = context.suite
    latency = suite.measure.latency
    rounds = latency.rounds if latency else 1
    first_round = dataclasses.replace(suite.measure, latency=latency.per_round() if latency else None)
    later_round = dataclasses.replace(first_round, correctness=None, memory=False)
    cap = memory_cap_bytes(suite.limits, case.device)
    timed: list[_Point] = []
    for implementation in implementations:
        if context.progress:
            context.progress.point(implementation.name, case)
        point = _Point(implementation, case, context.options.get(implementation.name, {}), context.run_id, rounds)
        ended = (point.refusal(context.curves, cap, context.broken.get(implementation.name))
                 or point.run_round(first_round, suite, cap, context.threads))
        if ended:
            yield ended
        elif rounds == 1:
            yield point.finished_row()
        else:
            timed.append(point)
    for round_index in range(1, rounds):
        turn = round_index % len(timed) if timed else 0
        for point in timed[turn:] + timed[:turn]:
            if context.progress:
                context.progress.point(point.implementation.name, case)
            ended = point.run_round(later_round, suite, cap, context.threads)
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
    notes: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    verifier: Verifier | None = None

    def row(self, status: str, reasons: Sequence[str], **fields) -> Row:
        notes = tuple(dict.fromkeys((*self.notes, *fields.pop("notes", ()))))
        return Row(run_id=self.run_id, implementation=self.implementation.name, case=self.case, status=status,
                   reasons=tuple(reasons), options=self.options, wall_time_s=self.wall_time_s, notes=notes, **fields)

    def refusal(self, curves: _Curves, cap: int | None, broken: str | None) -> Row | None:
        """The row of a point that is not run: a broken plugin, no such device, or predicted too big.
        (The implementation's own reasons are asked in the worker: plugin code runs there.)"""
        if broken is not None:
            return self.row("error", [broken])
        unavailable = device_unavailable_reason(self.case.device)
        if unavailable:
            return self.row("unsupported", [unavailable])
        skip = curves.skip_reason(self.implementation, self.case, cap)
        return self.row("skipped", [skip]) if skip else None

    def run_round(self, measure: Measure, suite: Suite, cap: int | None, threads: int) -> Row | None:
        """Runs one round in a fresh worker; the point's final row when it failed there."""
        job = Job(self.implementation, self.case, self.options, measure, suite.seed, cap, self.verifier)
        result = run_isolated(job, suite.limits.timeout_s, threads)
        self.wall_time_s += result.wall_time_s
        self.notes.extend(result.notes)
        outcome = result.outcome
        if isinstance(outcome, Measurement):
            self.measurements.append(outcome)
            self.verifier = self.verifier or outcome.verifier
            return None
        if not isinstance(outcome, Failure):
            return self.row("error", [f"the worker sent {type(outcome).__name__}, not a measurement"])
        where = f" (in round {len(self.measurements) + 1} of {self.rounds})" if self.measurements else ""
        reasons = [reason + where for reason in outcome.reasons]
        return self.row(outcome.status, reasons, detail=outcome.detail or result.log_tail, notes=outcome.notes)

    def finished_row(self) -> Row:
        first = self.measurements[0]
        latencies = [m.latency for m in self.measurements if m.latency is not None]
        checks = [m.correctness for m in self.measurements if m.correctness is not None]
        incorrect = any(m.status == "incorrect" for m in self.measurements)
        return self.row(
            "incorrect" if incorrect else "ok",
            list(dict.fromkeys(reason for m in self.measurements for reason in m.reasons)),
            correctness=Correctness.merge(checks) if checks else None,
            latency=Latency.merge(latencies) if latencies else None,
            memory=first.memory,
            notes=tuple(note for m in self.measurements for note in m.notes),
        )


class _Curves:
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

