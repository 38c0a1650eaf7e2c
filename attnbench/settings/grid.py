"""Expands a suite's sweep into cases, in a deterministic order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnbench.contract.case import AXES, DTYPES, Case
from attnbench.settings.suite import Sweep

# The axes from the outermost loop to the innermost (attnbench.contract.case.Axis.nesting).
NESTING = sorted(AXES, key=lambda name: AXES[name].nesting)


def expand_all(sweeps: Sequence[Sweep]) -> list[Case]:
    """The cases of every sweep in turn, each case once."""
    return list(dict.fromkeys(case for sweep in sweeps for case in expand(sweep)))


def expand(sweep: Sweep) -> list[Case]:
    """Every combination of the axes; the curve axis (seq_len) is innermost and ascending.

    Ascending seq_len within each group of the other axes lets the runner predict, from the
    smaller points just measured, whether a larger one would exceed the limits. Combinations
    that make no call (more queries than keys) are left out.
    """
    cases: list[Case] = []

    def loop(depth: int, chosen: dict[str, Any]) -> None:
        if depth == len(NESTING):
            case = Case(**{**chosen, "dtype": DTYPES[chosen["dtype"]]})
            if not case.shape_problem:
                cases.append(case)
            return
        name = NESTING[depth]
        axis = AXES[name]
        values = getattr(sweep, name)
        if values is None:
            values = (chosen[axis.same_as],)
        for value in sorted(values) if axis.curve else values:
            loop(depth + 1, {**chosen, name: value})

    loop(0, {})
    return cases
