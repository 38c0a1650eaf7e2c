"""The attnbench command: run a suite, list implementations, report on, compare and track runs."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from attnbench.analysis.compare import compare_runs
from attnbench.analysis.noise import Threshold
from attnbench.analysis.scaling import scaling_fits
from attnbench.contract.case import DEVICE_PATTERN, DEVICES_ALLOWED, DTYPES, Case, available_devices, describe_group
from attnbench.contract.errors import UserError, did_you_mean
from attnbench.contract.catalog import Catalog, ImplementationInfo, SourceInfo
from attnbench.execution.local.catalog import load_catalog
from attnbench.execution.placement import Placement
from attnbench.execution.runner import run_suite
from attnbench.presenting.answer import answer_text
from attnbench.presenting.compare import comparison_text
from attnbench.presenting.progress import TerminalProgress
from attnbench.presenting.run_facts import input_capture_text
from attnbench.presenting.summary import format_table, summary_table
from attnbench.settings.loader import load_report_settings, load_suite
from attnbench.settings.suite import MAX_ERROR_BUDGETS, Suite
from attnbench.storage.run_folder import SUITE_COPY, Declared, declared_of, load_run
from attnbench.support.containment import Interrupted, PluginFault, install_interrupt_handlers
from attnbench.support.text import one_line

# The shape `attnbench list` asks each implementation about, per device and dtype, and how long
# its not_supported_reasons may take to answer.
LIST_PROBE = dict(batch=1, heads=8, kv_heads=8, seq_len=1024, head_dim=64, causal=False, mode="forward")
LIST_TIMEOUT_S = 10.0
# `compare --fail-on-regression` with no THRESHOLD: the threshold derived from the runs' noise
# (not a string: argparse would pass a string const through the flag's type).
NOISE = object()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    install_interrupt_handlers()
    try:
        return args.command(args)
    except UserError as error:
        print(f"attnbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        name = error.signal_name if isinstance(error, Interrupted) else "SIGINT"
        print(f"attnbench: stopped by {name} (rows finished so far are kept in the run's rows.jsonl)",
              file=sys.stderr)
        return error.exit_code if isinstance(error, Interrupted) else 130
    except BrokenPipeError:  # e.g. `attnbench history ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming the flag and what is allowed (exit 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"attnbench: error: {self.prog}: {one_line(message)} (see: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="attnbench", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a suite and summarise it")
    run.add_argument("suite", type=Path, help="suite file (YAML), e.g. suites/quick.yaml")
    run.add_argument("--output", type=Path, help="results folder (default: the suite's output, else results/)")
    run.add_argument("--implementations", help="comma-separated names, instead of the suite's list")
    run.add_argument("--device", help=f"run every case on this device ({DEVICES_ALLOWED})")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="measure only the points this earlier run of the same suite and code lacks")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local (default): this machine, one point at a time; ray: a Ray cluster, one case per "
                          "GPU and one per node on CPUs (needs the ray extra)")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="join this Ray cluster ('auto', or host:port) instead of starting one on this machine; "
                          "implies --executor ray")
    run.set_defaults(command=_run)

    listing = commands.add_parser("list", help="list implementations and where they run")
    listing.set_defaults(command=_list)

    report = commands.add_parser("report", help="rebuild a run's reports (CSV, Markdown, HTML, plots) from its rows")
    report.add_argument("run_dir", type=Path, help="a run folder, e.g. results/long_seq/<run-id>")
    report.add_argument("--error-budgets", type=_budgets, metavar="E1,E2",
                        help="relative errors under which approximations are compared (default: the suite's "
                             "report.error_budgets, else 0.01,0.1)")
    report.set_defaults(command=_report)

    compare = commands.add_parser("compare", help="compare two runs point by point")
    compare.add_argument("base", type=Path, help="the earlier run: a run folder or its rows.jsonl")
    compare.add_argument("new", type=Path, help="the later run: a run folder or its rows.jsonl")
    compare.add_argument(
        "--fail-on-regression", nargs="?", type=_fraction, const=NOISE, default=None, metavar="THRESHOLD",
        help="exit 1 if most points of an implementation's curve are significantly slower by more than "
             "THRESHOLD (e.g. 0.3 or 30%%; default: the runs' own round-to-round noise, printed with where it "
             "came from)",
    )
    compare.set_defaults(command=_compare)

    history = commands.add_parser("history", help="one implementation's latency across a suite's stored runs")
    history.add_argument("suite_results", type=Path, help="the suite's results folder, e.g. results/long_seq")
    history.add_argument("implementation", help="implementation name, e.g. flash")
    history.add_argument("--plots", type=Path, help="folder for the plots (default: SUITE_RESULTS/history)")
    history.set_defaults(command=_history)
    return parser


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted(float(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected relative errors separated by commas, e.g. 0.01,0.1, got {text!r}") from None
    if not values or len(values) > MAX_ERROR_BUDGETS or not all(0 < value < math.inf for value in values):
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_ERROR_BUDGETS} positive finite relative errors, e.g. "
                                         f"0.01,0.1, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        message = f"expected a fraction such as 0.3 or a percentage such as 30%, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not math.isfinite(value) or value < 0:  # nan would make every comparison with it false
        raise argparse.ArgumentTypeError(f"must be a finite fraction, not negative, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    with load_catalog() as catalog:  # the plugins' code stays in a confined worker
        for problem in (*catalog.problems, *catalog.settings_changed):
            _warn(str(problem))
        suite = _apply_flags(load_suite(args.suite, catalog), args, catalog)
        placement = _placement(args, catalog)
        progress = TerminalProgress()
        try:
            result = run_suite(suite, catalog, output=args.output, progress=progress, resume=args.resume,
                               warn=_warn, placement=placement)
        finally:
            progress.close()
    if result.rows:
        run = load_run(result.run_dir)
        budgets = suite.report.error_budgets
        print(summary_table(run.rows))
        print("\n" + answer_text(run.rows, run.declared, budgets))
        captures = input_capture_text(run.rows)
        if not captures.startswith("none"):
            print(f"\ninputs: {captures}")
        print(f"\nresults: {result.rows_path}")
        from attnbench.presenting.report import write_reports  # (matplotlib and pandas: see _report)

        written = write_reports(run, budgets)
        print(f"report: {written[2]} (and {', '.join(path.name for path in written[:2])}, plots/)")
    if result.interrupted is not None:
        finished = len(result.rows)
        print(f"attnbench: stopped by {result.interrupted.signal_name}: the {finished} finished point(s) are kept in "
              f"{result.run_dir}; resume with: {_resume_command(args, result.run_dir)}", file=sys.stderr)
        return result.interrupted.exit_code
    if result.unplaced:
        print(f"attnbench: {result.unplaced} point(s) were not measured (every node that could run them was lost); "
              f"measure them with: {_resume_command(args, result.run_dir)}", file=sys.stderr)
        return 1
    return 0


def _placement(args: argparse.Namespace, catalog: Catalog) -> Placement | None:
    """Where the cases run: None for this machine (the default)."""
    if args.executor != "ray" and args.ray_address is None:
        return None
    from attnbench.execution.distributed.placement import RayPlacement, require_ray

    require_ray()
    return RayPlacement(catalog, args.ray_address, warn=_warn)


def _warn(text: str) -> None:
    print(f"attnbench: warning: {one_line(text)}", file=sys.stderr)


def _resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that measures what the stopped run lacks, with the flags it was started with."""
    words = ["attnbench", "run", str(args.suite), "--resume", str(run_dir)]
    for flag in ("implementations", "device", "executor", "ray_address"):
        if getattr(args, flag) not in (None, "local"):
            words += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return shlex.join(words)


def _report(args: argparse.Namespace) -> int:
    # Imported here: matplotlib and pandas add about a second to start-up, which only the
    # commands that draw should pay (not `list`, nor `run` before its sweep).
    from attnbench.presenting.report import write_reports

    run = load_run(args.run_dir, fallback=_declared_from_registry())
    budgets = args.error_budgets or load_report_settings(run.path / SUITE_COPY).error_budgets
    written = write_reports(run, budgets)
    for fit in scaling_fits(run.rows, run.declared):
        if fit.exponent is not None:
            print(f"{fit.implementation:16s} {fit.metric:8s} {describe_group(fit.group)}: {fit.sentence()}")
    print("\n" + answer_text(run.rows, run.declared, budgets) + "\n")
    print(f"report: {written[2]} (and {', '.join(path.name for path in written[:2])}, plots/)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    given = args.fail_on_regression
    threshold = None if given is None or given is NOISE else Threshold(given, "given with --fail-on-regression")
    comparison = compare_runs(load_run(args.base), load_run(args.new), threshold)
    for difference in comparison.environment_differences:
        print(f"attnbench: warning: the runs' environments differ: {difference}", file=sys.stderr)
    print(comparison_text(comparison))
    failed = comparison.regressions or comparison.status_regressions
    return 1 if failed and args.fail_on_regression is not None else 0


def _history(args: argparse.Namespace) -> int:
    from attnbench.analysis.history import histories, suite_runs
    from attnbench.presenting.plots import write_history_plot  # (matplotlib: see _report)

    runs = suite_runs(args.suite_results)
    folder = args.plots or args.suite_results / "history"
    for history in histories(runs, args.implementation):
        print(f"{history.implementation} — {describe_group(history.group)}")
        lines = [[run, history.machines[run], history.options[run] or "-",
                  *(history.cells.get((run, n), "") for n in history.seq_lens)] for run in history.runs]
        print(format_table(("run", "machine", "options", *(f"N={n}" for n in history.seq_lens)), lines))
        for change in history.changes():
            print(f"note: {change}")
        print(f"plot: {write_history_plot(history, folder)}\n")
    return 0


def _declared_from_registry() -> dict[str, Declared]:
    """For runs stored before they kept their implementations' declarations."""
    with load_catalog() as catalog:
        return declared_of(catalog.implementations)


def _apply_flags(suite: Suite, args: argparse.Namespace, registry: Catalog) -> Suite:
    if args.implementations is not None:
        names = [name.strip() for name in args.implementations.split(",") if name.strip()]
        if not names:
            raise UserError("--implementations: give at least one name")
        for name in names:
            if name not in registry:
                raise UserError(
                    f"--implementations: unknown implementation {name!r} "
                    f"(registered: {', '.join(registry.names())}){did_you_mean(name, registry.names())}"
                )
        suite = dataclasses.replace(suite, implementations=tuple(dict.fromkeys(names)))
    if args.device is not None:
        if not DEVICE_PATTERN.match(args.device):
            raise UserError(f"--device: unknown device {args.device!r} (allowed: {DEVICES_ALLOWED})")
        suite = dataclasses.replace(suite, sweeps=tuple(dataclasses.replace(sweep, device=(args.device,))
                                                        for sweep in suite.sweeps))
    return suite


def _list(args: argparse.Namespace) -> int:
    devices = available_devices()
    with load_catalog() as catalog:
        for implementation in catalog.implementations.values():
            print(_describe(implementation))
            for device in devices:
                for line in _support_on(catalog, implementation.name, device):
                    print(f"    {line}")
        if not len(catalog):
            print("no implementations registered")
        print("\ninput sources (sweep.inputs; parameters under source_options):")
        for source in catalog.input_sources.values():
            print(_describe_source(source))
        if catalog.problems:
            print("\nplugins that failed to load:")
            for problem in catalog.problems:
                print(f"  {one_line(str(problem))}")
        if catalog.settings_changed:
            print("\nplugins that changed process-wide settings while loading (put back):")
            for problem in catalog.settings_changed:
                print(f"  {one_line(str(problem))}")
    return 0


def _describe(implementation: ImplementationInfo) -> str:
    kind = "exact" if implementation.exact else "approximate"
    options = ", ".join(f"{key}={value!r}" for key, value in implementation.default_options.items())
    decode = (f"; decode step {implementation.decode_time_complexity}, state {implementation.decode_memory_complexity}"
              if implementation.supports_decode else "")
    lines = [
        f"{implementation.name}  ({kind}; time {implementation.time_complexity}, "
        f"memory {implementation.memory_complexity}{decode}; plugin {implementation.plugin})",
        f"    {one_line(implementation.description)}",
    ]
    if options:
        lines.append(f"    options: {options}")
    if implementation.declares:
        lines.append(f"    declares: {'; '.join(implementation.declares)}")
    return "\n".join(lines)


def _describe_source(source: SourceInfo) -> str:
    lines = [f"  {source.name}: {one_line(source.description)}"]
    if source.parameters:
        lines.append(f"      parameters: {', '.join(f'{key}={value!r}' for key, value in source.parameters.items())}")
    return "\n".join(lines)


def _support_on(catalog: Catalog, name: str, device: str) -> list[str]:
    """"cpu: runs (float32, ...)" and, indented below, each dtype it refuses with the reasons (asked
    in the catalog's worker: a plugin's bug, an exception, a hang, a wrong return type, shows here)."""
    runs, refusals = [], []
    cases = [Case(dtype=dtype, device=device, **LIST_PROBE) for dtype in DTYPES.values()]
    for dtype_name, reasons in zip(DTYPES, catalog.support(name, cases, LIST_TIMEOUT_S), strict=True):
        if isinstance(reasons, PluginFault):
            refusals.append(one_line(f"{dtype_name}: {reasons.message}"))
            if reasons.timed_out:  # one hang is enough to know; the listing goes on
                break
            continue
        if reasons:
            refusals.append(one_line(f"{dtype_name}: {'; '.join(reasons)}"))
        else:
            runs.append(dtype_name)
    if not refusals:
        return [f"{device}: runs ({', '.join(runs)})"]
    head = f"{device}: runs ({', '.join(runs)}), not:" if runs else f"{device}: does not run:"
    return [head, *(f"    {refusal}" for refusal in refusals)]


if __name__ == "__main__":
    sys.exit(main())
