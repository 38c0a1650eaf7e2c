"""compare's default threshold: the two runs' own noise, not a figure measured on one machine.

Each round of a point runs in a fresh worker, so how far apart its rounds' medians lie (the
slowest over the fastest, ``Latency.round_spread``) is how far that point moves from one process
to the next with no change of code. A change no larger than what most points' own rounds show
cannot be told from that noise, so the threshold is a high quantile of that spread over every
timed point of both runs that has two rounds or more. What it cannot see is drift between the
two runs (a machine busier on one day than the other): the median ratio over all points shows that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from attnbench.storage.results import Row

NOISE_QUANTILE = 0.9  # most points' noise, not the one point that was unlucky


@dataclass(frozen=True)
class Threshold:
    """The relative change a point's median must pass to be called slower or faster."""

    value: float | None  # None: nothing to derive it from, and none given
    source: str  # where it came from, for the reader


def noise_threshold(rows: Iterable[Row]) -> Threshold:
    """NOISE_QUANTILE of the round-to-round spread of every ok, timed point with two rounds or more."""
    spreads = [row.latency.round_spread for row in rows
               if row.status == "ok" and row.latency is not None and not row.latency_voided
               and len(row.latency.round_sizes) >= 2]
    if not spreads:
        return Threshold(None, "no point of either run has two rounds to measure its noise from")
    return Threshold(
        float(np.quantile(spreads, NOISE_QUANTILE)),
        f"the {round(NOISE_QUANTILE * 100)}th percentile of the round-to-round spread of the {len(spreads)} "
        "points with two rounds or more in the two runs, each point's slowest round's median over its fastest's",
    )
