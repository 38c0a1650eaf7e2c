"""One round of one point, driven by the harness: what the worker is asked to do, in which order,
and how what comes back is judged.

The worker (attnbench.measuring.call_server, behind a ``Worker``) only prepares and calls. This
side decides everything a figure rests on:

1. prepare (untimed; the harness's clock gives prepare_s), then a first call on the primary set;
2. the first call's output is judged against the case's references (``Verifier``: rows and float64
   exact attention computed by the harness, an implementation's own reference computed apart);
3. the timed blocks (attnbench.measuring.timing), each timed by the worker and by the harness's
   own clock, with the worker's CPU time and the machine's load read from /proc around them; the
   last timed call's output is judged (the calls alternate between two input sets);
4. in round 1 the memory calls: the process's resident peak is read from /proc by the harness;
5. a call on fresh values (new in every round) written into the same tensors, timed alone and
   judged; the inputs are compared with what they were before the calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import Tolerance
from attnbench.contract.inputs import Inputs
from attnbench.contract.work import exact_attention, exact_decode_bytes
from attnbench.measuring.correctness import PRIMARY, ROTATION, Verifier, fresh_set, output_problems
from attnbench.measuring.cpu_load import CpuClock, other_load
from attnbench.measuring.figures import Correctness, Latency, Measurement, Memory, Traffic, Work
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.outcome import round_status
from attnbench.measuring.timing import BlockTiming, timed_blocks
from attnbench.settings.suite import Measure

SETS = (PRIMARY, ROTATION)  # the timed calls' input sets, in the order the worker holds them


@dataclass(frozen=True)
class Declarations:
    """What the implementation says of itself for this case (plugin code: claims, checked where
    they can be)."""

    tolerance: Tolerance | str  # a str: what it returned instead of a Tolerance (judged at the cap)
    own_reference: bool  # it defines reference(): judged against its own float64 reference
    flops: tuple[float, str] | None = None  # its declared FLOPs of one call, with the formula
    step_bytes: tuple[float, str] | None = None  # its declared bytes of one decode step
    notes: tuple[str, ...] = ()  # a declaration it could not make usably (no throughput then)


@dataclass(frozen=True)
class Called:
    """One call's result as the harness holds it: CPU tensors, or why there is nothing to compare."""

    out: torch.Tensor | None
    grads: Mapping[str, torch.Tensor | None] | None
    device: str  # the device kind the call returned its output on
    problems: tuple[str, ...] = ()  # it returned something that is not a tensor


@dataclass(frozen=True)
class Prepared:
    prepare_s: float  # the harness's clock
    first_call_s: float  # the harness's clock
    first: Called
    state_bytes: int | None  # a decode step's state, as the worker's allocator counted it


class Worker(Protocol):
    """The harness's handle on the process that runs the implementation."""

    def declarations(self) -> Declarations: ...

    def prepare(self) -> Prepared: ...

    def block(self, calls: int) -> BlockTiming: ...

    def last_result(self) -> tuple[Called, int]: ...

    def memory(self) -> Memory: ...

    def fresh_call(self, fresh: Inputs) -> tuple[BlockTiming, Called]: ...

    def input_problems(self, fresh: Inputs | None) -> list[str]: ...

    def clock(self) -> CpuClock: ...

    def gpu_sample(self) -> GpuSample | None: ...

    def notes(self) -> list[str]: ...


@dataclass
class RoundPlan:
    """What the harness knows of the round before it starts."""

    case: Case
    measure: Measure
    exact: bool  # the implementation claims exact attention: the harness counts its work
    round_index: int
    threads: int | None
    verifier: Verifier | None  # None in round 1 (made here) or without correctness
    make_verifier: Callable[[Declarations], tuple[Verifier, list[str]]] | None  # round 1's
    fresh_inputs: Callable[[int], Inputs]  # the fresh set of round i, on the CPU
    notes: list[str] = field(default_factory=list)


def measure_round(worker: Worker, plan: RoundPlan) -> Measurement:
    case, measure = plan.case, plan.measure
    declared = worker.declarations()
    notes = list(declared.notes)
    work, traffic = _work(plan, declared)
    prepared = worker.prepare()
    checks: list[Correctness] = []
    problems = _output_problems(prepared.first, case)
    comparable = not problems
    problems += worker.input_problems(None)
    verifier = plan.verifier
    if verifier is None and comparable and plan.make_verifier is not None:
        verifier, verifier_notes = plan.make_verifier(declared)
        notes += verifier_notes
    if verifier is not None and comparable:
        checks.append(_check(verifier, prepared.first, PRIMARY, "first call"))

    latency = None
    if measure.latency:
        before, start = worker.gpu_sample(), worker.clock()
        blocks = timed_blocks(worker.block, measure.latency)
        end = worker.clock()
        load, after = other_load(start, end), worker.gpu_sample()
        last, index = worker.last_result()
        problems += _checked(last, case, verifier, SETS[index], "last timed call", checks)
        latency = Latency(
            samples_s=blocks.samples_s, calls_per_sample=(blocks.calls_per_sample,), first_call_s=prepared.first_call_s,
            timer=_timer(case, measure), cache=measure.latency.cache if case.device_type == "cuda" else "warm",
            prepare_s=prepared.prepare_s, round_loads=(load,), gpu_samples=(before, after) if before and after else (),
            observed_s=blocks.observed_s, round_cpu_s=(end.own_s - start.own_s,),
            round_wall_s=(end.wall_s - start.wall_s,), threads=plan.threads,
        )
    memory = dataclasses.replace(worker.memory(), state_bytes=prepared.state_bytes) if measure.memory else None
    problems += worker.input_problems(None)

    if verifier is not None or latency is not None:
        fresh = plan.fresh_inputs(plan.round_index)
        timing, result = worker.fresh_call(fresh)
        problems += _checked(result, case, verifier, fresh_set(plan.round_index), "a call on fresh inputs", checks)
        problems += worker.input_problems(fresh)
        if latency is not None:
            latency = dataclasses.replace(latency, fresh_call_s=(timing.stated_s,),
                                          fresh_observed_s=(timing.observed_s,))

    correctness = Correctness.merge(checks) if checks else None
    if correctness is not None:
        problems += correctness.failures
    notes += worker.notes()
    return Measurement(
        status=round_status(problems), reasons=tuple(dict.fromkeys(problems)), correctness=correctness,
        latency=latency, memory=memory, notes=tuple(dict.fromkeys([*plan.notes, *notes])), verifier=verifier,
        work=work, traffic=traffic,
    )


def _work(plan: RoundPlan, declared: Declarations) -> tuple[Work | None, Traffic | None]:
    """The FLOPs of one call and a decode step's bytes: counted by the harness for an exact
    implementation (the work is the problem's, not the plugin's to declare), else as declared."""
    case = plan.case
    if plan.exact:
        flops = exact_attention(case)
        work = Work(flops.flops, flops.formula, declared=False)
        traffic = None
        if case.decode:
            count = exact_decode_bytes(case)
            traffic = Traffic(count.bytes, count.formula, declared=False)
        return work, traffic
    work = Work(*declared.flops, declared=True) if declared.flops else None
    traffic = Traffic(*declared.step_bytes, declared=True) if declared.step_bytes and case.decode else None
    return work, traffic


def _timer(case: Case, measure: Measure) -> str:
    clock = "the worker's perf_counter" if case.device_type != "cuda" else "CUDA events"
    flushed = ", L2 flushed per call" if case.device_type == "cuda" and measure.latency.cache == "cold" else ""
    return f"harness-driven blocks: {clock}{flushed}, checked against the harness's clock"


def _output_problems(called: Called, case: Case) -> list[str]:
    if called.problems:
        return list(called.problems)
    return output_problems(called.out, called.grads, case, called.device)


def _checked(called: Called, case: Case, verifier: Verifier | None, input_set: str, label: str,
             checks: list[Correctness]) -> list[str]:
    problems = [f"{problem} ({label})" for problem in _output_problems(called, case)]
    if not problems and verifier is not None:
        checks.append(_check(verifier, called, input_set, label))
    return problems


def _check(verifier: Verifier, called: Called, input_set: str, label: str) -> Correctness:
    assert called.out is not None
    return verifier.check(called.out, called.grads, input_set, label)
