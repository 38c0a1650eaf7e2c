"""What decode steps cost, per point: latency per step, tokens per second, the state kept between
steps, and the bandwidth a step achieved against the device's copy rate (measured once per run,
like the matmul yardstick): decode is memory-bound, so that fraction is its headline figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attnbench.analysis.curves import achieved_bandwidth, metric_value, tokens_per_second
from attnbench.storage.results import Row


@dataclass(frozen=True)
class DecodePoint:
    row: Row
    step_s: float | None  # median latency of one step; None when it is no result
    tokens_per_s: float | None
    state_bytes: int | None  # kept between steps
    bytes_per_s: float | None  # achieved: the step's counted or declared bytes over its latency
    fraction_of_copy: float | None  # of the run's copy rate on that device and dtype


def decode_points(rows: Sequence[Row], copy_bytes_per_s: Mapping[str, float]) -> list[DecodePoint]:
    """Every decode row that ran, in the order given."""
    points = []
    for row in rows:
        if not row.case.decode or row.status not in ("ok", "incorrect"):
            continue
        achieved = achieved_bandwidth(row)
        copy = copy_bytes_per_s.get(row.yardstick_key(row.case.dtype_name))
        points.append(DecodePoint(row, metric_value(row, "latency"), tokens_per_second(row),
                                  row.memory.state_kept_bytes if row.memory else None, achieved,
                                  achieved / copy if achieved and copy else None))
    return points
