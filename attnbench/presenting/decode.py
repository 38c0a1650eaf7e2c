"""The report's decode section: per cache length, each implementation's step latency, tokens per
second, state kept between steps and achieved bandwidth against the copy yardstick."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from attnbench.analysis.curves import output_error
from attnbench.analysis.decode import DecodePoint
from attnbench.contract.case import CURVE_LABEL, Case, curve_x, describe_group, group_key
from attnbench.presenting.layout import Table
from attnbench.support.units import format_bytes, format_seconds

HEADERS = ("implementation", f"{CURVE_LABEL} cached", "per step", "tokens/s", "state kept", "GB/s", "of copy",
           "error", "bytes counted as")


def decode_tables(points: Sequence[DecodePoint], copy_bytes_per_s: Mapping[str, float]) -> list[Table]:
    """One table per decode group, by cache length, fastest step first."""
    by_group: dict[Case, list[DecodePoint]] = defaultdict(list)
    for point in points:
        by_group[group_key(point.row.case)].append(point)
    yardstick = ", ".join(f"{key}: {value / 1e9:.1f} GB/s" for key, value in copy_bytes_per_s.items()) or "not measured"
    note = ("A step takes in its new tokens (batch × q) and attends over the cache and them; what it keeps between "
            "steps (a KV cache, a window, a recurrent state) is built outside the timer and held fixed, so every "
            "sample measures the same cache length. State kept: the bytes torch holds for it after prepare_decode. "
            "Bandwidth: the bytes a step must move (exact attention's counted by the harness: the whole cache read "
            "once; an approximation's as it declares) over the median step, and its fraction of a device-to-device "
            f"copy's rate measured in this run ({yardstick}).")
    tables = []
    for group, group_points in by_group.items():
        ordered = sorted(group_points, key=lambda p: (curve_x(p.row.case), p.step_s is None, p.step_s or 0.0))
        lines = tuple(_line(point) for point in ordered)
        tables.append(Table(f"Decode steps — {describe_group(group)}", HEADERS, lines, note))
    return tables


def _line(point: DecodePoint) -> tuple[str, ...]:
    row = point.row
    error = output_error(row)
    return (row.implementation, str(curve_x(row.case)),
            format_seconds(point.step_s) if point.step_s is not None else "no result",
            f"{point.tokens_per_s:.4g}" if point.tokens_per_s else "",
            format_bytes(point.state_bytes) if point.state_bytes is not None else "",
            f"{point.bytes_per_s / 1e9:.3g}" if point.bytes_per_s else "",
            f"{100 * point.fraction_of_copy:.0f}%" if point.fraction_of_copy else "",
            f"{error:.2e}" if error is not None else "",
            row.traffic.formula if row.traffic else "not declared")
