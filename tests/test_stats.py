"""The Mann–Whitney test against values worked out by hand."""

from __future__ import annotations

import random

import pytest

from attnbench.analysis.stats import mann_whitney_p, rounds_needed, smallest_p


def test_exact_small_samples():
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)  # 2 of 20 orderings as extreme
    assert mann_whitney_p([1, 2, 4], [3, 5, 6]) == pytest.approx(0.2)  # U=1: 2·2/20
    assert mann_whitney_p([1, 3, 5], [2, 4, 6]) == pytest.approx(0.7)
    assert smallest_p(3, 3) == pytest.approx(0.1) and smallest_p(5, 5) == pytest.approx(2 / 252)


def test_rounds_needed_to_reach_a_level():
    assert rounds_needed(0.01) == 5  # 4 and 4: 2/70 = 0.029; 5 and 5: 2/252 = 0.0079
    assert rounds_needed(0.05) == 4 and rounds_needed(0.5) == 2  # 1 and 1 give p = 1 at best


def test_large_samples_tell_a_shift_from_noise():
    rng = random.Random(0)
    base = [rng.gauss(1.0, 0.05) for _ in range(40)]
    same = [rng.gauss(1.0, 0.05) for _ in range(40)]
    slower = [rng.gauss(1.2, 0.05) for _ in range(40)]
    assert mann_whitney_p(base, slower) < 1e-6
    assert mann_whitney_p(base, same) > 0.01


def test_ties_are_handled():
    assert mann_whitney_p([1.0] * 30, [1.0] * 30) == 1.0
    assert mann_whitney_p([1.0] * 25 + [2.0] * 5, [2.0] * 30) < 0.01
