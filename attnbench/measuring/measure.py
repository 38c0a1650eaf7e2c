"""Measures one round of one (implementation, case) in this process: correctness, latency, memory.

The runner calls this inside a worker process (attnbench.execution.local.worker); tests and plugin authors
may call it directly. One round is:

1. prepare (untimed), then a first call on the seeded inputs; a decode step is prepared from
   the cache's part of the inputs and called with the new tokens';
2. in round 1, the rows to check are drawn and the float64 references computed from the inputs
   as they were made (attnbench.correctness.Verifier); later rounds receive them;
3. the timed calls, keeping the last result; in round 1, the memory call;
4. a call on fresh inputs written into the same tensors, timed on its own;
5. every checked call is compared with the references, and the inputs with what they were
   before each call: a call that changed them is reported, and the values are put back.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import AttentionFn, DecodeStep, Implementation
from attnbench.contract.inputs import SOURCE_NOTE_PREFIX, Inputs, InputSource
from attnbench.measuring.correctness import (
    Grads,
    Verifier,
    build_verifier,
    changed_inputs,
    output_problems,
    write_into,
)
from attnbench.measuring.figures import Correctness, Measurement
from attnbench.measuring.inputs import decode_cache, decode_step_inputs, make_inputs, with_cache_of
from attnbench.measuring.memory import held_after, measure_peak_memory
from attnbench.measuring.outcome import SettingsChangedInCall, round_status
from attnbench.measuring.timing import measure_latency, synchronize, time_one_call
from attnbench.measuring.work import counted_traffic, counted_work
from attnbench.settings.suite import Measure
from attnbench.support.process_state import Snapshot, changes, restore
from attnbench.support.text import one_line


def measure_case(
    implementation: Implementation,
    case: Case,
    options: Mapping[str, Any],
    measure: Measure,
    seed: int = 0,
    *,
    verifier: Verifier | None = None,
    settings: Snapshot | None = None,
    source: InputSource | None = None,
) -> Measurement:
    """One round; ``verifier``: round 1's references (None in round 1); ``settings``: the
    process-wide settings the call must run under (None: not watched); ``source``: the case's
    input source (None: the built-in one of that name).

    Exceptions propagate: the worker turns them into an ``error`` or ``oom`` row.
    """
    device = torch.device(case.device)
    inputs = make_inputs(case, seed, source)
    call_inputs = decode_step_inputs(inputs, case) if case.decode else inputs
    watch = _SettingsWatch(settings)
    state_bytes = None
    with warnings.catch_warnings(record=True) as caught:  # the implementation's notes for the row
        warnings.simplefilter("always")
        started = time.perf_counter()
        if case.decode:
            attention, state_bytes = _prepare_decode(implementation, case, options, inputs, measure.memory)
        else:
            attention = implementation.prepare(case, options)
        synchronize(device)
        prepare_s = time.perf_counter() - started
        watch.put_back("prepare")
        call = attention_call(attention, call_inputs, case.backward)
        started = time.perf_counter()
        result = call()
        synchronize(device)
        first_call_s = time.perf_counter() - started
        watch.put_back("the first call")  # lazy set-up may touch settings once; not every call
    notes = [*_own_warnings(caught, implementation), *watch.notes]
    work, work_note = counted_work(implementation, case, options)
    traffic, traffic_note = counted_traffic(implementation, case, options)
    notes += [note for note in (work_note, traffic_note) if note]

    checks: list[Correctness] = []
    out, grads = _split(result, case)
    problems = output_problems(out, grads, case)
    comparable = not problems
    problems += _restore_inputs(call_inputs, case, seed, source)
    if verifier is None and comparable and measure.correctness is not None:
        verifier, verifier_notes = build_verifier(implementation, case, options, measure.correctness, seed, source)
        notes += verifier_notes
    if verifier is not None and comparable:
        checks.append(verifier.check(out, grads, fresh=False, label="first call"))
    del result, out, grads

    latency = None
    if measure.latency:
        latency, last = measure_latency(call, device, measure.latency, first_call_s)
        latency = dataclasses.replace(latency, prepare_s=prepare_s)
        problems += _check_call(last, case, verifier, checks, fresh=False, label="last timed call")
        del last
    memory = measure_peak_memory(call, device) if measure.memory else None
    if memory is not None and case.decode:
        memory = dataclasses.replace(memory, state_bytes=state_bytes)
    problems += _restore_inputs(call_inputs, case, seed, source)

    if verifier is not None or latency is not None:
        # A call on fresh values in the same tensors (a cache cannot know them), timed alone; the
        # settings are compared right after it (the timer puts back the thread count it set,
        # which would hide a change the timed calls made).
        fresh = with_cache_of(make_inputs(case, verifier.fresh_seed if verifier else secrets.randbits(63), source),
                              inputs, case)
        fresh = decode_step_inputs(fresh, case) if case.decode else fresh
        write_into(call_inputs, fresh)
        fresh_call_s, result = time_one_call(call, device, measure.latency.cache if measure.latency else "warm")
        watch.refuse_changes("its calls")
        problems += _check_call(result, case, verifier, checks, fresh=True, label="a call on fresh inputs")
        del result
        problems += changed_inputs(call_inputs, fresh)
        if latency is not None:
            latency = dataclasses.replace(latency, fresh_call_s=(fresh_call_s,))

    correctness = Correctness.merge(checks) if checks else None
    if correctness is not None:
        problems += correctness.failures
    return Measurement(
        status=round_status(problems),
        reasons=tuple(dict.fromkeys(problems)),
        correctness=correctness,
        latency=latency,
        memory=memory,
        notes=tuple(dict.fromkeys([*notes, *_source_notes(source)])),  # after every draw of the round
        verifier=verifier,
        work=work,
        traffic=traffic,
    )


def _source_notes(source: InputSource | None) -> list[str]:
    """What the case's input source did (a capture, a cache read), bounded like any plugin text."""
    if source is None:
        return []
    notes = source.notes()
    if not isinstance(notes, (list, tuple)):
        return []
    return [SOURCE_NOTE_PREFIX + one_line(note) for note in notes if isinstance(note, str)]


def _split(result: Any, case: Case) -> tuple[Any, Grads | None]:
    return result if case.backward else (result, None)


def _check_call(
    result: Any, case: Case, verifier: Verifier | None, checks: list[Correctness], fresh: bool, label: str
) -> list[str]:
    out, grads = _split(result, case)
    problems = [f"{problem} ({label})" for problem in output_problems(out, grads, case)]
    if not problems and verifier is not None:
        checks.append(verifier.check(out, grads, fresh=fresh, label=label))
    return problems


def _prepare_decode(
    implementation: Implementation, case: Case, options: Mapping[str, Any], inputs: Inputs, count_state: bool
) -> tuple[DecodeStep, int | None]:
    """The decode step, built from a copy of the cache (the step's to keep or drop), and the bytes
    it keeps between calls (when memory is measured)."""

    def build() -> DecodeStep:
        return implementation.prepare_decode(case, options, *decode_cache(inputs, case))

    if not count_state:
        return build(), None
    return held_after(build, torch.device(case.device))


def _restore_inputs(inputs: Inputs, case: Case, seed: int, source: InputSource | None) -> list[str]:
    """What the calls changed in their inputs; the values are put back for the next calls."""
    pristine = make_inputs(case, seed, source)
    pristine = decode_step_inputs(pristine, case) if case.decode else pristine
    problems = changed_inputs(inputs, pristine)
    if problems:
        write_into(inputs, pristine)
    return problems


class _SettingsWatch:
    """Compares the process-wide settings with those the point must run under."""

    def __init__(self, expected: Snapshot | None) -> None:
        self.expected = expected
        self.notes: list[str] = []

    def put_back(self, what: str) -> None:
        if self.expected is None:
            return
        changed = restore(self.expected)
        if changed:
            self.notes.append(f"{what} changed process-wide settings ({'; '.join(changed)}); put back")

    def refuse_changes(self, what: str) -> None:
        if self.expected is None:
            return
        changed = changes(self.expected)
        if changed:
            raise SettingsChangedInCall(
                f"{what} changed process-wide settings ({'; '.join(changed)}): timed under other settings than "
                "the other implementations, so its figures are not comparable"
            )


def _own_warnings(caught: list[warnings.WarningMessage], implementation: Implementation) -> tuple[str, ...]:
    """The warnings the implementation's own module gave (which path it took, a fallback), not
    those from deep inside torch."""
    try:
        module_file = inspect.getsourcefile(type(implementation))
    except TypeError:  # defined where no source file is (an interactive session)
        return ()
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
