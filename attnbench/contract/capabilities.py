"""What an implementation supports, declared as data and checked by the harness.

An implementation declares (attnbench.Implementation has the defaults):

    devices = ("cpu", "cuda")          device kinds it runs on; None: any
    dtypes = (torch.float16,)          None: any
    supports_causal = True
    supports_backward = True           training mode (forward and backward)
    supports_grouped_query = True      kv_heads < heads
    supports_chunked_prefill = False   q_len < seq_len outside decode (a chunk of queries onto more keys)
    supports_decode = False            mode=decode (implement prepare_decode)
    unsupported_because = {"causal": "why, in a few words"}   optional, shown in the reason

The harness checks these before asking the implementation's own ``not_supported_reasons``, so a
plugin lists only the reasons that are truly its own. A shape feature added to the sweep later
gets a ``supports_...`` attribute that defaults to False: a plugin written before it existed
refuses those points instead of running them wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnbench.contract.case import DTYPE_NAMES, Case


@dataclass(frozen=True)
class Capability:
    """A yes/no feature of a case and the attribute that says whether it is supported."""

    attribute: str  # e.g. "supports_causal"
    key: str  # the word unsupported_because uses, e.g. "causal"
    needed: Callable[[Case], bool]  # does this case need the feature?
    shown: Callable[[Case], str]  # the case's value, e.g. "causal=True"
    allowed: str  # what the implementation supports instead, e.g. "causal=False"
    default: bool  # what an implementation that says nothing supports


FEATURES: tuple[Capability, ...] = (
    Capability("supports_causal", "causal", lambda case: case.causal, lambda case: "causal=True",
               "causal=False", default=True),
    Capability("supports_backward", "backward", lambda case: case.backward, lambda case: f"mode={case.mode}",
               "mode=forward", default=True),
    Capability("supports_grouped_query", "grouped_query", lambda case: case.kv_heads != case.heads,
               lambda case: f"kv_heads={case.kv_heads} < heads={case.heads}", "kv_heads = heads", default=True),
    Capability("supports_chunked_prefill", "chunked_prefill", lambda case: case.chunked,
               lambda case: f"q_len={case.q_len} < seq_len={case.seq_len}", "q_len = seq_len", default=False),
    Capability("supports_decode", "decode", lambda case: case.decode, lambda case: "mode=decode",
               "mode=forward or forward_backward", default=False),
)
ATTRIBUTES = ("devices", "dtypes", "unsupported_because", *(feature.attribute for feature in FEATURES))


def capability_reasons(implementation: Any, case: Case) -> list[str]:
    """Why the declared capabilities rule the case out; empty when they allow it."""
    because = getattr(implementation, "unsupported_because", None) or {}
    reasons = []
    devices = getattr(implementation, "devices", None)
    if devices is not None and case.device_type not in devices:
        reasons.append(_reason(f"device={case.device}", because.get("device"), ", ".join(devices)))
    dtypes = getattr(implementation, "dtypes", None)
    if dtypes is not None and case.dtype not in dtypes:
        allowed = ", ".join(DTYPE_NAMES.get(dtype, str(dtype)) for dtype in dtypes)
        reasons.append(_reason(f"dtype={case.dtype_name}", because.get("dtype"), allowed))
    for feature in FEATURES:
        if feature.needed(case) and not getattr(implementation, feature.attribute, feature.default):
            reasons.append(_reason(feature.shown(case), because.get(feature.key), feature.allowed))
    return reasons


def declared_limits(implementation: Any) -> list[str]:
    """What the declared capabilities rule out, e.g. ['devices: cpu, cuda', 'no causal'] (for `attnbench list`)."""
    limits = []
    if getattr(implementation, "devices", None) is not None:
        limits.append(f"devices: {', '.join(implementation.devices)}")
    if getattr(implementation, "dtypes", None) is not None:
        limits.append(f"dtypes: {', '.join(DTYPE_NAMES.get(d, str(d)) for d in implementation.dtypes)}")
    because = getattr(implementation, "unsupported_because", None) or {}
    for feature in FEATURES:
        if not getattr(implementation, feature.attribute, feature.default):
            why = because.get(feature.key)
            limits.append(f"no {feature.key.replace('_', '-')}" + (f" ({why})" if why else ""))
    return limits


def declaration_problems(implementation: Any) -> list[str]:
    """What is wrong with the declared capabilities (for the registry's contract check)."""
    problems = []
    devices = getattr(implementation, "devices", None)
    if devices is not None and not (isinstance(devices, tuple) and all(isinstance(d, str) for d in devices)):
        problems.append(f"devices={devices!r} (allowed: None or a tuple of device kinds such as ('cpu', 'cuda'))")
    dtypes = getattr(implementation, "dtypes", None)
    if dtypes is not None and not (isinstance(dtypes, tuple) and all(isinstance(d, torch.dtype) for d in dtypes)):
        problems.append(f"dtypes={dtypes!r} (allowed: None or a tuple of torch dtypes)")
    for feature in FEATURES:
        value = getattr(implementation, feature.attribute, feature.default)
        if not isinstance(value, bool):
            problems.append(f"{feature.attribute}={value!r} (allowed: True or False)")
    because = getattr(implementation, "unsupported_because", None) or {}
    if not (isinstance(because, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in because.items())):
        problems.append("unsupported_because must map feature names to short explanations")
    return problems


def _reason(shown: str, why: str | None, allowed: str) -> str:
    return f"{shown} ({why + '; ' if why else ''}supported: {allowed})"
