"""The worker process: confined before any plugin code runs, it then does what the harness asks.

Imported ahead of time by the fork server (with torch), so each worker starts in a fresh process
in a few milliseconds, with no allocation left over from another one. In order, a worker:

1. leads a session of its own (a plugin that signals its process group reaches nothing else),
   dies when the fork server dies (so when the harness dies) and leaves a guard process behind
   that kills whatever the point started once the worker is gone (attnbench.execution.local.sandbox);
2. confines itself (attnbench.support.confinement): writes only beneath its scratch folders, the
   ledger's keys and the harness's private inputs unreadable, no ptrace or signals beyond itself,
   no sockets, no privileges; and says so, before anything else, to the harness;
3. only then unpickles its job (which imports the plugin's module: its import-time code runs
   here) and serves the harness's requests (``serve_point``, ``serve_draw``, ``serve_reference``,
   ``serve_yardstick``) over the control pipe, in JSON, tensors as files in its scratch folder.

A request that raises ends the worker's service with a failure message (the harness turns it
into the row's status, attnbench.measuring.outcome).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import resource
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation, Tolerance, plugin_reasons
from attnbench.contract.inputs import Inputs, InputSource
from attnbench.execution.local import sandbox
from attnbench.execution.local.wire import receive, send
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.allocator import steady_cpu_allocator
from attnbench.measuring.call_server import CallServer, Result
from attnbench.measuring.correctness import own_references
from attnbench.measuring.device_rates import copy_bytes_per_s, matmul_flops
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.in_process import declarations_of, source_notes
from attnbench.measuring.inputs import draw_set
from attnbench.measuring.tensor_files import TensorFile, read_tensor, write_tensor
from attnbench.support import process_state
from attnbench.support.confinement import confine, set_dumpable
from attnbench.support.text import bounded_block, one_line

INPUT_NAMES = ("q", "k", "v", "grad_out")


@dataclass(frozen=True)
class WorkerSpec:
    """What the harness gives a worker at its start (pickled by the harness, for the worker)."""

    kind: str  # "point", "draw", "reference" or "yardstick"
    scratch: Path  # its own folder, removed after it
    threads: int
    writable: tuple[Path, ...] = ()  # more folders it may write beneath (a series' compile cache)
    hidden: tuple[Path, ...] = ()  # folders it may not read
    payload: bytes | None = None  # the pickled implementation or input source
    environment: Mapping[str, str] = field(default_factory=dict)


def child_main(control: Connection, output: Connection, spec: WorkerSpec) -> None:
    """Entry point of the worker process."""
    set_dumpable(True)  # (forked from an undumpable fork server) the harness reads its memory in /proc
    sandbox.lead_own_session()
    _redirect_output(output)
    protections = confine([spec.scratch, *spec.writable], spec.hidden)
    _use_scratch(spec)
    steady_cpu_allocator()
    torch.set_num_threads(spec.threads)
    send(control, {"confined": protections.to_json()})
    settings = process_state.snapshot()  # what every plugin call must leave as it found it
    python_threads = threading.active_count()
    job = None
    try:
        job = pickle.loads(spec.payload) if spec.payload is not None else None  # imports the plugin's module
        changed = process_state.restore(settings)
        notes = [f"importing the plugin changed process-wide settings ({'; '.join(changed)}); put back"] \
            if changed else []
        SERVE[spec.kind](control, job, spec, settings, notes)
    except BaseException as error:  # everything ends as a message, even SystemExit or KeyboardInterrupt
        failure = outcome_of.from_exception(error, unpickling=job is None and spec.payload is not None)
        send(control, {"failure": {"status": failure.status, "reasons": [one_line(reason) for reason in failure.reasons],
                                   "detail": bounded_block(failure.detail)}})
    left = threading.active_count() - python_threads
    send(control, {"ended": {"threads_left": max(0, left)}})
    control.close()
    signal.pause()  # the parent counts what the point left running, then ends the whole session


# --- a point: the implementation's calls --------------------------------------------------------


def serve_point(control: Connection, implementation: Implementation, spec: WorkerSpec,
                settings: process_state.Snapshot, notes: list[str]) -> None:
    start = receive(control)
    case = Case.from_json(start["case"])
    options = start["options"]
    reasons = plugin_reasons(implementation, case)
    if reasons:
        send(control, {"unsupported": reasons})
        return
    _apply_memory_cap(case.device, start.get("memory_cap"))
    sets = start["inputs"]
    server = CallServer(implementation, case, options, lambda: [read_inputs(described, case) for described in sets],
                        settings, start.get("cache", "warm"))
    declared = declarations_of(implementation, case, options)
    send(control, {"declarations": {"tolerance": _tolerance(declared.tolerance),
                                    "own_reference": declared.own_reference, "flops": declared.flops,
                                    "step_bytes": declared.step_bytes, "notes": list(declared.notes)}})
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "prepare": lambda request: {"state_bytes": server.prepare()},
        "first_call": lambda request: {"result": _shipped(spec.scratch, "first", server.first_call())},
        "block": lambda request: {"stated_s": server.block(int(request["calls"]))},
        "last": lambda request: _last(spec.scratch, server),
        "memory_ready": lambda request: {"ready": server.memory_ready()},
        "memory_call": lambda request: {"allocator_peak_bytes": server.memory_call(bool(request["profiler"]))},
        "fresh_load": lambda request: {"loaded": server.load_fresh(read_inputs(request["inputs"], case))},
        "fresh_call": lambda request: {"stated_s": server.fresh_call()},
        "fresh_result": lambda request: {"result": _shipped(spec.scratch, "fresh", server.fresh_result())},
        "input_problems": lambda request: {"problems": _input_problems(server, request, case)},
        "notes": lambda request: {"notes": [*notes, *server.own_warnings(), *server.notes]},
        "gpu_sample": lambda request: {"sample": _sample_json(server.gpu_sample())},
    }
    while True:
        request = receive(control)
        if request.get("command") == "end":
            return
        send(control, handlers[request["command"]](request))


def _sample_json(sample: GpuSample | None) -> dict[str, Any] | None:
    return None if sample is None else dataclasses.asdict(sample)


def _tolerance(declared: object) -> object:
    """Two numbers, or the text of whatever else ``tolerance()`` returned (judged at the cap)."""
    atol, rtol = getattr(declared, "atol", None), getattr(declared, "rtol", None)
    if isinstance(declared, Tolerance) and all(isinstance(value, (int, float)) for value in (atol, rtol)):
        return [atol, rtol]
    return repr(declared)[:200]


def _last(scratch: Path, server: CallServer) -> dict[str, Any]:
    result, index = server.last_result()
    return {"result": _shipped(scratch, "last", result), "set": index}


def _input_problems(server: CallServer, request: Mapping[str, Any], case: Case) -> list[str]:
    fresh = request.get("fresh")
    return server.input_problems() if fresh is None else server.fresh_problems(read_inputs(fresh, case))


def _shipped(scratch: Path, label: str, result: Result) -> dict[str, Any]:
    """A call's result written to files for the harness: the output and gradients, and the device
    they are on; or why it is not a tensor."""
    out, grads = result
    if not isinstance(out, torch.Tensor):
        return {"problems": [f"output is a {type(out).__name__}, not a torch.Tensor"]}
    if grads is not None and not all(grad is None or isinstance(grad, torch.Tensor) for grad in grads.values()):
        return {"problems": ["a gradient is not a torch.Tensor"]}
    shipped: dict[str, Any] = {"device": out.device.type, "out": write_tensor(scratch, f"{label}.out", out).to_json()}
    if grads is not None:
        shipped["grads"] = {name: write_tensor(scratch, f"{label}.{name}", grad).to_json() if grad is not None
                            else None for name, grad in grads.items() if name in ("dq", "dk", "dv")}
    return shipped


# --- an input source's draws, and an implementation's own references ----------------------------


def serve_draw(control: Connection, source: InputSource, spec: WorkerSpec, settings: process_state.Snapshot,
               notes: list[str]) -> None:
    """Draws the case's input sets (the first one the primary) into files of the scratch folder."""
    request = receive(control)
    case = Case.from_json(request["case"])
    drawn: dict[str, Any] = {}
    primary = None
    for name, seed in request["seeds"].items():
        inputs = draw_set(case, int(seed), source, primary)
        primary = primary or inputs
        drawn[name] = write_inputs(spec.scratch, name, inputs)
    send(control, {"sets": drawn, "notes": [*notes, *source_notes(source)]})


def serve_reference(control: Connection, implementation: Implementation, spec: WorkerSpec,
                    settings: process_state.Snapshot, notes: list[str]) -> None:
    """The implementation's own float64 reference of each input set at the harness's rows."""
    request = receive(control)
    case = Case.from_json(request["case"])
    rows = torch.tensor(request["rows"], dtype=torch.long)
    sets = {name: read_inputs(described, case) for name, described in request["sets"].items()}
    found = own_references(implementation, case, request["options"], sets, rows)
    references = {name: None if tensors is None else
                  {tensor: write_tensor(spec.scratch, f"reference.{name}.{tensor}", value).to_json()
                   for tensor, value in tensors.items() if value is not None}
                  for name, tensors in found.items()}
    send(control, {"references": references})


def serve_yardstick(control: Connection, job: None, spec: WorkerSpec, settings: process_state.Snapshot,
                    notes: list[str]) -> None:
    request = receive(control)
    device, dtype, seconds = request["device"], request["dtype"], float(request["seconds"])
    send(control, {"flops": matmul_flops(device, dtype, seconds), "copy_bytes_per_s": copy_bytes_per_s(
        device, dtype, seconds / 2)})


SERVE: dict[str, Callable[..., None]] = {"point": serve_point, "draw": serve_draw, "reference": serve_reference,
                                         "yardstick": serve_yardstick}


# --- inputs as files ---------------------------------------------------------------------------


def write_inputs(folder: Path, name: str, inputs: Inputs) -> dict[str, Any]:
    """One input set's tensors as files ``<name>.q`` and so on in ``folder``; their description."""
    return {"folder": str(folder),
            "tensors": {tensor: write_tensor(folder, f"{name}.{tensor}", getattr(inputs, tensor)).to_json()
                        for tensor in INPUT_NAMES if getattr(inputs, tensor) is not None}}


def read_inputs(described: Mapping[str, Any], case: Case) -> Inputs:
    """An input set from its files, as ``write_inputs`` described them."""
    folder = Path(described["folder"])
    limit = 8 * case.batch * max(case.heads, case.kv_heads) * case.key_len * case.head_dim
    tensors = {name: read_tensor(folder, TensorFile.from_json(value), limit)
               for name, value in described["tensors"].items() if name in INPUT_NAMES}
    return Inputs(tensors["q"], tensors["k"], tensors["v"], tensors.get("grad_out"))


# --- the process ---------------------------------------------------------------------------------


def _use_scratch(spec: WorkerSpec) -> None:
    """Temporary files and compile caches go where the worker may write; the harness's settings
    of now (the fork server's environment is that of its start) come with the spec."""
    tempfile.tempdir = str(spec.scratch)
    os.environ.update({"TMPDIR": str(spec.scratch), **spec.environment})
    sys.dont_write_bytecode = True


def _apply_memory_cap(device_name: str, cap_bytes: int | None) -> None:
    """The cap covers this case's allocations on top of what the process already holds."""
    if cap_bytes is None:
        return
    device = torch.device(device_name)
    if device.type == "cpu":
        # RLIMIT_DATA counts heap and private mappings (Linux >= 4.7): a large malloc fails
        # cleanly and torch raises, instead of the kernel's OOM killer taking the machine.
        held = _data_segment_bytes()
        resource.setrlimit(resource.RLIMIT_DATA, (held + cap_bytes, resource.RLIM_INFINITY))
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _redirect_output(output: Connection) -> None:
    """Send this process's stdout and stderr (C libraries included) into the parent's pipe."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
