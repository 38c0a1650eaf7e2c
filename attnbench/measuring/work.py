"""The FLOPs of a point's timed call, and a decode step's bytes: exact attention counted by the
harness, an approximation's own declarations (``Implementation.flops``, ``step_bytes``) checked,
since plugin code may return anything."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation
from attnbench.contract.work import ByteCount, FlopCount, exact_attention, exact_decode_bytes
from attnbench.measuring.figures import Traffic, Work
from attnbench.support.text import one_line

FORMULA_CHARS = 200


def counted_work(implementation: Implementation, case: Case, options: Mapping[str, Any]) -> tuple[Work | None, str]:
    """The work of one timed call, and a note when a declaration could not be used (no throughput
    then; the point's other figures stand)."""
    if implementation.exact:  # the work is the problem's, not the plugin's to declare
        count = exact_attention(case)
        return Work(count.flops, count.formula, declared=False), ""
    declared, note = _declaration(lambda: implementation.flops(case, options), "flops", FlopCount, "flops",
                                 "throughput")
    if declared is None:
        return None, note
    return Work(float(declared.flops), one_line(declared.formula, FORMULA_CHARS), declared=True), ""


def counted_traffic(
    implementation: Implementation, case: Case, options: Mapping[str, Any]
) -> tuple[Traffic | None, str]:
    """The bytes of one decode step (None outside decode), and a note when a declaration could not
    be used (no achieved bandwidth then)."""
    if not case.decode:
        return None, ""
    if implementation.exact:
        count = exact_decode_bytes(case)
        return Traffic(count.bytes, count.formula, declared=False), ""
    declared, note = _declaration(lambda: implementation.step_bytes(case, options), "step_bytes", ByteCount,
                                 "bytes", "bandwidth")
    if declared is None:
        return None, note
    return Traffic(float(declared.bytes), one_line(declared.formula, FORMULA_CHARS), declared=True), ""


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
