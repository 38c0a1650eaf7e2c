"""The contract an attention implementation fulfils, and the checks the registry applies to it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnbench.case import Case, device_unavailable_reason
from attnbench.errors import UserError, did_you_mean

# (q, k, v) -> out, all (batch, heads, seq_len, head_dim); k and v may have fewer heads.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]{0,31}$")
# Growth in seq_len: "1", "n", "n log n", "n^1.5", "n^2", "n^2 log n".
COMPLEXITY_PATTERN = re.compile(r"^(1|n(\^(?P<power>\d+(\.\d+)?))?(?P<log> log n)?)$")
COMPLEXITIES_ALLOWED = '"1", "n", "n log n", "n^1.5", "n^2" (n^<number>, optionally followed by " log n")'


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|out - ref| <= atol + rtol * max|ref|.

    Judged against the largest reference magnitude rather than elementwise, so that entries
    near zero (common in attention outputs and gradients) do not demand absolute precision.
    """

    atol: float
    rtol: float

    def bound(self, reference_max_abs: float) -> float:
        return self.atol + self.rtol * reference_max_abs


# For inputs ~ N(0, 1). naive and flash on the CPU (outputs up to N=32768, gradients up to
# N=2048) use at most a quarter of these bounds; a real bug (a wrong scale, mask or gradient)
# misses them by orders of magnitude.
DEFAULT_TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-6, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-3, rtol=4e-3),
    torch.bfloat16: Tolerance(atol=8e-3, rtol=3e-2),
}


def complexity_exponent(text: str) -> float:
    """The power of n in a declared complexity; log factors count as no extra power."""
    match = COMPLEXITY_PATTERN.match(text)
    if match is None:
        raise ValueError(f"complexity {text!r} is not one of {COMPLEXITIES_ALLOWED}")
    if text == "1":
        return 0.0
    return float(match.group("power") or 1)


class Implementation:
    """Base class of every attention implementation. Subclass it and set the attributes.

    ``prepare`` does everything that is not the attention itself (random features, masks,
    compilation) and returns the callable that is timed. ``reference`` optionally computes,
    in float64, exactly what the implementation approximates (e.g. attention under its
    sparsity mask), so a bug can be told apart from the approximation.
    """

    name: str = ""
    description: str = ""
    exact: bool
    time_complexity: str
    memory_complexity: str
    default_options: Mapping[str, Any] = {}
    tolerances: Mapping[torch.dtype, Tolerance] = DEFAULT_TOLERANCES

    def not_supported_reasons(self, case: Case) -> list[str]:
        """Empty when the case can run; else each reason names the value and what is allowed."""
        return []

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        """Option name -> what is wrong with its value and what is allowed; empty when all are valid.

        Called with the defaults and the suite's options merged; types are already checked.
        """
        return {}

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        case: Case,
        options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor | None:
        """Float64 output at query positions ``rows`` of what this computes exactly, or None.

        Inputs are float64 (batch, heads, seq_len, head_dim); the result is
        (batch, heads, len(rows), head_dim). Without an override, outputs are judged
        against full softmax attention when ``exact`` and only reported otherwise.
        """
        return None

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerances.get(dtype, DEFAULT_TOLERANCES[dtype])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def contract_violations(obj: object) -> list[str]:
    """What is wrong with ``obj`` as an implementation; empty when it fulfils the contract."""
    if not isinstance(obj, Implementation):
        return [f"{obj!r} is not an attnbench.Implementation"]
    problems: list[str] = []
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        problems.append(f"name={name!r} (allowed: lowercase letters, digits, '_' or '-', at most 32)")
    if not isinstance(getattr(obj, "description", None), str):
        problems.append("description must be a string")
    if not isinstance(getattr(obj, "exact", None), bool):
        problems.append(f"exact={getattr(obj, 'exact', None)!r} (allowed: True or False)")
    for attribute in ("time_complexity", "memory_complexity"):
        value = getattr(obj, attribute, None)
        if not (isinstance(value, str) and COMPLEXITY_PATTERN.match(value)):
            problems.append(f"{attribute}={value!r} (allowed: {COMPLEXITIES_ALLOWED})")
    if not isinstance(obj.default_options, Mapping) or not all(
        isinstance(key, str) for key in obj.default_options
    ):
        problems.append("default_options must be a mapping from option names to default values")
    if type(obj).prepare is Implementation.prepare:
        problems.append("prepare(case, options) is not implemented")
    return problems


def option_problem(implementation: Implementation, key: str, value: Any) -> str | None:
    """Why ``key: value`` is not a valid option of ``implementation``, or None when it is.

    An option's type is that of its default (an int default also takes no bool; a float
    default also takes an int); a None default takes any value.
    """
    defaults = implementation.default_options
    if key not in defaults:
        allowed = ", ".join(defaults) if defaults else "none"
        return f"unknown option for {implementation.name} (allowed: {allowed}){did_you_mean(key, defaults)}"
    default = defaults[key]
    for default_type, accepted, description in _OPTION_TYPES:
        if isinstance(default, default_type):
            if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
                return None
            return f"expected {description}, got {value!r}"
    return None


_OPTION_TYPES: tuple[tuple[type, tuple[type, ...], str], ...] = (
    (bool, (bool,), "true or false"),  # before int: bool is an int in Python
    (int, (int,), "an integer"),
    (float, (int, float), "a number"),
    (str, (str,), "a string"),
    ((list, tuple), (list, tuple), "a list"),
)


def reasons_not_to_run(implementation: Implementation, case: Case) -> list[str]:
    """Why the implementation cannot take the case here: the device is missing, or its own reasons."""
    unavailable = device_unavailable_reason(case.device)
    return [unavailable] if unavailable else implementation.not_supported_reasons(case)


def effective_options(implementation: Implementation, given: Mapping[str, Any]) -> dict[str, Any]:
    """The implementation's defaults with ``given`` laid over them; a bad option is a UserError."""
    for key, value in given.items():
        problem = option_problem(implementation, key, value)
        if problem:
            raise UserError(f"options.{implementation.name}.{key}: {problem}")
    options = {**implementation.default_options, **given}
    for key, problem in implementation.invalid_options(options).items():
        raise UserError(f"options.{implementation.name}.{key}: {problem}")
    return options
