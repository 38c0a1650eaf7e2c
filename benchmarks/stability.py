"""How stable are the comparisons? Runs one suite twice and prints, for every case, the ratio of
one implementation's median to another's in each run and how far the two runs' ratios differ.

    python benchmarks/stability.py [SUITE] [--pair flash/naive] [--output DIR]

Issue 6's target: running the quick suite twice, flash/naive differs between the runs by less
than 10% at each seq_len. Absolute times drift on a shared machine; a ratio measured within one
run should not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from attnbench.contract.registry import load_registry
from attnbench.execution.runner import run_suite
from attnbench.presenting.summary import format_table
from attnbench.settings.loader import load_suite
from attnbench.storage.results import Row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="suites/quick.yaml")
    parser.add_argument("--pair", default="flash/naive", help="NUMERATOR/DENOMINATOR implementations")
    parser.add_argument("--output", type=Path, help="results folder (default: a temporary one)")
    args = parser.parse_args(argv)
    numerator, denominator = args.pair.split("/")
    registry = load_registry()
    suite = load_suite(args.suite, registry)
    output = args.output or Path(tempfile.mkdtemp(prefix="attnbench-stability-"))
    runs = [run_suite(suite, registry, output=output).rows for _ in range(2)]
    ratios = [_ratios(rows, numerator, denominator) for rows in runs]
    lines, worst = [], 0.0
    for case in ratios[0]:
        if case not in ratios[1]:
            continue
        first, second = ratios[0][case], ratios[1][case]
        change = abs(second / first - 1)
        worst = max(worst, change)
        lines.append([case, f"{first:.3f}", f"{second:.3f}", f"{100 * change:.1f}%"])
    print(format_table(("case", f"{args.pair} run 1", f"{args.pair} run 2", "difference"), lines))
    latency = suite.measure.latency
    settings = (f"{latency.rounds} rounds, {latency.min_run_time_s:g}-{latency.max_run_time_s:g} s per point, "
                if latency else "")
    threads = suite.measure.threads or "all"
    print(f"\nlargest difference between the runs: {100 * worst:.1f}% (target: < 10%); {settings}threads: "
          f"{threads}; runs in {output}")
    return 0


def _ratios(rows: tuple[Row, ...], numerator: str, denominator: str) -> dict[str, float]:
    medians = {(row.implementation, row.case.describe()): row.latency.median_s
               for row in rows if row.status == "ok" and row.latency}
    return {case: medians[(numerator, case)] / medians[(denominator, case)]
            for (name, case) in medians if name == numerator and (denominator, case) in medians}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
