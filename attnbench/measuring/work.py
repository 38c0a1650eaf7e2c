"""An approximation's own declarations of its work (``Implementation.flops``, ``step_bytes``),
checked where they are made, since plugin code may return anything, and again where the harness
receives them. Exact attention's work is counted by the harness (attnbench.measuring.round)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation
from attnbench.contract.work import ByteCount, FlopCount
from attnbench.support.text import one_line

FORMULA_CHARS = 200


def declared_flops(
    implementation: Implementation, case: Case, options: Mapping[str, Any]
) -> tuple[tuple[float, str] | None, str]:
    """The FLOPs an implementation declares for one timed call, with the formula; and a note when
    its declaration could not be used (no throughput then; the point's other figures stand)."""
    declared, note = _declaration(lambda: implementation.flops(case, options), "flops", FlopCount, "flops",
                                 "throughput")
    return (float(declared.flops), one_line(declared.formula, FORMULA_CHARS)) if declared else None, note


def declared_bytes(
    implementation: Implementation, case: Case, options: Mapping[str, Any]
) -> tuple[tuple[float, str] | None, str]:
    """The bytes an implementation declares for one decode step (nothing outside decode), as
    ``declared_flops`` does."""
    if not case.decode:
        return None, ""
    declared, note = _declaration(lambda: implementation.step_bytes(case, options), "step_bytes", ByteCount,
                                 "bytes", "bandwidth")
    return (float(declared.bytes), one_line(declared.formula, FORMULA_CHARS)) if declared else None, note


def usable_count(value: object) -> tuple[float, str] | None:
    """A declaration as it came back from a worker, if it is a positive, finite count and a formula."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        return None
    count, formula = value
    if not _positive_number(count) or not isinstance(formula, str) or not formula.strip():
        return None
    return float(count), one_line(formula, FORMULA_CHARS)


def _declaration(
    declare: Callable[[], Any], method: str, expected: type, amount: str, lost: str
) -> tuple[Any, str]:
    """What a plugin's count ``method`` returned, if usable: an ``expected`` with a positive,
    finite ``amount`` and a formula; else None and a note (empty when it declared nothing)."""
    try:
        declared = declare()
    except Exception as error:  # noqa: BLE001 (plugin code: a failure costs this figure, not its row)
        return None, f"{method}() raised {type(error).__name__}: {one_line(str(error), 200)}; no {lost}"
    if declared is None:
        return None, ""
    if not (isinstance(declared, expected) and _positive_number(getattr(declared, amount))
            and isinstance(declared.formula, str) and declared.formula.strip()):
        return None, (f"{method}() returned {one_line(repr(declared), 200)} (expected None or an "
                      f"attnbench.{expected.__name__} with a positive, finite count and its formula); no {lost}")
    return declared, ""


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
