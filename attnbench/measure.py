"""Measures one (implementation, case) in this process: correctness, latency, peak memory.

The runner calls this inside a worker process (attnbench.worker); tests and plugin authors
may call it directly.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnbench.case import Case
from attnbench.correctness import Grads, check_correctness, output_problems
from attnbench.implementation import AttentionFn, Implementation
from attnbench.inputs import Inputs, make_inputs
from attnbench.memory import measure_peak_memory
from attnbench.results import Measurement
from attnbench.suite import Measure
from attnbench.timing import measure_latency, synchronize


def measure_case(
    implementation: Implementation,
    case: Case,
    options: Mapping[str, Any],
    measure: Measure,
    seed: int = 0,
) -> Measurement:
    """Prepare (untimed), call once to check the result, then time and measure memory.

    Exceptions propagate: the worker turns them into an ``error`` or ``oom`` row.
    """
    device = torch.device(case.device)
    inputs = make_inputs(case, seed)
    with warnings.catch_warnings(record=True) as caught:  # the implementation's notes for the row
        warnings.simplefilter("always")
        attention = implementation.prepare(case, options)
        call = attention_call(attention, inputs, case.backward)
        started = time.perf_counter()
        result = call()
        synchronize(device)
        first_call_s = time.perf_counter() - started
    notes = _own_warnings(caught, implementation)

    out, grads = result if case.backward else (result, None)
    problems = output_problems(out, grads, case)
    correctness = None
    if not problems and measure.correctness is not None:
        correctness = check_correctness(
            implementation, case, options, inputs, out, grads, measure.correctness, seed
        )
        problems.extend(correctness.failures)
    del result, out, grads

    latency = measure_latency(call, device, measure.latency, first_call_s) if measure.latency else None
    memory = measure_peak_memory(call, device) if measure.memory else None
    return Measurement(
        status="incorrect" if problems else "ok",
        reasons=tuple(problems),
        correctness=correctness,
        latency=latency,
        memory=memory,
        notes=notes,
    )


def _own_warnings(caught: list[warnings.WarningMessage], implementation: Implementation) -> tuple[str, ...]:
    """The warnings the implementation's own module gave (which path it took, a fallback), not
    those from deep inside torch."""
    module_file = inspect.getsourcefile(type(implementation))
    return tuple(dict.fromkeys(str(w.message) for w in caught if w.filename == module_file))


def attention_call(attention: AttentionFn, inputs: Inputs, backward: bool) -> Callable[[], Any]:
    """The call that is timed: the forward pass, or a training step (forward and backward)."""
    return _training_step(attention, inputs) if backward else _forward(attention, inputs)


def _forward(attention: AttentionFn, inputs: Inputs) -> Callable[[], torch.Tensor]:
    q, k, v = inputs.q, inputs.k, inputs.v

    def forward() -> torch.Tensor:
        return attention(q, k, v)

    return forward


def _training_step(attention: AttentionFn, inputs: Inputs) -> Callable[[], tuple[torch.Tensor, Grads]]:
    """Forward then backward of sum(out * grad_out); gradients returned, never accumulated."""
    q, k, v, grad_out = inputs.q, inputs.k, inputs.v, inputs.grad_out

    def step() -> tuple[torch.Tensor, Grads]:
        out = attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
        return out, {"dq": dq, "dk": dk, "dv": dv}

    return step
