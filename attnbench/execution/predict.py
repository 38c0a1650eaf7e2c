"""Predicts a point's cost from the smaller points of the same curve already measured."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from attnbench.contract.case import CURVE_LABEL


@dataclass(frozen=True)
class Prediction:
    value: float
    basis: str  # how it was obtained, for the skip reason

    def __str__(self) -> str:
        return self.basis


def extrapolate(points: Sequence[tuple[int, float]], seq_len: int, declared_exponent: float) -> Prediction | None:
    """Log-log extrapolation from the two largest smaller points, or one point and the declared power.

    The measured slope is floored at the declared power minus a half (small points are often
    dominated by constant costs that flatten the curve) and capped at 3.
    """
    smaller = sorted((n, value) for n, value in points if n < seq_len and value > 0)
    if not smaller:
        return None
    if len(smaller) == 1:
        (n1, v1), slope = smaller[0], declared_exponent
        basis = f"{CURVE_LABEL}={n1} and the declared n^{declared_exponent:g}"
    else:
        (n0, v0), (n1, v1) = smaller[-2:]
        measured = math.log(v1 / v0) / math.log(n1 / n0)
        slope = min(3.0, max(measured, declared_exponent - 0.5))
        basis = f"from {CURVE_LABEL}={n0}, {n1} at slope {slope:.2f}"
    return Prediction(v1 * (seq_len / n1) ** slope, basis)
