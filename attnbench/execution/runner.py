"""Runs a suite: every (implementation, case) becomes exactly one row, written as it finishes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from attnbench.contract.case import Case
from attnbench.contract.catalog import Catalog, as_catalog, resolved_options
from attnbench.contract.registry import Registry
from attnbench.execution.cases import CaseWork
from attnbench.execution.dispatch import Dispatcher
from attnbench.execution.executor import Executor, ImplementationRef, PointRound, WorkUnit
from attnbench.execution.local.executor import LocalExecutor
from attnbench.execution.placement import Placement, ThisMachine, device_kind
from attnbench.execution.scheduler import SweepPlan
from attnbench.execution.skips import SkipPredictor
from attnbench.execution.yardsticks import best_of
from attnbench.measuring import outcome
from attnbench.settings.grid import expand_all
from attnbench.settings.suite import Suite
from attnbench.settings.variants import Variant, variants
from attnbench.storage import run_folder
from attnbench.storage.environment import Environment
from attnbench.storage.results import Row
from attnbench.support.confinement import set_dumpable
from attnbench.support.containment import Interrupted, PluginFault, deferred_interrupts
from attnbench.support.text import one_line
from attnbench.support.units import format_seconds

# A sweep this large prints its size and a time estimate before it starts.
LARGE_SWEEP_POINTS = 2000
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
    unplaced: int = 0  # points not measured because every slot that could run them was lost

    @property
    def rows_path(self) -> Path:
        return self.run_dir / run_folder.ROWS_FILE


def run_suite(
    suite: Suite,
    registry: Catalog | Registry,
    *,
    output: Path | None = None,
    progress: ProgressListener | None = None,
    resume: Path | None = None,
    warn: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    placement: Placement | None = None,
) -> RunResult:
    """Measure every implementation of the suite on every case of its sweep.

    Cases run in grid order; within a case the implementations take turns, in rounds, so that
    implementations compared with each other are measured side by side, not an hour apart.
    ``output``: the --output flag (else the suite's output field); ``resume``: a run folder of the
    same suite and code, of which only the missing points are measured; ``warn``: told anything
    the user should know before the sweep starts (a busy machine, a very large grid);
    ``executor``: what runs the rounds on this machine (default: forked workers, one at a time);
    ``placement``: where cases run (default: this machine; attnbench.execution.distributed for a
    Ray cluster), each row written here as it comes back. ``registry``: the catalog of installed
    plugins (attnbench.execution.local.catalog: no plugin code in this process), or a Registry of
    objects built by the calling Python code.
    A SIGTERM, SIGHUP or Ctrl-C (attnbench.support.containment.Interrupted) ends the sweep with
    every finished row kept; the result says which signal it was.
    """
    warn = warn or (lambda text: None)
    set_dumpable(False)  # the process that keeps the ledger: no worker may read or ptrace it
    catalog = as_catalog(registry)
    placement = placement or ThisMachine(executor or LocalExecutor(catalog, started=_progress_of_points(progress)))
    series = variants(suite)
    implementations = {variant.name: catalog.get(variant.implementation) for variant in series}
    threads = suite.measure.threads or torch.get_num_threads()
    options, broken = _resolve_options(series, catalog)
    cases = expand_all(suite.sweeps)
    _announce_size(suite, len(cases) * len(implementations), warn)

    if resume is not None:
        run_dir = resume
        environment, done, lock = run_folder.resume_run(run_dir, suite, warn)
    else:
        run_dir, lock = run_folder.new_run_folder(output, suite)
        environment = placement.environment(threads, _plugin_sources(catalog, series))
        environment = dataclasses.replace(environment, input_sources=_input_sources(catalog, suite, cases))
        busy = environment.busy_warning()
        if busy:
            warn(busy)
        run_folder.write_run_files(run_dir, environment, implementations, suite)
        done = []

    latency = suite.measure.latency
    skips = SkipPredictor(suite.limits, latency.min_samples if latency else 1, latency.rounds if latency else 1)
    done = [row for row in done if not outcome.never_measured(row.status, row.reasons)]  # measured now
    for row in done:  # earlier points still inform predictions and budgets
        skips.record(row)
    recorded = {(row.implementation, row.case) for row in done}
    refs = {variant.name: ImplementationRef(catalog.plugin_of(variant.implementation), variant.implementation)
            for variant in series}
    plan = SweepPlan(suite, refs, options, broken, {name: impl.exact for name, impl in implementations.items()},
                     run_dir.name, threads)
    todo = [CaseWork(case, names) for case in cases
            if (names := tuple(name for name in implementations if (name, case) not in recorded))]
    writer = run_folder.row_writer(run_dir)
    rows: list[Row] = list(done)
    interrupted = None
    dispatcher = None
    if progress:
        progress.started(sum(len(work.series) for work in todo))
    try:
        slots = placement.open(plan, {device_kind(case.device) for case in cases}, environment.matmul_flops_samples,
                               environment.copy_bytes_per_s_samples)
        dispatcher = Dispatcher(placement, slots, plan, implementations, skips, _progress_of_cases(progress), warn,
                                environment.matmul_flops_samples, environment.copy_bytes_per_s_samples)
        for row in dispatcher.run(todo):
            with deferred_interrupts():
                writer.write(row)
            rows.append(row)
            if progress:
                progress.finished(row)
    except Interrupted as signal_received:
        interrupted = signal_received
    finally:
        placement.close()
        writer.close()
        if dispatcher is not None:
            flops, copy = dispatcher.flops_samples, dispatcher.copy_samples
            environment = dataclasses.replace(
                environment, matmul_flops=best_of(flops), matmul_flops_samples=flops, copy_bytes_per_s=best_of(copy),
                copy_bytes_per_s_samples=copy, nodes={**environment.nodes, **placement.nodes()})
        run_folder.write_environment(run_dir, environment)
        lock.close()
    return RunResult(run_dir, tuple(rows), environment, interrupted, dispatcher.unplaced if dispatcher else 0)


def _progress_of_points(progress: ProgressListener | None) -> Callable[[WorkUnit], None] | None:
    if progress is None:
        return None

    def started(unit: WorkUnit) -> None:
        if isinstance(unit, PointRound):
            progress.point(unit.series, unit.case)

    return started


def _progress_of_cases(progress: ProgressListener | None) -> Callable[[str, CaseWork], None]:
    def started(slot: str, work: CaseWork) -> None:
        if progress is not None and work.series:
            progress.point(work.series[0], work.case)

    return started


def _resolve_options(series: Sequence[Variant], catalog: Catalog) -> tuple[dict[str, dict], dict[str, str]]:
    """Each series' options; and, for a plugin whose invalid_options fails, why (its points
    become error rows)."""
    options, broken = {}, {}
    for variant in series:
        resolved = resolved_options(catalog, variant.implementation, variant.options)
        if isinstance(resolved, PluginFault):
            broken[variant.name] = resolved.message
        else:
            options[variant.name] = resolved
    return options, broken


def _announce_size(suite: Suite, points: int, warn: Callable[[str], None]) -> None:
    if points <= LARGE_SWEEP_POINTS:
        return
    latency = suite.measure.latency
    per_point = (latency.min_run_time_s + latency.rounds * POINT_OVERHEAD_S) if latency else POINT_OVERHEAD_S
    warn(f"{suite.path}: this sweep has {points} points (implementations × cases); at least "
         f"{format_seconds(per_point)} each, so at least {points * per_point / 3600:.1f} h in all")


def _input_sources(catalog: Catalog, suite: Suite, cases: Sequence[Case]) -> dict[str, dict]:
    """What each input source of the sweep is, and the parameters it runs with."""
    facts = {}
    for name in dict.fromkeys(case.inputs for case in cases):
        source = catalog.input_sources[name]
        facts[name] = {"description": one_line(source.description),
                       "parameters": {**source.parameters, **suite.source_options.get(name, {})}}
    return facts


def _plugin_sources(catalog: Catalog, series: Sequence[Variant]) -> dict[str, dict]:
    sources: dict[str, dict] = {}
    for name in dict.fromkeys(variant.implementation for variant in series):
        plugin = catalog.plugin_of(name)
        source = catalog.source_of(name)
        entry = sources.setdefault(plugin, {"distribution": source.distribution if source else "unknown",
                                            "version": source.version if source else "unknown",
                                            "implementations": []})
        entry["implementations"].append(name)
    return sources
