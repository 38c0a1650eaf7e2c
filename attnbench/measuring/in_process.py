"""A round measured in this very process: the plugin kit, probes and tests.

``measure_case`` runs the same round as a sweep does (attnbench.measuring.round), with the
implementation in this process instead of a confined worker: nothing here is protected from
the plugin, which is fine for an author checking their own code and never used for a run.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation
from attnbench.contract.inputs import SOURCE_NOTE_PREFIX, Inputs, InputSource
from attnbench.measuring.call_server import CallServer, Result, plain_tensor_problems, shared_in_memory
from attnbench.measuring.correctness import (
    PRIMARY,
    ROTATION,
    Verifier,
    case_references,
    changed_inputs,
    fresh_set,
    has_own_reference,
    own_references,
    set_names,
    verifier_for,
    write_into,
)
from attnbench.measuring.cpu_load import CpuClock, read_clock
from attnbench.measuring.figures import Measurement, Memory
from attnbench.measuring.gpu_state import GpuSample, sampler
from attnbench.measuring.inputs import decode_step_inputs, draw_set
from attnbench.measuring.memory import ProcessPeak
from attnbench.measuring.round import Called, Declarations, Prepared, RoundPlan, measure_round
from attnbench.measuring.timing import BlockTiming
from attnbench.measuring.work import declared_bytes, declared_flops
from attnbench.settings.suite import Measure
from attnbench.support.process_state import Snapshot
from attnbench.support.text import one_line

MEMORY_SOURCE_CPU = "torch profiler memory events; VmHWM after clear_refs, read from /proc"


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
    round_index: int = 0,
    rounds: int = 1,
) -> Measurement:
    """One round in this process; ``verifier``: an earlier round's (None in round 1);
    ``settings``: the process-wide settings the calls must run under (None: not watched);
    ``source``: the case's input source (None: the built-in one of that name); ``rounds``: how
    many rounds the references cover. Exceptions propagate."""
    seeds = verifier.references.seeds if verifier is not None else _seeds(seed, rounds)
    sets = _Draws(case, source, seeds)
    server = CallServer(implementation, case, options, lambda: [sets.get(PRIMARY), sets.get(ROTATION)],
                        shared_in_memory(case), settings,
                        measure.latency.cache if measure.latency else "warm")

    def make_verifier(declared: Declarations) -> tuple[Verifier, list[str]]:
        references = case_references(case, measure.correctness, seeds, sets.get_seed)
        own = own_references(implementation, case, options, {name: sets.get(name) for name in seeds},
                             references.rows) if declared.own_reference else None
        made, notes = verifier_for(references, own, implementation.exact, declared.tolerance, case.dtype)
        return made, [*references.notes, *notes]

    def fresh_inputs(index: int) -> Inputs:  # a round past the references' is never judged: any values do
        name = fresh_set(index)
        return sets.get(name) if name in seeds else draw_set(case, secrets.randbits(63), source, sets.get(PRIMARY))

    plan = RoundPlan(case, measure, implementation.exact, round_index, torch.get_num_threads(), verifier,
                     make_verifier if measure.correctness is not None else None, fresh_inputs)
    measurement = measure_round(InProcessWorker(server, implementation, case, options), plan)
    notes = source_notes(source) if source is not None else []
    return dataclasses.replace(measurement, notes=tuple(dict.fromkeys([*measurement.notes, *notes])))


def source_notes(source: InputSource) -> list[str]:
    """What the input source's draws did (a capture, a cache read), bounded like any plugin text."""
    notes = source.notes()
    if not isinstance(notes, (list, tuple)):
        return []
    return [SOURCE_NOTE_PREFIX + one_line(note) for note in notes if isinstance(note, str)]


def _seeds(seed: int, rounds: int) -> dict[str, int]:
    """The input sets' seeds: the suite's for the primary set, fresh ones for the others."""
    return {name: seed if name == PRIMARY else secrets.randbits(63) for name in set_names(rounds)}


class _Draws:
    """The case's input sets on the CPU, each drawn once."""

    def __init__(self, case: Case, source: InputSource | None, seeds: Mapping[str, int]) -> None:
        self.case, self.source, self.seeds = case, source, seeds
        self.drawn: dict[int, Inputs] = {}

    def get(self, name: str) -> Inputs:
        return self.get_seed(self.seeds[name])

    def get_seed(self, seed: int) -> Inputs:
        if seed not in self.drawn:
            primary = None if seed == self.seeds[PRIMARY] else self.get(PRIMARY)
            self.drawn[seed] = draw_set(self.case, seed, self.source, primary)
        return self.drawn[seed]


class InProcessWorker:
    """A Worker (attnbench.measuring.round) that is this process: its clock is the harness's."""

    def __init__(self, server: CallServer, implementation: Implementation, case: Case,
                 options: Mapping[str, Any]) -> None:
        self.server, self.implementation, self.case, self.options = server, implementation, case, options
        self.device = torch.device(case.device)
        self._sample = sampler(self.device)

    def declarations(self) -> Declarations:
        return declarations_of(self.implementation, self.case, self.options)

    def prepare(self) -> Prepared:
        self.server.load()
        started = time.perf_counter()
        state_bytes = self.server.prepare()
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        first = self.server.first_call()
        first_call_s = time.perf_counter() - started
        return Prepared(prepare_s, first_call_s, called(first, self.case), state_bytes)

    def block(self, calls: int) -> BlockTiming:
        began = time.perf_counter()
        stated = self.server.block(calls)
        return BlockTiming(calls, stated, time.perf_counter() - began)

    def last_result(self) -> tuple[Called, int]:
        result, index = self.server.last_result()
        return called(result, self.case), index

    def memory(self) -> Memory:
        server = self.server
        if self.device.type == "cuda":
            return Memory(server.memory_call(True), None, source="torch.cuda.max_memory_allocated")
        if self.device.type != "cpu":
            return Memory(None, None, source=f"not measured: no peak statistics on {self.device.type}")
        server.memory_ready()
        peak = ProcessPeak(os.getpid())
        rss = None
        if peak.start():
            server.memory_call(False)
            rss = peak.peak_above_start()
        return Memory(server.memory_call(True), rss, source=MEMORY_SOURCE_CPU)

    def fresh_call(self, fresh: Inputs) -> tuple[BlockTiming, Called]:
        shared = self.server.shared
        write_into(shared.inputs, call_inputs(fresh, self.case))
        began = time.perf_counter()
        stated, problems, missing = self.server.fresh_call()
        timing = BlockTiming(1, stated, time.perf_counter() - began)
        return timing, shared_result(lambda name: shared.outputs[name].clone(), problems, missing, self.case)

    def input_problems(self, fresh: Inputs | None) -> list[str]:
        if fresh is None:
            return self.server.input_problems()
        return changed_inputs(self.server.shared.inputs, call_inputs(fresh, self.case))

    def clock(self) -> CpuClock:
        return read_clock()

    def gpu_sample(self) -> GpuSample | None:
        return self._sample() if self._sample else None

    def notes(self) -> list[str]:
        return [*self.server.own_warnings(), *self.server.notes]


def declarations_of(implementation: Implementation, case: Case, options: Mapping[str, Any]) -> Declarations:
    """What the implementation declares for the case (its work only when it is an approximation:
    exact attention's is counted by the harness)."""
    flops, flops_note = (None, "") if implementation.exact else declared_flops(implementation, case, options)
    step_bytes, bytes_note = (None, "") if implementation.exact else declared_bytes(implementation, case, options)
    return Declarations(implementation.tolerance(case.dtype), has_own_reference(implementation), flops, step_bytes,
                        tuple(note for note in (flops_note, bytes_note) if note))


def called(result: Result, case: Case) -> Called:
    """A call's result as the harness judges it."""
    out, grads = result
    problems = plain_tensor_problems(out, grads)
    if problems:
        return Called(None, None, case.device_type, tuple(problems))
    return Called(out, grads, out.device.type)


def call_inputs(inputs: Inputs, case: Case) -> Inputs:
    """What a call receives of an input set: a decode step its new tokens, any other call all of it."""
    return decode_step_inputs(inputs, case) if case.decode else inputs


def shared_result(read: Callable[[str], torch.Tensor], problems: list[str], missing: list[str],
                  case: Case) -> Called:
    """The fresh call's result from the shared tensors (``read``: one of them, copied now; the
    worker checked the device it came on)."""
    if problems:
        return Called(None, None, case.device_type, tuple(problems))
    grads = {name: None if name in missing else read(name) for name in ("dq", "dk", "dv")} if case.backward \
        else None
    return Called(read("out"), grads, case.device_type)

