"""The Mann–Whitney U test (two-sided), as asv uses it to tell a change from noise, on independent
units (compare gives it each round's median): scipy.stats.mannwhitneyu (exact for small samples
without ties, the normal approximation with tie and continuity corrections otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from scipy import stats


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of 'x and y come from the same distribution'."""
    if not x or not y:
        raise ValueError("both samples must be non-empty")
    return float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)


@cache
def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p the exact test can give (fully separated samples): 0.1 for 3 and 3."""
    return float(stats.mannwhitneyu(range(n1), range(n1, n1 + n2), alternative="two-sided", method="exact").pvalue)


def rounds_needed(alpha: float) -> int:
    """The fewest units in each of two samples with which the exact test can go below ``alpha``."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    n = 1
    while smallest_p(n, n) >= alpha:
        n += 1
    return n
