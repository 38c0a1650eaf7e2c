"""The contract an attention implementation fulfils, and the checks the registry applies to it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnbench.contract.capabilities import capability_reasons, declaration_problems
from attnbench.contract.case import Case, device_unavailable_reason
from attnbench.contract.errors import UserError, did_you_mean
from attnbench.contract.work import ByteCount, FlopCount
from attnbench.support.text import one_line

# (q, k, v) -> out: q and out (batch, heads, query_len, head_dim), k and v (batch, kv_heads,
# key_len, head_dim) (attnbench.Case: query_len = key_len = seq_len unless q_len is set).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# A decode step: (q, k, v) of the q_len new tokens -> their output (batch, heads, q_len, head_dim).
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

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


# What a plugin may declare, at most: a tolerance loose enough to pass zeros (rtol near 1, or an
# atol as large as the outputs) would make an exact claim meaningless. Float32 allows Nyström's
# rtol of 1e-3 against its own reference (a badly conditioned pseudo-inverse), no more.
TOLERANCE_CAP_FACTOR = Tolerance(atol=10.0, rtol=100.0)  # times the dtype's default
TOLERANCE_CAP_RTOL = 0.1


def capped_tolerance(declared: Tolerance, dtype: torch.dtype) -> tuple[Tolerance, str]:
    """The tolerance a point is judged with, and a note when the declared one was over the cap."""
    default = DEFAULT_TOLERANCES[dtype]
    # Rounded to 6 digits: 1e-6 × 10 is 9.999999999999999e-06 in binary, below a declared 1e-5.
    cap = Tolerance(atol=float(f"{default.atol * TOLERANCE_CAP_FACTOR.atol:.6g}"),
                    rtol=float(f"{min(default.rtol * TOLERANCE_CAP_FACTOR.rtol, TOLERANCE_CAP_RTOL):.6g}"))
    if not isinstance(declared, Tolerance) or not all(
        isinstance(value, (int, float)) and value >= 0 for value in (declared.atol, declared.rtol)
    ):
        return cap, f"declared tolerance {declared!r} is not a Tolerance of two non-negative numbers; judged at the cap"
    judged = Tolerance(atol=min(declared.atol, cap.atol), rtol=min(declared.rtol, cap.rtol))
    if judged == declared:
        return judged, ""
    name = str(dtype).removeprefix("torch.")
    return judged, (f"declared {name} tolerance atol={declared.atol:g}, rtol={declared.rtol:g} is over the cap "
                    f"(atol <= {cap.atol:g}, rtol <= {cap.rtol:g}); judged at atol={judged.atol:g}, "
                    f"rtol={judged.rtol:g}")


def complexity_exponent(text: str) -> float:
    """The power of n in a declared complexity; log factors count as no extra power."""
    match = COMPLEXITY_PATTERN.match(text)
    if match is None:
        raise ValueError(f"complexity {text!r} is not one of {COMPLEXITIES_ALLOWED}")
    if text == "1":
        return 0.0
    return float(match.group("power") or 1)


def complexity_of_shape(declaring: Any, metric: str, case: Case) -> tuple[str | None, float | None]:
    """What a declaration (an Implementation, or the Declared a run kept) says of the case's curve
    for ``metric`` ("latency", or "memory": a decode step's state): the decode step's complexity
    in decode mode (None when undeclared); for a fixed chunk of queries onto n keys, one power of
    n less than the square pass's, and at least n (every key is read); else the square pass's.
    Its text and exponent."""
    latency = metric == "latency"
    square = declaring.time_complexity if latency else declaring.memory_complexity
    if case.decode:
        text = declaring.decode_time_complexity if latency else declaring.decode_memory_complexity
    elif case.chunked:
        power = complexity_exponent(square) - 1
        text = "n" if power <= 1 else f"n^{power:g}"
    else:
        text = square
    return text, (complexity_exponent(text) if text is not None else None)


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
    # What it supports (attnbench.contract.capabilities), checked before not_supported_reasons.
    devices: tuple[str, ...] | None = None  # device kinds, e.g. ("cpu", "cuda"); None: any
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any
    supports_causal: bool = True
    supports_backward: bool = True
    supports_grouped_query: bool = True
    supports_chunked_prefill: bool = False  # q_len < seq_len in forward modes
    supports_decode: bool = False  # mode=decode: implement prepare_decode and the decode complexities
    # How one decode step grows with the cache's length n, and what it keeps between steps (the
    # state: a KV cache is "n", FAVOR+'s running sums "1"); required with supports_decode.
    decode_time_complexity: str | None = None
    decode_memory_complexity: str | None = None
    unsupported_because: Mapping[str, str] = {}  # e.g. {"causal": "landmarks average over future tokens"}

    def not_supported_reasons(self, case: Case) -> list[str]:
        """Empty when the case can run; else each reason names the value and what is allowed.

        This base checks the declared capabilities; an override adds the reasons that are the
        implementation's own (the harness checks the capabilities whether it calls super or not).
        """
        return capability_reasons(self, case)

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        """Option name -> what is wrong with its value and what is allowed; empty when all are valid.

        Called with the defaults and the suite's options merged; types are already checked.
        """
        return {}

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")

    def prepare_decode(
        self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> DecodeStep:
        """Builds, untimed, what decode steps keep (a KV cache, a recurrent state, a window) from the
        cache's ``seq_len`` keys and values, (batch, kv_heads, seq_len, head_dim) in the case's dtype
        on its device, and returns the timed step.

        The step takes the ``q_len`` new tokens' q, k and v; it must take in their k and v itself
        (append them to its cache, update its state) and return their output over the cache and
        themselves (causal among themselves when ``case.causal``). Every call starts from the same
        ``seq_len`` cached tokens: a step overwrites the slots it appended, or updates a copy of
        the state, so each timed call measures the same n. What the step holds is the state whose
        bytes the harness reports; the tensors passed here are the step's to keep or to drop.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare_decode()")

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

        Inputs are float64: q (batch, heads, query_len, head_dim), k and v (batch, kv_heads, key_len,
        head_dim), the queries being the last query_len positions (a decode step's reference is
        its new tokens' queries over the cache and the new keys); ``rows`` index q. The result is
        (batch, heads, len(rows), head_dim). Without an override, outputs are judged against
        full softmax attention when ``exact`` and only reported otherwise.
        """
        return None

    def step_bytes(self, case: Case, options: Mapping[str, Any]) -> ByteCount | None:
        """The bytes one decode step must read and write at least (its state, the new tokens, the
        output) with the formula (helpers in attnbench.contract.work); None: not declared, and
        its decode rows have no achieved bandwidth. Exact implementations are counted by the
        harness as reading the whole cache, whatever they declare."""
        return None

    def flops(self, case: Case, options: Mapping[str, Any]) -> FlopCount | None:
        """The FLOPs of one timed call (a training step when ``case.backward``) with the formula
        they come from (helpers in attnbench.contract.work); None: not declared, and its rows
        have no throughput. Exact implementations are counted by the harness as exact attention,
        whatever they declare."""
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
    if getattr(obj, "supports_decode", False) is True:
        if type(obj).prepare_decode is Implementation.prepare_decode:
            problems.append("supports_decode=True but prepare_decode(case, options, k_cache, v_cache) "
                            "is not implemented")
        for attribute in ("decode_time_complexity", "decode_memory_complexity"):
            value = getattr(obj, attribute, None)
            if not (isinstance(value, str) and COMPLEXITY_PATTERN.match(value)):
                problems.append(f"{attribute}={value!r} (required with supports_decode; "
                                f"allowed: {COMPLEXITIES_ALLOWED})")
    return problems + declaration_problems(obj)


def option_problem(implementation: Implementation, key: str, value: Any) -> str | None:
    """Why ``key: value`` is not a valid option of ``implementation``, or None when it is.

    An option's type is that of its default (an int default also takes no bool; a float
    default also takes an int); a None default takes any value.
    """
    return setting_problem(implementation.default_options, f"option for {implementation.name}", key, value)


def setting_problem(defaults: Mapping[str, Any], what: str, key: str, value: Any) -> str | None:
    """Why ``key: value`` is not a valid setting among ``defaults`` (``what``: e.g. "option for
    flash"), or None when it is; the value's type is that of its default."""
    if key not in defaults:
        allowed = ", ".join(defaults) if defaults else "none"
        return f"unknown {what} (allowed: {allowed}){did_you_mean(key, defaults)}"
    if not finite(value):
        return f"expected a finite value, got {value!r} (nan and inf are not allowed)"
    default = defaults[key]
    for default_type, accepted, description in _OPTION_TYPES:
        if isinstance(default, default_type):
            if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
                return None
            return f"expected {description}, got {value!r}"
    return None


def finite(value: Any) -> bool:
    """No nan or inf anywhere in the value (lists and mappings included)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(finite(item) for item in value)
    if isinstance(value, Mapping):
        return all(finite(item) for item in value.values())
    return True


_OPTION_TYPES: tuple[tuple[type, tuple[type, ...], str], ...] = (
    (bool, (bool,), "true or false"),  # before int: bool is an int in Python
    (int, (int,), "an integer"),
    (float, (int, float), "a number"),
    (str, (str,), "a string"),
    ((list, tuple), (list, tuple), "a list"),
)


class BrokenPromise(Exception):
    """A plugin's method returned something the contract does not allow."""


def plugin_reasons(implementation: Implementation, case: Case) -> list[str]:
    """Why the implementation refuses the case: its declared capabilities, then its own reasons
    (checked to be a list of strings)."""
    reasons = implementation.not_supported_reasons(case)
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(reason, str) and reason for reason in reasons):
        raise BrokenPromise(f"not_supported_reasons returned {one_line(repr(reasons), 200)} "
                            "(expected a list of non-empty strings)")
    return list(dict.fromkeys([*capability_reasons(implementation, case), *reasons]))


def reasons_not_to_run(implementation: Implementation, case: Case) -> list[str]:
    """Why the implementation cannot take the case here: the device is missing, or its own reasons."""
    unavailable = device_unavailable_reason(case.device)
    return [unavailable] if unavailable else plugin_reasons(implementation, case)


def effective_options(implementation: Implementation, given: Mapping[str, Any]) -> dict[str, Any]:
    """The implementation's defaults with ``given`` laid over them; a bad option is a UserError."""
    for key, value in given.items():
        problem = option_problem(implementation, key, value)
        if problem:
            raise UserError(f"options.{implementation.name}.{key}: {problem}")
    options = {**implementation.default_options, **given}
    for key, problem in invalid_option_values(implementation, options).items():
        raise UserError(f"options.{implementation.name}.{key}: {problem}")
    return options


def invalid_option_values(implementation: Implementation, options: Mapping[str, Any]) -> dict[str, str]:
    """The implementation's ``invalid_options``, checked to be a mapping of option names to strings."""
    problems = implementation.invalid_options(options)
    if not isinstance(problems, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in problems.items()
    ):
        raise BrokenPromise(f"invalid_options returned {one_line(repr(problems), 200)} "
                            "(expected a mapping of option names to strings)")
    return {key: one_line(value) for key, value in problems.items()}
