"""How close the built-in approximations come to the hardware, from attnbench runs of
suites/limits.yaml (all cores) and suites/limits_1thread.yaml (``threads: 1``):

    python benchmarks/hardware_limit.py RUN [RUN ...] [--before OLDER_RUN]    # RUN: results/limits/<run-id>

Per implementation, case and N: its median latency, the FLOP/s its declared work count gives,
that as a fraction of the matmul throughput the same run measured, and the ratio of its latency
to its peer's (lucidrains' packages, measured in the same run) with both relative errors, so a
ratio is only read at equal error. Given several runs (say, one implementation measured again
after a change), a point is taken from the last run that has it, its fraction of matmul against
that run's own rate, and a ratio is given only where both rows come from one run. Then each
curve's log-log slope of peak memory over N, and, with ``--before``, each point against an
earlier run: latency, error and peak memory.

The targets (issue 19) are checked and every miss is printed: forward at N >= 8192 at least 50%
of matmul (a training step at least 35%) for performer, nystrom and hybrid; at most 0.5x the
peer's latency at N = 4096 and 16384; memory slopes at most 1.1; errors within 1% of before.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnbench.analysis.curves import Throughput, output_error, throughputs
from attnbench.analysis.scaling import fit_exponent
from attnbench.presenting.summary import format_table
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder, load_run
from attnbench.support.units import format_bytes, format_seconds

OURS = ("performer", "nystrom", "hybrid", "sparse")
PEER_OF = {"performer": "lucidrains_performer", "nystrom": "lucidrains_nystrom", "sparse": "lucidrains_local"}
THROUGHPUT_TARGETS = {"performer", "nystrom", "hybrid"}
MATMUL_FRACTION = {"forward": 0.50, "forward_backward": 0.35}
THROUGHPUT_FROM_N = 8192
PEER_RATIO, PEER_AT_N = 0.5, (4096, 16384)
MEMORY_SLOPE = 1.1
ERROR_GROWTH = 1.01  # "within 1% of before"


@dataclass(frozen=True)
class Point:
    implementation: str
    curve: str  # mode, and "causal" where it is
    seq_len: int


def point_of(row: Row) -> Point:
    mode = row.case.mode + (" causal" if row.case.causal else "")
    return Point(row.implementation, mode, row.case.seq_len)


def measured(run: RunFolder) -> dict[Point, Row]:
    return {point_of(row): row for row in run.rows if row.status in ("ok", "incorrect")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of suites/limits*.yaml, oldest first")
    parser.add_argument("--before", type=Path, help="an earlier run of the same suite, to compare with")
    args = parser.parse_args(argv)
    rows: dict[Point, Row] = {}
    rates: dict[Point, Throughput] = {}
    source: dict[Point, int] = {}  # which run each point comes from
    for index, path in enumerate(args.runs):
        run = load_run(path)
        points = measured(run)
        rows.update(points)
        rates.update({point_of(t.row): t for t in throughputs(list(points.values()), run.declared, run.matmul_flops)})
        source.update(dict.fromkeys(points, index))
        threads = run.environment.get("torch_threads", "?")
        print(f"== {path} (threads: {threads}; matmul: "
              + ", ".join(f"{key} {rate / 1e9:.0f} GFLOP/s" for key, rate in sorted(run.matmul_flops.items())) + ")")
    misses: list[str] = []
    print(throughput_table(rows, rates, source, misses))
    print()
    print(memory_slopes(rows, misses))
    if args.before:
        print()
        print(before_after(measured(load_run(args.before)), rows, misses))
    print()
    print("targets: all met" if not misses else "targets missed:\n  " + "\n  ".join(misses))
    return 0


def throughput_table(rows: dict[Point, Row], rates: dict[Point, Throughput], source: dict[Point, int],
                     misses: list[str]) -> str:
    lines = []
    for point in sorted((p for p in rows if p.implementation in OURS), key=_order):
        row, rate = rows[point], rates.get(point)
        fraction = rate.fraction_of_matmul if rate else None
        peer_point = Point(PEER_OF.get(point.implementation, ""), point.curve, point.seq_len)
        peer = rows.get(peer_point) if source.get(peer_point) == source[point] else None  # side by side only
        ratio = row.latency.median_s / peer.latency.median_s if peer else None
        lines.append([
            point.implementation, point.curve, str(point.seq_len), format_seconds(row.latency.median_s),
            f"{rate.achieved_flops / 1e9:.1f}" if rate else "", f"{100 * fraction:.0f}%" if fraction else "",
            f"{ratio:.2f}" if ratio else "", _error(row), _error(peer) if peer else "",
        ])
        target = MATMUL_FRACTION[point.curve.split()[0]]
        if point.implementation in THROUGHPUT_TARGETS and point.seq_len >= THROUGHPUT_FROM_N and fraction is not None \
                and fraction < target:
            misses.append(f"{_name(point)}: {100 * fraction:.1f}% of matmul (target {100 * target:.0f}%)")
        if ratio is not None and point.seq_len in PEER_AT_N and ratio > PEER_RATIO:
            misses.append(f"{_name(point)}: {ratio:.2f}x its peer's latency (target {PEER_RATIO}x)")
    headers = ("implementation", "case", "N", "median", "GFLOP/s", "of matmul", "/ peer", "rel err", "peer rel err")
    return format_table(headers, lines) if lines else "(none of performer, nystrom, hybrid, sparse ran)"


def memory_slopes(rows: dict[Point, Row], misses: list[str]) -> str:
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for point, row in rows.items():
        if row.memory and row.memory.peak_bytes:
            curves.setdefault((point.implementation, point.curve), []).append((point.seq_len, row.memory.peak_bytes))
    lines = []
    for (name, curve), points in sorted(curves.items()):
        if len(points) < 2:
            continue
        points.sort()
        slope = _exponent(points)
        lines.append([name, curve, f"{points[0][0]}-{points[-1][0]}", format_bytes(points[-1][1]), f"{slope:.2f}"])
        if name in OURS and slope > MEMORY_SLOPE:
            misses.append(f"{name} {curve}: peak-memory slope {slope:.2f} (target {MEMORY_SLOPE})")
    return format_table(("implementation", "case", "N range", "peak at largest N", "memory slope"), lines)


def before_after(before: dict[Point, Row], after: dict[Point, Row], misses: list[str]) -> str:
    lines = []
    for point in sorted((p for p in after if p in before and p.implementation in OURS), key=_order):
        old, new = before[point], after[point]
        old_error, new_error = output_error(old), output_error(new)
        lines.append([
            point.implementation, point.curve, str(point.seq_len),
            format_seconds(old.latency.median_s), format_seconds(new.latency.median_s),
            f"{old.latency.median_s / new.latency.median_s:.2f}x", _error(old), _error(new),
            _peak(old), _peak(new),
        ])
        if old_error is not None and new_error is not None and new_error > old_error * ERROR_GROWTH \
                and not math.isclose(new_error, old_error, abs_tol=1e-6):
            misses.append(f"{_name(point)}: relative error {new_error:.4g}, before {old_error:.4g}")
    headers = ("implementation", "case", "N", "before", "after", "speed-up", "err before", "err after",
               "peak before", "peak after")
    return format_table(headers, lines) if lines else "(no point measured in both runs)"


def _order(point: Point) -> tuple[int, str, int]:
    return OURS.index(point.implementation), point.curve, point.seq_len


def _name(point: Point) -> str:
    return f"{point.implementation} {point.curve} N={point.seq_len}"


def _error(row: Row) -> str:
    error = output_error(row)
    return f"{error:.4f}" if error is not None else ""


def _peak(row: Row) -> str:
    return format_bytes(row.memory.peak_bytes) if row.memory and row.memory.peak_bytes else ""


def _exponent(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of log(value) on log(N), as the report's scaling fits take it."""
    return fit_exponent([(n, (value,)) for n, value in points])[0]


if __name__ == "__main__":
    sys.exit(main())

