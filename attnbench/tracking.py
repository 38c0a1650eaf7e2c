"""Single points for benchmark runners that do their own timing: asv and pytest-benchmark.

They time ``prepared_call(...)()``; the figures they cannot see (peak memory, error against the
float64 reference) come from ``point_figures``, attnbench's own measurement of the same point.
An implementation that is not registered or cannot take the case raises NotSupported with the
reasons, which the runner turns into its own skip. A name may be a variant's, as a suite's option
sweep names them (``performer[features=64]``): that implementation with those options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnbench.contract.case import DTYPES, Case, Mode
from attnbench.contract.errors import NotSupported
from attnbench.contract.implementation import Implementation, effective_options, reasons_not_to_run
from attnbench.contract.registry import Registry, load_registry
from attnbench.measuring.inputs import make_inputs
from attnbench.measuring.call_server import attention_call
from attnbench.measuring.in_process import measure_case
from attnbench.measuring.timing import synchronize
from attnbench.settings.suite import CorrectnessSettings, Measure
from attnbench.settings.variants import parse_variant


def point(
    seq_len: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64, causal: bool = False,
    mode: Mode = "forward", dtype: str = "float32", device: str = "cpu",
) -> Case:
    return Case(batch=batch, heads=heads, kv_heads=heads, seq_len=seq_len, head_dim=head_dim,
                dtype=DTYPES[dtype], device=device, causal=causal, mode=mode)


@functools.cache
def registry() -> Registry:
    """Built-ins and installed plugins, as `attnbench run` sees them."""
    return load_registry()


def supported(name: str, case: Case) -> Implementation:
    """The registered implementation (of a variant: the one it runs), or NotSupported saying why
    it cannot run this case here."""
    name, _ = _variant(name)
    if name not in registry().names():
        raise NotSupported(f"{name} is not registered (registered: {', '.join(registry().names())})")
    implementation = registry().get(name)
    reasons = reasons_not_to_run(implementation, case)
    if reasons:
        raise NotSupported(f"{name}: {'; '.join(reasons)}")
    return implementation


def prepared_call(name: str, case: Case, options: Mapping[str, Any] | None = None,
                  seed: int = 0) -> Callable[[], Any]:
    """The attention call (forward, or forward and backward) on seeded inputs, prepared and
    run once, so that what is timed is the call alone."""
    implementation = supported(name, case)
    attention = implementation.prepare(case, effective_options(implementation, _options(name, options)))
    call = attention_call(attention, make_inputs(case, seed), case.backward)
    call()  # lazy set-up (compilation, caches) is not the call's cost
    synchronize(torch.device(case.device))
    return call


@dataclass(frozen=True)
class Figures:
    peak_bytes: int | None
    error: float | None  # relative Frobenius error of the output against exact attention
    status: str  # "ok", or "incorrect" for an exact implementation out of its tolerance


def point_figures(name: str, case: Case, options: Mapping[str, Any] | None = None, seed: int = 0) -> Figures:
    """Peak memory and error of one point, as `attnbench run` measures them (no timing)."""
    implementation = supported(name, case)
    measure = Measure(correctness=CorrectnessSettings(rows=256), latency=None, memory=True)
    measurement = measure_case(implementation, case, effective_options(implementation, _options(name, options)),
                               measure, seed)
    correctness = measurement.correctness
    return Figures(
        peak_bytes=measurement.memory.peak_bytes if measurement.memory else None,
        error=correctness.exact["out"].rel_fro if correctness else None,
        status=measurement.status,
    )


def _variant(name: str) -> tuple[str, dict[str, Any]]:
    try:
        return parse_variant(name)
    except ValueError as error:
        raise NotSupported(str(error)) from None


def _options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A variant's options with ``options`` laid over them."""
    return {**_variant(name)[1], **(options or {})}
