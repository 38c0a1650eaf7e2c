"""The FLOPs of a point's timed call: exact attention counted by the harness, an approximation's
own declaration (``Implementation.flops``) checked, since plugin code may return anything."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation
from attnbench.contract.work import FlopCount, exact_attention
from attnbench.measuring.figures import Work
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


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
