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
from attnbench.execution.local.isolation import RoundFailed, WorkerProcess
from attnbench.execution.local.sandbox import point_cpu_seconds, point_processes
from attnbench.execution.local.wire import WireError, integer, number, texts
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.cpu_load import CpuClock, machine_busy_s
from attnbench.measuring.figures import Memory
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.memory import ProcessPeak, proportional_bytes
from attnbench.measuring.call_server import shared_layout
from attnbench.measuring.correctness import changed_inputs
from attnbench.measuring.in_process import call_inputs, shared_result
from attnbench.measuring.round import Called, Declarations, Prepared
from attnbench.measuring.tensor_files import SharedFile, TensorFile, TensorFileError, read_tensor
from attnbench.measuring.timing import BlockTiming
from attnbench.measuring.work import usable_count

MEMORY_SOURCE_CPU = ("torch profiler memory events (stated by the worker); VmHWM after clear_refs of every process "
                     "of the point, and what they keep (Pss), read by the harness")


class IsolatedWorker:
    """Starts the worker, hands it the case and its input sets, and serves the round driver."""

    def __init__(self, process: WorkerProcess, case: Case, options: Mapping[str, Any],
                 input_sets: list[dict[str, Any]], memory_cap: dict[str, int] | None, cache: str,
                 measures_memory: bool = True) -> None:
        self.process, self.case = process, case
        self.measures_memory = measures_memory and case.device_type == "cpu"  # (the /proc figures)
        self.scratch = Path(process.scratch)
        inputs, outputs = shared_layout(case)
        self.shared_inputs = SharedFile(self.scratch / "fresh.inputs", inputs)
        self.shared_outputs = SharedFile(self.scratch / "fresh.outputs", outputs)
        try:
            reply = process.request({"case": case.to_json(), "options": dict(options), "inputs": input_sets,
                                     "memory_cap": memory_cap, "cache": cache,
                                     "shared": {"inputs": self.shared_inputs.described(),
                                                "outputs": self.shared_outputs.described()}})
            if "unsupported" in reply:
                reasons = _checked(lambda: texts(reply, "unsupported")) or ["unsupported, without a reason"]
                raise RoundFailed(outcome_of.unsupported(reasons))
            self._declarations = _checked(lambda: _declarations(reply.get("declarations")))
        except BaseException:
            self.close()
            raise
        self.timed_calls = 0
        self.loaded_bytes: int | None = None

    def declarations(self) -> Declarations:
        return self._declarations

    def prepare(self) -> Prepared:
        self.process.request({"command": "load"})
        if self.measures_memory:  # (read only where memory() follows: smaps is not free)
            self.loaded_bytes = self._resident()  # what the point's processes hold with only the inputs
        reply, prepare_s = self.process.timed_request({"command": "prepare"})
        state_bytes = _checked(lambda: integer(reply, "state_bytes", optional=True))
        reply, first_call_s = self.process.timed_request({"command": "first_call"})
        return Prepared(prepare_s, first_call_s, self._result(reply.get("result")), state_bytes)

    def block(self, calls: int) -> BlockTiming:
        reply, observed = self.process.timed_request({"command": "block", "calls": calls})
        self.timed_calls += calls
        return BlockTiming(calls, _checked(lambda: number(reply, "stated_s")), observed)

    def last_result(self) -> tuple[Called, int]:
        """The last timed call's result, and its input set: the harness counted the calls (they
        alternate between the two sets, the first on the primary), it does not ask."""
        reply = self.process.request({"command": "last"})
        return self._result(reply.get("result")), (self.timed_calls - 1) % 2

    def memory(self) -> Memory:
        device = torch.device(self.case.device)
        if device.type == "cuda":
            reply = self.process.request({"command": "memory_call", "profiler": True})
            peak = _checked(lambda: integer(reply, "allocator_peak_bytes", optional=True))
            return Memory(peak, None, source="torch.cuda.max_memory_allocated (stated by the worker)")
        if device.type != "cpu":
            return Memory(None, None, source=f"not measured: no peak statistics on {device.type}")
        self.process.request({"command": "memory_ready"})
        now = self._resident()
        kept = max(0, now - self.loaded_bytes) if now is not None and self.loaded_bytes is not None else None
        watched = [ProcessPeak(process.pid) for process in self._processes()]
        reset = [peak.start() for peak in watched]
        self.process.request({"command": "memory_call", "profiler": False})
        watched += [ProcessPeak(process.pid) for process in self._processes()
                    if process.pid not in {peak.pid for peak in watched}]  # started during the call: all of it
        peaks = [peak.peak_above_start() for peak in watched]
        rss = sum(peak for peak in peaks if peak is not None) if any(peak is not None for peak in peaks) else None
        source = MEMORY_SOURCE_CPU if all(reset) else MEMORY_SOURCE_CPU + (
            " (a process refused clear_refs: its peak since it started)")
        reply = self.process.request({"command": "memory_call", "profiler": True})
        return Memory(_checked(lambda: integer(reply, "allocator_peak_bytes", optional=True)), rss, source=source,
                      kept_bytes=kept)

    def fresh_call(self, fresh: Inputs) -> tuple[BlockTiming, Called]:
        """The fresh values go into the shared file only now, the call follows at once, and its
        output is in the file when the answer comes: read then (a copy), it is what the call gave."""
        for name, tensor in vars(call_inputs(fresh, self.case)).items():
            if tensor is not None:
                self.shared_inputs.write(name, tensor)
        reply, observed = self.process.timed_request({"command": "fresh_call"})
        timing = BlockTiming(1, _checked(lambda: number(reply, "stated_s")), observed)
        problems, missing = _checked(lambda: texts(reply, "problems")), _checked(lambda: texts(reply, "missing"))
        try:
            return timing, shared_result(self.shared_outputs.read, problems, missing, self.case)
        except TensorFileError as error:
            raise RoundFailed(outcome_of.unreadable_result(error)) from None

    def input_problems(self, fresh: Inputs | None) -> list[str]:
        if fresh is not None:  # the fresh call's inputs are in the shared file: the harness compares them itself
            try:
                now = {name: self.shared_inputs.read(name) for name in self.shared_inputs.files}
            except TensorFileError as error:
                raise RoundFailed(outcome_of.unreadable_result(error)) from None
            return changed_inputs(Inputs(now["q"], now["k"], now["v"], now.get("grad_out")),
                                  call_inputs(fresh, self.case))
        reply = self.process.request({"command": "input_problems"})
        return _checked(lambda: texts(reply, "problems"))

    def close(self) -> None:
        self.shared_inputs.close()
        self.shared_outputs.close()

    def _processes(self) -> list[Any]:
        return point_processes(self.process.pid, self.process.known_children)

    def _resident(self) -> int | None:
        """The memory the point's processes hold now (their proportional set sizes, /proc)."""
        found = [proportional_bytes(process.pid) for process in self._processes()]
        return sum(value for value in found if value is not None) if any(value is not None for value in found) \
            else None

    def clock(self) -> CpuClock:
        return CpuClock(time.perf_counter(), machine_busy_s(),
                        point_cpu_seconds(self.process.pid, self.process.known_children) or 0.0)

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
