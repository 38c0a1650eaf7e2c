"""The Mann–Whitney U test (two-sided), as asv uses it to tell a change from noise in raw samples.

Exact for small samples without ties (the null distribution of U counted by recursion), the
normal approximation with tie and continuity corrections otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

EXACT_UP_TO = 40  # total samples for the exact distribution


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of 'x and y come from the same distribution'."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    ranks = _ranks([*x, *y])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    tied = len(set(x) | set(y)) < n1 + n2
    if not tied and n1 + n2 <= EXACT_UP_TO:
        u = min(u1, n1 * n2 - u1)
        tail = sum(_count(n1, n2, k) for k in range(int(u) + 1)) / math.comb(n1 + n2, n1)
        return min(1.0, 2 * tail)
    mean = n1 * n2 / 2
    ties = _tie_term([*x, *y])
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (abs(u1 - mean) - 0.5) / math.sqrt(variance)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p the exact test can give: with 3 and 3 samples, 0.1."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


@functools.cache
def _count(n1: int, n2: int, u: int) -> int:
    """How many orderings of n1 x's and n2 y's have U = u (U: the (x, y) pairs with x above y)."""
    if u < 0 or u > n1 * n2:
        return 0
    if n1 == 0 or n2 == 0:
        return 1 if u == 0 else 0
    # The largest value is an x (it beats all n2 y's) or a y (it adds nothing to U).
    return _count(n1 - 1, n2, u - n2) + _count(n1, n2 - 1, u)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def _tie_term(values: Sequence[float]) -> float:
    counts: dict[float, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return float(sum(t**3 - t for t in counts.values()))
