"""The attnbench command: run a suite, list implementations."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from attnbench.case import DEVICE_PATTERN, DEVICES_ALLOWED, DTYPES, Case, available_devices
from attnbench.errors import UserError, did_you_mean
from attnbench.implementation import Implementation
from attnbench.progress import TerminalProgress
from attnbench.registry import Registry, load_registry
from attnbench.runner import run_suite
from attnbench.suite import Suite, load_suite
from attnbench.summary import summary_table

# The shape `attnbench list` asks each implementation about, per device and dtype.
LIST_PROBE = dict(batch=1, heads=8, kv_heads=8, seq_len=1024, head_dim=64, causal=False, mode="forward")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except UserError as error:
        print(f"attnbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnbench: interrupted (rows finished so far are kept in the run's rows.jsonl)", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbench", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a suite and summarise it")
    run.add_argument("suite", type=Path, help="suite file (YAML), e.g. suites/quick.yaml")
    run.add_argument("--output", type=Path, help="results folder (default: the suite's output, else results/)")
    run.add_argument("--implementations", help="comma-separated names, instead of the suite's list")
    run.add_argument("--device", help=f"run every case on this device ({DEVICES_ALLOWED})")
    run.set_defaults(command=_run)

    listing = commands.add_parser("list", help="list implementations and where they run")
    listing.set_defaults(command=_list)
    return parser


def _run(args: argparse.Namespace) -> int:
    registry = load_registry()
    for problem in registry.problems:
        print(f"attnbench: warning: {problem}", file=sys.stderr)
    suite = _apply_flags(load_suite(args.suite, registry), args, registry)
    result = run_suite(suite, registry, output=args.output, progress=TerminalProgress())
    print(summary_table(result.rows))
    print(f"\nresults: {result.rows_path}")
    return 0


def _apply_flags(suite: Suite, args: argparse.Namespace, registry: Registry) -> Suite:
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
        suite = dataclasses.replace(suite, sweep=dataclasses.replace(suite.sweep, device=(args.device,)))
    return suite


def _list(args: argparse.Namespace) -> int:
    registry = load_registry()
    devices = available_devices()
    for implementation in registry.implementations():
        print(_describe(implementation, registry))
        for device in devices:
            for line in _support_on(implementation, device):
                print(f"    {line}")
    if not len(registry):
        print("no implementations registered")
    if registry.problems:
        print("\nplugins that failed to load:")
        for problem in registry.problems:
            print(f"  {problem}")
    return 0


def _describe(implementation: Implementation, registry: Registry) -> str:
    kind = "exact" if implementation.exact else "approximate"
    options = ", ".join(f"{key}={value!r}" for key, value in implementation.default_options.items())
    lines = [
        f"{implementation.name}  ({kind}; time {implementation.time_complexity}, "
        f"memory {implementation.memory_complexity}; plugin {registry.plugin_of(implementation.name)})",
        f"    {implementation.description}",
    ]
    if options:
        lines.append(f"    options: {options}")
    return "\n".join(lines)


def _support_on(implementation: Implementation, device: str) -> list[str]:
    """"cpu: runs (float32, ...)" and, indented below, each dtype it refuses with the reasons."""
    runs, refusals = [], []
    for name, dtype in DTYPES.items():
        case = Case(dtype=dtype, device=device, **LIST_PROBE)
        try:
            reasons = implementation.not_supported_reasons(case)
        except Exception as error:  # a plugin bug shows here rather than breaking the listing
            reasons = [f"not_supported_reasons raised {type(error).__name__}: {error}"]
        if reasons:
            refusals.append(f"{name}: {'; '.join(reasons)}")
        else:
            runs.append(name)
    if not refusals:
        return [f"{device}: runs ({', '.join(runs)})"]
    head = f"{device}: runs ({', '.join(runs)}), not:" if runs else f"{device}: does not run:"
    return [head, *(f"    {refusal}" for refusal in refusals)]


if __name__ == "__main__":
    sys.exit(main())
