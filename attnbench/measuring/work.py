"""The FLOPs of a point's timed call, and a decode step's bytes: exact attention counted by the
harness, an approximation's own declarations (``Implementation.flops``, ``step_bytes``) checked,
since plugin code may return anything."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    try:
        declared = implementation.flops(case, options)
    except Exception as error:  # noqa: BLE001 (plugin code: a failure costs its throughput, not its row)
        return None, f"flops() raised {type(error).__name__}: {one_line(str(error), 200)}; no throughput"
    if declared is None:
        return None, ""
    if not (isinstance(declared, FlopCount) and _positive_number(declared.flops)
            and isinstance(declared.formula, str) and declared.formula.strip()):
        return None, (f"flops() returned {one_line(repr(declared), 200)} (expected None or an attnbench.FlopCount "
                      "with a positive, finite count and its formula); no throughput")
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
    try:
        declared = implementation.step_bytes(case, options)
    except Exception as error:  # noqa: BLE001 (plugin code: a failure costs its bandwidth, not its row)
        return None, f"step_bytes() raised {type(error).__name__}: {one_line(str(error), 200)}; no bandwidth"
    if declared is None:
        return None, ""
    if not (isinstance(declared, ByteCount) and _positive_number(declared.bytes)
            and isinstance(declared.formula, str) and declared.formula.strip()):
        return None, (f"step_bytes() returned {one_line(repr(declared), 200)} (expected None or an "
                      "attnbench.ByteCount with a positive, finite count and its formula); no bandwidth")
    return Traffic(float(declared.bytes), one_line(declared.formula, FORMULA_CHARS), declared=True), ""


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
