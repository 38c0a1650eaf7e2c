"""The worker's side of a round: it prepares the implementation and makes the calls the harness
asks for, and nothing else.

The harness drives the round (attnbench.measuring.round): it decides which call is made when,
times each block of calls from outside, reads the outputs back and judges them. What this side
states (its own clock, the allocator's peak, the notes) is a claim the harness checks or merely
reports: plugin code runs in this process and could change any of it.

The timed calls alternate between the case's two input sets (``set_index``), so a call that
returns the previous call's output is wrong; the fresh values of each round are written into
the first set's tensors, so a cache keyed on a tensor's address sees the same tensors with new
values.
"""

from __future__ import annotations

import gc
import inspect
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.autograd.graph import increment_version

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation
from attnbench.contract.inputs import Inputs
from attnbench.measuring.correctness import changed_inputs, write_into
from attnbench.measuring.inputs import decode_cache, decode_step_inputs, on_device
from attnbench.measuring.memory import cpu_allocator_peak, cuda_peak, held_after, release_free_heap
from attnbench.measuring.outcome import SettingsChangedInCall
from attnbench.measuring.gpu_state import GpuSample, sampler
from attnbench.measuring.timing import FLUSH_BYTES, flushed_calls, l2_bytes, synchronize
from attnbench.support.process_state import Snapshot, changes, restore

# What a call returned: the output, and in training mode the input gradients.
Result = tuple[Any, Mapping[str, torch.Tensor] | None]


class CallServer:
    """One implementation prepared for one case in this process, on input sets given as pristine
    CPU tensors (``pristine()`` gives them again for the checks)."""

    def __init__(self, implementation: Implementation, case: Case, options: Mapping[str, Any],
                 pristine: Callable[[], Sequence[Inputs]], settings: Snapshot | None = None,
                 cache: str = "warm") -> None:
        self.implementation = implementation
        self.case = case
        self.options = options
        self.pristine = pristine
        self.settings = settings
        self.device = torch.device(case.device)
        self.cache = cache if self.device.type == "cuda" else "warm"
        self.notes: list[str] = []
        self.calls: list[Callable[[], Any]] = []  # per input set; timed_calls: the same, versions moved on
        self.timed_calls: list[Callable[[], Any]] = []
        self.sets: list[Inputs] = []
        self.timed = 0  # timed calls made so far: call i used set i % len(sets)
        self.last: Result | None = None
        self.last_set = 0
        self._flush: torch.Tensor | None = None
        self._caught: list[warnings.WarningMessage] = []

    # --- set-up ---------------------------------------------------------------------------

    def prepare(self) -> int | None:
        """prepare() (or prepare_decode), untimed here; the bytes a decode step keeps (or None)."""
        case = self.case
        drawn = [on_device(inputs, case) for inputs in self.pristine()]
        state_bytes = None
        with self._recording():
            if case.decode:
                primary = drawn[0]

                def build() -> Callable[..., Any]:
                    return self.implementation.prepare_decode(case, self.options, *decode_cache(primary, case))

                attention, state_bytes = held_after(build, self.device)
                self.sets = [decode_step_inputs(inputs, case) for inputs in drawn]
            else:
                attention = self.implementation.prepare(case, self.options)
                self.sets = drawn
            synchronize(self.device)
        self._put_back("prepare")
        self.calls = [attention_call(attention, inputs, case.backward) for inputs in self.sets]
        self.timed_calls = [_new_version_each_call(call, inputs) for call, inputs in zip(self.calls, self.sets,
                                                                                          strict=True)]
        if self.cache == "cold":
            self._flush = torch.empty(max(FLUSH_BYTES, 2 * l2_bytes(self.device)), dtype=torch.int8,
                                      device=self.device)
        return state_bytes

    # --- calls ----------------------------------------------------------------------------

    def first_call(self) -> Result:
        """The untimed first call on the primary set (lazy set-up may touch settings once)."""
        with self._recording():
            result = self.calls[0]()
            synchronize(self.device)
        self._put_back("the first call")
        return split(result, self.case)

    def block(self, count: int) -> float:
        """``count`` timed calls, alternating the input sets; the seconds this process's clock (or
        the device's events) gave them. The device's queue, every stream of it, is empty at the end."""
        sets = len(self.calls)
        indices = [index % sets for index in range(self.timed, self.timed + count)]
        self.timed += count
        self.last_set = indices[-1]
        return self._time(indices)

    def _time(self, indices: Sequence[int]) -> float:
        calls = self.timed_calls
        if self.cache == "cold":
            return self._cold(indices)
        synchronize(self.device)
        began = time.perf_counter()
        for index in indices:
            self.last = calls[index]()
        synchronize(self.device)
        return time.perf_counter() - began

    def _cold(self, indices: Sequence[int]) -> float:
        flush = self._flush
        assert flush is not None
        # synchronize: every stream, so work a call left on a side stream is waited for
        seconds, self.last = flushed_calls([self.timed_calls[index] for index in indices], flush.zero_,
                                           lambda: torch.cuda.Event(enable_timing=True),
                                           lambda: synchronize(self.device))
        return seconds

    def gpu_sample(self) -> GpuSample | None:
        """The GPU's clocks and slowdowns now (NVML), where it can be read."""
        sample = sampler(self.device)
        return sample() if sample else None

    def last_result(self) -> tuple[Result, int]:
        """The last timed call's result and the input set it was made on."""
        assert self.last is not None
        return split(self.last, self.case), self.last_set

    def load_fresh(self, fresh: Inputs) -> None:
        """Write fresh values (CPU, the case's dtype; a decode step's cache as the primary's) into
        the first set's tensors."""
        write_into(self.sets[0], self._as_called(fresh))

    def fresh_call(self) -> float:
        """One call on the first set, timed as the timed calls are; the settings are compared
        right after it (lazy set-up may change them once; every call must leave them alone)."""
        seconds = self._time([0])
        self._refuse_changes("its calls")
        return seconds

    def fresh_result(self) -> Result:
        """The fresh call's result (given apart, so the harness's clock around the call is the call's)."""
        result, self.last = split(self.last, self.case), None
        return result

    # --- memory ---------------------------------------------------------------------------

    def memory_ready(self) -> None:
        """Free what can be freed, so the next call's pages are counted afresh."""
        self.last = None
        gc.collect()
        release_free_heap()

    def memory_call(self, with_profiler: bool) -> int | None:
        """One call; with_profiler: torch's allocator peak during it (CPU: profiler events; CUDA:
        the peak statistics)."""
        call = self.calls[0]
        if self.device.type == "cuda":
            return cuda_peak(call, self.device)
        if with_profiler:
            return cpu_allocator_peak(call)
        result = call()
        del result
        return None

    # --- checks ---------------------------------------------------------------------------

    def input_problems(self) -> list[str]:
        """What the calls changed in the input sets (the values are put back)."""
        problems: list[str] = []
        for inputs, pristine in zip(self.sets, self.pristine(), strict=True):
            pristine = self._as_called(pristine)
            found = changed_inputs(inputs, pristine)
            if found:
                write_into(inputs, pristine)
                problems += found
        return list(dict.fromkeys(problems))

    def fresh_problems(self, fresh: Inputs) -> list[str]:
        """What the fresh call changed in its inputs."""
        return changed_inputs(self.sets[0], self._as_called(fresh))

    def _as_called(self, inputs: Inputs) -> Inputs:
        """A set of pristine inputs as the call receives them (a decode step: its new tokens)."""
        inputs = on_device(inputs, self.case)
        return decode_step_inputs(inputs, self.case) if self.case.decode else inputs

    def own_warnings(self) -> list[str]:
        """The warnings the implementation's own module gave (which path it took, a fallback),
        not those from deep inside torch."""
        try:
            module_file = inspect.getsourcefile(type(self.implementation))
        except TypeError:  # defined where no source file is (an interactive session)
            return []
        return list(dict.fromkeys(str(w.message) for w in self._caught if w.filename == module_file))

    # --- settings -------------------------------------------------------------------------

    def _recording(self) -> warnings.catch_warnings:
        return _Recording(self._caught)

    def _put_back(self, what: str) -> None:
        if self.settings is None:
            return
        changed = restore(self.settings)
        if changed:
            self.notes.append(f"{what} changed process-wide settings ({'; '.join(changed)}); put back")

    def _refuse_changes(self, what: str) -> None:
        if self.settings is None:
            return
        changed = changes(self.settings)
        if changed:
            raise SettingsChangedInCall(
                f"{what} changed process-wide settings ({'; '.join(changed)}): timed under other settings than "
                "the other implementations, so its figures are not comparable"
            )


class _Recording(warnings.catch_warnings):
    """Keeps the warnings given inside the block in ``caught`` (every one, not once per place)."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        super().__init__(record=True)
        self.caught = caught

    def __enter__(self) -> list[warnings.WarningMessage]:
        recorded = super().__enter__()
        warnings.simplefilter("always")
        self.recorded = recorded
        return recorded

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self.caught.extend(self.recorded or [])


def _new_version_each_call(call: Callable[[], Any], inputs: Inputs) -> Callable[[], Any]:
    """Before each timed call, its inputs' version counters move on (a fraction of a microsecond,
    the values untouched): an output cached by the tensors' address and version is stale at the
    next call, so each call computes (a cache keyed on the values must read them all)."""
    tensors = [tensor for tensor in (inputs.q, inputs.k, inputs.v, inputs.grad_out) if tensor is not None]

    def timed() -> Any:
        increment_version(tensors)
        return call()

    return timed


def split(result: Any, case: Case) -> Result:
    return result if case.backward else (result, None)


def attention_call(attention: Callable[..., Any], inputs: Inputs, backward: bool) -> Callable[[], Any]:
    """The call that is timed: the forward pass, or a training step (forward and backward)."""
    return _training_step(attention, inputs) if backward else _forward(attention, inputs)


def _forward(attention: Callable[..., Any], inputs: Inputs) -> Callable[[], torch.Tensor]:
    q, k, v = inputs.q, inputs.k, inputs.v

    def forward() -> torch.Tensor:
        return attention(q, k, v)

    return forward


def _training_step(attention: Callable[..., Any], inputs: Inputs) -> Callable[[], Any]:
    """Forward then backward of sum(out * grad_out); gradients returned, never accumulated."""
    q, k, v, grad_out = inputs.q, inputs.k, inputs.v, inputs.grad_out

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        out = attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
        return out, {"dq": dq, "dk": dk, "dv": dv}

    return step

