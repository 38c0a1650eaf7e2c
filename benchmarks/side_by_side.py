"""Side-by-side figures from attnbench runs: our implementations against their peers, and
where each approximation becomes faster than flash.

    python benchmarks/side_by_side.py results/peers/<run-id> [results/long_seq/<run-id> ...]

For every run: per (mode, causal, N), each pair's median latencies, their ratio (ours/theirs)
and relative errors against exact attention; for runs with flash, the crossover length,
interpolated on the log-log latency curve, from which each implementation is faster; and the
log-log slopes of latency and peak memory against N from N=4096 up (least squares).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from attnbench.analysis.curves import crossover_between
from attnbench.analysis.scaling import fit_exponent
from attnbench.presenting.summary import format_table
from attnbench.storage.results import Row
from attnbench.storage.run_folder import load_run
from attnbench.support.units import format_bytes, format_seconds

PAIRS = (("performer", "lucidrains_performer"), ("nystrom", "lucidrains_nystrom"), ("sparse", "lucidrains_local"))
BASELINE = "flash"


def main(run_dirs: list[str]) -> int:
    for run_dir in run_dirs:
        # load_run: the ledger checked, rows edited after the run named and left out
        rows = [row for row in load_run(Path(run_dir)).rows if row.status in ("ok", "incorrect")]
        print(f"== {run_dir}")
        print(pairs_table(rows))
        print()
        print(crossover_table(rows))
        print()
        print(slope_table(rows))
        print()
    return 0


def pairs_table(rows: list[Row]) -> str:
    by_point = {(row.implementation, _curve(row), row.case.seq_len): row for row in rows}
    points = sorted({(curve, seq_len) for _, curve, seq_len in by_point})
    lines = []
    for ours, theirs in PAIRS:
        for curve, seq_len in points:
            mine, other = by_point.get((ours, curve, seq_len)), by_point.get((theirs, curve, seq_len))
            if mine is None or other is None:
                continue
            lines.append([
                ours, theirs, curve, str(seq_len),
                format_seconds(mine.latency.median_s), format_seconds(other.latency.median_s),
                f"{mine.latency.median_s / other.latency.median_s:.2f}",
                _error(mine), _error(other), _memory(mine), _memory(other),
            ])
    headers = ("ours", "theirs", "case", "N", "ours median", "theirs median", "ours/theirs",
               "ours rel err", "theirs rel err", "ours peak", "theirs peak")
    return format_table(headers, lines) if lines else "(no pairs measured in this run)"


def crossover_table(rows: list[Row]) -> str:
    curves: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        curves[(row.implementation, _curve(row))][row.case.seq_len] = row.latency.median_s
    lines = []
    for (name, curve), points in sorted(curves.items()):
        baseline = curves.get((BASELINE, curve))
        if name == BASELINE or not baseline:
            continue
        lines.append([name, curve, crossover_between(points, baseline, "faster")[1]])
    return format_table(("implementation", "case", f"faster than {BASELINE} from"), lines) if lines else ""


def slope_table(rows: list[Row], from_seq_len: int = 4096) -> str:
    curves: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        if row.case.seq_len >= from_seq_len:
            curves[(row.implementation, _curve(row))].append(row)
    lines = []
    for (name, curve), points in sorted(curves.items()):
        if len(points) < 2:
            continue
        sizes = [row.case.seq_len for row in points]
        latency = _exponent(list(zip(sizes, [row.latency.median_s for row in points], strict=True)))
        peaks = [row.memory.peak_bytes for row in points if row.memory and row.memory.peak_bytes]
        memory = _exponent(list(zip(sizes, peaks, strict=True))) if len(peaks) == len(points) else float("nan")
        lines.append([name, curve, f"{min(sizes)}-{max(sizes)}", f"{latency:.2f}", f"{memory:.2f}"])
    headers = ("implementation", "case", "N range", "latency slope", "memory slope")
    return format_table(headers, lines) if lines else f"(fewer than two points from N={from_seq_len})"


def _curve(row: Row) -> str:
    case = row.case
    return f"{case.mode}{' causal' if case.causal else ''}"


def _error(row: Row) -> str:
    figures = row.correctness.exact.get("out") if row.correctness else None
    return f"{figures.rel_fro:.3f}" if figures else ""


def _memory(row: Row) -> str:
    return format_bytes(row.memory.peak_bytes) if row.memory and row.memory.peak_bytes is not None else ""


def _exponent(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of log(value) on log(N), as the report's scaling fits take it."""
    return fit_exponent([(n, (value,)) for n, value in points])[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

