"""A point's worker as the round driver sees it (attnbench.measuring.round.Worker): each request
sent over the control pipe, each reply checked field by field, each call's tensors read back from
the worker's scratch folder only as described and as the case expects, and the figures that
decide a comparison read by the harness itself (its clock, /proc)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import Tolerance
from attnbench.contract.inputs import Inputs
from attnbench.execution.local.isolation import RoundFailed, WorkerProcess, session_cpu_seconds
from attnbench.execution.local.wire import WireError, integer, number, texts
from attnbench.execution.local.worker import write_inputs
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.cpu_load import CpuClock, machine_busy_s
from attnbench.measuring.figures import Memory
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.memory import ProcessPeak
from attnbench.measuring.round import Called, Declarations, Prepared
from attnbench.measuring.tensor_files import TensorFile, TensorFileError, read_tensor
from attnbench.measuring.timing import BlockTiming
from attnbench.measuring.work import usable_count

MEMORY_SOURCE_CPU = "torch profiler memory events (stated by the worker); VmHWM after clear_refs, read by the harness"


class IsolatedWorker:
    """Starts the worker, hands it the case and its input sets, and serves the round driver."""

    def __init__(self, process: WorkerProcess, case: Case, options: Mapping[str, Any],
                 input_sets: list[dict[str, Any]], memory_cap: int | None, cache: str) -> None:
        self.process, self.case = process, case
        self.scratch = Path(process.scratch)
        reply = process.request({"case": case.to_json(), "options": dict(options), "inputs": input_sets,
                                 "memory_cap": memory_cap, "cache": cache})
        if "unsupported" in reply:
            reasons = _checked(lambda: texts(reply, "unsupported")) or ["unsupported, without a reason"]
            raise RoundFailed(outcome_of.unsupported(reasons))
        self._declarations = _checked(lambda: _declarations(reply.get("declarations")))
        self.fresh_sets = 0
        self.fresh_described: tuple[Inputs, dict[str, Any]] | None = None

    def declarations(self) -> Declarations:
        return self._declarations

    def prepare(self) -> Prepared:
        reply, prepare_s = self.process.timed_request({"command": "prepare"})
        state_bytes = _checked(lambda: integer(reply, "state_bytes", optional=True))
        reply, first_call_s = self.process.timed_request({"command": "first_call"})
        return Prepared(prepare_s, first_call_s, self._result(reply.get("result")), state_bytes)

    def block(self, calls: int) -> BlockTiming:
        reply, observed = self.process.timed_request({"command": "block", "calls": calls})
        return BlockTiming(calls, _checked(lambda: number(reply, "stated_s")), observed)

    def last_result(self) -> tuple[Called, int]:
        reply = self.process.request({"command": "last"})
        index = reply.get("set")
        if index not in (0, 1):
            raise RoundFailed(outcome_of.unreadable_result(WireError(f"last timed call on input set {index!r}")))
        return self._result(reply.get("result")), index

    def memory(self) -> Memory:
        device = torch.device(self.case.device)
        if device.type == "cuda":
            reply = self.process.request({"command": "memory_call", "profiler": True})
            peak = _checked(lambda: integer(reply, "allocator_peak_bytes", optional=True))
            return Memory(peak, None, source="torch.cuda.max_memory_allocated (stated by the worker)")
        if device.type != "cpu":
            return Memory(None, None, source=f"not measured: no peak statistics on {device.type}")
        self.process.request({"command": "memory_ready"})
        watched = ProcessPeak(self.process.pid)
        rss = None
        if watched.start():
            self.process.request({"command": "memory_call", "profiler": False})
            rss = watched.peak_above_start()
        reply = self.process.request({"command": "memory_call", "profiler": True})
        return Memory(_checked(lambda: integer(reply, "allocator_peak_bytes", optional=True)), rss,
                      source=MEMORY_SOURCE_CPU)

    def fresh_call(self, fresh: Inputs) -> tuple[BlockTiming, Called]:
        self.fresh_sets += 1
        described = write_inputs(self.scratch, f"fresh{self.fresh_sets}", fresh)  # only now can the worker see them
        self.fresh_described = (fresh, described)
        self.process.request({"command": "fresh_load", "inputs": described})
        reply, observed = self.process.timed_request({"command": "fresh_call"})
        timing = BlockTiming(1, _checked(lambda: number(reply, "stated_s")), observed)
        return timing, self._result(self.process.request({"command": "fresh_result"}).get("result"))

    def input_problems(self, fresh: Inputs | None) -> list[str]:
        described = None
        if fresh is not None:
            assert self.fresh_described is not None
            written, described = self.fresh_described
            assert written is fresh, "the fresh inputs checked are those of the fresh call"
        reply = self.process.request({"command": "input_problems", "fresh": described})
        return _checked(lambda: texts(reply, "problems"))

    def clock(self) -> CpuClock:
        return CpuClock(time.perf_counter(), machine_busy_s(), session_cpu_seconds(self.process.pid) or 0.0)

    def gpu_sample(self) -> GpuSample | None:
        """The GPU's state as the worker read it (NVML): stated by the worker, shown, never trusted
        for a comparison (a throttled flag only ever costs the point itself)."""
        if self.case.device_type != "cuda":
            return None
        sample = self.process.request({"command": "gpu_sample"}).get("sample")
        return _checked(lambda: _gpu_sample(sample)) if sample is not None else None

    def notes(self) -> list[str]:
        reply = self.process.request({"command": "notes"})
        return _checked(lambda: texts(reply, "notes"))

    def _result(self, shipped: object) -> Called:
        """A call's result from its files, checked against what the case calls for."""
        case = self.case
        if not isinstance(shipped, dict):
            raise RoundFailed(outcome_of.unreadable_result(WireError("a call's result that is not an object")))
        if "problems" in shipped:
            return Called(None, None, case.device_type, tuple(_checked(lambda: texts(shipped, "problems"))))
        device = shipped.get("device")
        if not isinstance(device, str) or device not in ("cpu", "cuda", "mps", "xpu", "meta"):
            raise RoundFailed(outcome_of.unreadable_result(WireError(f"a call's device {str(device)[:40]!r}")))
        limit = 8 * case.batch * max(case.heads, case.kv_heads) * case.key_len * case.head_dim
        out = self._tensor(shipped.get("out"), limit)
        grads = shipped.get("grads")
        if case.backward:
            if not isinstance(grads, dict):
                return Called(None, None, device, ("the training step returned no gradients",))
            grads = {name: None if grads.get(name) is None else self._tensor(grads[name], limit)
                     for name in ("dq", "dk", "dv")}
        return Called(out, grads if case.backward else None, device)

    def _tensor(self, described: object, limit: int) -> torch.Tensor:
        try:
            return read_tensor(self.scratch, TensorFile.from_json(described), limit)
        except TensorFileError as error:
            raise RoundFailed(outcome_of.unreadable_result(error)) from None


def _declarations(data: object) -> Declarations:
    if not isinstance(data, dict):
        raise WireError("no declarations")
    declared = data.get("tolerance")
    tolerance: Tolerance | str = str(declared)[:200]  # not two numbers: judged at the cap, with a note
    if isinstance(declared, list) and len(declared) == 2 and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in declared):
        tolerance = Tolerance(*declared)
    own = data.get("own_reference")
    if not isinstance(own, bool):
        raise WireError("own_reference is not true or false")
    return Declarations(tolerance, own, usable_count(data.get("flops")), usable_count(data.get("step_bytes")),
                        tuple(texts(data, "notes")))


def _gpu_sample(data: object) -> GpuSample:
    if not isinstance(data, dict):
        raise WireError("a GPU sample that is not an object")
    reasons = data.get("slowdown_reasons") or []
    violations = data.get("violation_ns")
    if violations is not None and not (isinstance(violations, dict) and all(
            isinstance(key, str) and isinstance(value, int) for key, value in violations.items())):
        raise WireError("a GPU sample's violation times")
    return GpuSample(integer(data, "sm_clock_mhz", optional=True), integer(data, "memory_clock_mhz", optional=True),
                     integer(data, "temperature_c", optional=True), number(data, "power_w", optional=True),
                     tuple(texts({"reasons": reasons}, "reasons")), violations)


def _checked(read: Any) -> Any:
    """``read()``, a reply's field; a field that is not what the harness asked for ends the round."""
    try:
        return read()
    except WireError as error:
        raise RoundFailed(outcome_of.unreadable_result(error)) from None
