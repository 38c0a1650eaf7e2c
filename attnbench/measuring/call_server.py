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
from dataclasses import dataclass
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
from attnbench.measuring.tensor_files import NAMES, TensorFile
from attnbench.measuring.timing import FLUSH_BYTES, flushed_calls, l2_bytes, synchronize
from attnbench.support.process_state import Snapshot, changes, restore

# What a call returned: the output, and in training mode the input gradients.
Result = tuple[Any, Mapping[str, torch.Tensor] | None]


class CallServer:
    """One implementation prepared for one case in this process, on input sets given as pristine
    CPU tensors (``pristine()`` gives them again for the checks)."""

    def __init__(self, implementation: Implementation, case: Case, options: Mapping[str, Any],
                 pristine: Callable[[], Sequence[Inputs]], shared: Shared, settings: Snapshot | None = None,
                 cache: str = "warm") -> None:
        self.implementation = implementation
        self.case = case
        self.options = options
        self.pristine = pristine
        self.shared = shared
        self.settings = settings
        self.device = torch.device(case.device)
        self.cache = cache if self.device.type == "cuda" else "warm"
        self.notes: list[str] = []
        self.calls: list[Callable[[], Any]] = []  # per input set; timed_calls: the same, versions moved on
        self.timed_calls: list[Callable[[], Any]] = []
        self.sets: list[Inputs] = []
        self.drawn: list[Inputs] = []
        self.decode_cache: tuple[torch.Tensor, ...] = ()  # a decode step's cache, as the round holds it
        self.timed = 0  # timed calls made so far: call i used set i % len(sets)
        self.last: Result | None = None
        self.last_set = 0
        self._flush: torch.Tensor | None = None
        self._caught: list[warnings.WarningMessage] = []

    # --- set-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """The input sets onto the device, and the first set's call inputs into the shared tensors
        (before prepare: what the implementation keeps is measured above this). For decode steps,
        only what the round keeps: each set's new tokens and the cache the step is prepared from,
        held all round, so that what prepare keeps (a copy in numpy included) shows above it."""
        self.drawn = [on_device(inputs, self.case) for inputs in self.pristine()]
        if self.case.decode:
            self.decode_cache = decode_cache(self.drawn[0], self.case)
            self.drawn = [decode_step_inputs(inputs, self.case) for inputs in self.drawn]
            release_free_heap()
        first = self.drawn[0]
        with torch.no_grad():
            for name in ("q", "k", "v", "grad_out"):
                if getattr(first, name) is not None:
                    getattr(self.shared.inputs, name).copy_(getattr(first, name))

    def prepare(self) -> int | None:
        """prepare() (or prepare_decode), untimed here; the bytes a decode step keeps (or None)."""
        case = self.case
        drawn = self.drawn
        state_bytes = None
        with self._recording():
            if case.decode:
                def build() -> Callable[..., Any]:
                    return self.implementation.prepare_decode(case, self.options,
                                                              *(part.clone() for part in self.decode_cache))

                attention, state_bytes = held_after(build, self.device)
                self.sets = drawn
            else:
                attention = self.implementation.prepare(case, self.options)
                self.sets = drawn
            synchronize(self.device)
        self._put_back("prepare")
        self.sets[0] = self._first_set_shared(self.sets[0])
        del self.drawn
        release_free_heap()  # what prepare left resident is what it keeps, not what it freed
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

    def _first_set_shared(self, inputs: Inputs) -> Inputs:
        """On the CPU the first set's call inputs are the shared tensors (which hold its values since
        ``load``); on another device they are copied from them before the fresh call."""
        return inputs if self.device.type != "cpu" else on_device(self.shared.inputs, self.case)

    def fresh_call(self) -> tuple[float, list[str], list[str]]:
        """One call on the first set, whose tensors the harness has just filled with fresh values
        (the worker could not see them before), timed as the timed calls are, its result written
        into the shared output tensors before it answers. The seconds, what is wrong with the
        result, and the gradients it gave none of. The settings are compared right after the
        call (lazy set-up may change them once; every call must leave them alone)."""
        if self.device.type != "cpu":
            write_into(self.sets[0], self.shared.inputs)
        _touch(self.sets[0])  # warm, as the timed calls find their inputs (the harness just wrote them)
        seconds = self._time([0])
        self._refuse_changes("its calls")
        (out, grads), self.last = split(self.last, self.case), None
        problems = plain_tensor_problems(out, grads)
        if not problems and out.device.type != self.device.type:
            problems = [f"output on {out.device} (expected {self.case.device})"]
        if problems:
            return seconds, problems, []
        results = {"out": out, **(grads or {})}
        for name, tensor in results.items():
            target = self.shared.outputs.get(name)
            if target is None or tensor is None:
                continue
            if tensor.shape != target.shape or tensor.dtype != target.dtype:
                return seconds, [f"{'output' if name == 'out' else name} {tensor.dtype} {tuple(tensor.shape)} "
                                 f"(expected {target.dtype} {tuple(target.shape)})"], []
            target.copy_(tensor.detach())
        synchronize(self.device)
        return seconds, [], [name for name, tensor in results.items() if tensor is None]

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


def _touch(inputs: Inputs) -> None:
    """Read every input once (into the caches a call would find them in)."""
    with torch.no_grad():
        for tensor in (inputs.q, inputs.k, inputs.v, inputs.grad_out):
            if tensor is not None:
                tensor.sum()


def _new_version_each_call(call: Callable[[], Any], inputs: Inputs) -> Callable[[], Any]:
    """Before each timed call, its inputs' version counters move on (a fraction of a microsecond,
    the values untouched): an output cached by the tensors' address and version is stale at the
    next call, so each call computes (a cache keyed on the values must read them all)."""
    tensors = [tensor for tensor in (inputs.q, inputs.k, inputs.v, inputs.grad_out) if tensor is not None]

    def timed() -> Any:
        increment_version(tensors)
        return call()

    return timed


@dataclass(frozen=True)
class Shared:
    """Tensors on the CPU both sides see: the first set's call inputs, which the harness fills
    with fresh values for the fresh call, and where that call's output (and gradients) go."""

    inputs: Inputs
    outputs: Mapping[str, torch.Tensor]  # "out", and "dq", "dk", "dv" in training mode


def shared_layout(case: Case) -> tuple[list[TensorFile], list[TensorFile]]:
    """The shared tensors' names, dtypes and shapes: the first set's call inputs (a decode step's:
    its new tokens) and the call's output and gradients."""
    dtype = NAMES[case.dtype]
    query = (case.batch, case.heads, case.query_len, case.head_dim)
    keys = (case.batch, case.kv_heads, case.query_len if case.decode else case.key_len, case.head_dim)
    inputs = [TensorFile("q", dtype, query), TensorFile("k", dtype, keys), TensorFile("v", dtype, keys)]
    outputs = [TensorFile("out", dtype, query)]
    if case.backward:
        inputs.append(TensorFile("grad_out", dtype, query))
        outputs += [TensorFile("dq", dtype, query), TensorFile("dk", dtype, keys), TensorFile("dv", dtype, keys)]
    return inputs, outputs


def shared_in_memory(case: Case) -> Shared:
    """Shared tensors for a server in the harness's own process (the kit, probes)."""
    inputs, outputs = shared_layout(case)
    made = {file.name: torch.empty(file.shape, dtype=case.dtype) for file in (*inputs, *outputs)}
    return Shared(Inputs(made["q"], made["k"], made["v"], made.get("grad_out")),
                  {file.name: made[file.name] for file in outputs})


def plain_tensor_problems(out: Any, grads: Any) -> list[str]:
    """Why a call's result is not plain tensors: a subclass could compute its values only when they
    are read (after the timed call), so only torch.Tensor itself is taken."""
    if type(out) is not torch.Tensor:
        return [f"output is a {type(out).__name__}, not a torch.Tensor"]
    if grads is not None and not all(grad is None or type(grad) is torch.Tensor for grad in grads.values()):
        return ["a gradient is not a torch.Tensor"]
    return []


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

