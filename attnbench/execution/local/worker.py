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
from attnbench.contract.catalog import catalog_data
from attnbench.contract.errors import NotSupported
from attnbench.contract.implementation import Implementation, Tolerance, invalid_option_values, plugin_reasons
from attnbench.contract.inputs import Inputs, InputSource
from attnbench.contract.registry import Registry, load_plugin, load_registry
from attnbench.execution.local import sandbox
from attnbench.execution.local.wire import receive, send
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.outcome import Failure
from attnbench.measuring.allocator import steady_cpu_allocator
from attnbench.measuring.call_server import CallServer, Result, Shared
from attnbench.measuring.correctness import own_references
from attnbench.measuring.device_rates import copy_bytes_per_s, matmul_flops
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.in_process import declarations_of, plain_tensor_problems, source_notes
from attnbench.measuring.inputs import draw_set
from attnbench.measuring.tensor_files import TensorFile, map_shared, read_tensor, write_tensor
from attnbench.support import process_state
from attnbench.support.confinement import confine, set_dumpable
from attnbench.support.containment import PluginFault, contained, install_interrupt_handlers
from attnbench.support.text import bounded_block, one_line

INPUT_NAMES = ("q", "k", "v", "grad_out")


@dataclass(frozen=True)
class WorkerSpec:
    """What the harness gives a worker at its start (pickled by the harness, for the worker)."""

    kind: str  # "point", "draw", "reference", "yardstick" or "catalog"
    scratch: Path  # its own folder, removed after it
    threads: int
    writable: tuple[Path, ...] = ()  # more folders it may write beneath (a series' compile cache)
    hidden: tuple[Path, ...] = ()  # folders it may not read
    # What it runs: a plugin it loads itself (attnbench.contract.catalog.PluginInfo's fields) and
    # the name of the implementation or input source (with its parameters) it registered; or an
    # object registered by Python code in the harness's caller, pickled.
    plugin: Mapping[str, str] | None = None
    name: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes | None = None
    environment: Mapping[str, str] = field(default_factory=dict)


def child_main(control: Connection, output: Connection, spec: WorkerSpec) -> None:
    """Entry point of the worker process."""
    set_dumpable(True)  # (forked from an undumpable fork server) the harness reads its memory in /proc
    sandbox.lead_own_session()
    install_interrupt_handlers()  # a KeyboardInterrupt a plugin raises is then its fault, not a Ctrl-C
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
        job = _job(spec)  # imports the plugin's module: its import-time code runs here, confined
        changed = process_state.restore(settings)
        notes = [f"importing the plugin changed process-wide settings ({'; '.join(changed)}); put back"] \
            if changed else []
        SERVE[spec.kind](control, job, spec, settings, notes)
    except BaseException as error:  # everything ends as a message, even SystemExit or KeyboardInterrupt
        failure = outcome_of.from_exception(error, unpickling=job is None and spec.payload is not None)
        if job is None and spec.plugin is not None and not isinstance(error, NotSupported):
            failure = Failure("error", (f"plugin {spec.plugin.get('name')!r} could not give {spec.name!r} in the worker "
                                        f"({type(error).__name__}: {one_line(str(error), 300)})",), failure.detail)
        send(control, {"failure": {"status": failure.status, "reasons": [one_line(reason) for reason in failure.reasons],
                                   "detail": bounded_block(failure.detail)}})
    left = threading.active_count() - python_threads
    send(control, {"ended": {"threads_left": max(0, left)}})
    control.close()
    signal.pause()  # the parent counts what the point left running, then ends the whole session


def _job(spec: WorkerSpec) -> Any:
    """What the worker runs: the object sent, or the one its plugin registers under the name."""
    if spec.payload is not None:
        return pickle.loads(spec.payload)
    if spec.plugin is None:
        return None
    registry = load_plugin(spec.plugin["name"], spec.plugin.get("module", ""), spec.plugin.get("entry_point", ""))
    if spec.kind == "draw":
        if spec.name not in registry.input_sources:
            raise LookupError(_missing(registry, f"input source {spec.name!r}"))
        return registry.input_sources[spec.name].configured(spec.parameters)
    if spec.name not in registry:
        raise LookupError(_missing(registry, f"implementation {spec.name!r}"))
    return registry.get(spec.name)


def _missing(registry: Registry, what: str) -> str:
    problems = "; ".join(str(problem) for problem in registry.problems)
    return f"it registered no {what} here" + (f" ({problems})" if problems else "")


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
                        _shared(start["shared"]), settings, start.get("cache", "warm"))
    declared = declarations_of(implementation, case, options)
    send(control, {"declarations": {"tolerance": _tolerance(declared.tolerance),
                                    "own_reference": declared.own_reference, "flops": declared.flops,
                                    "step_bytes": declared.step_bytes, "notes": list(declared.notes)}})
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "load": lambda request: {"loaded": server.load()},
        "prepare": lambda request: {"state_bytes": server.prepare()},
        "first_call": lambda request: {"result": _shipped(spec.scratch, "first", server.first_call())},
        "block": lambda request: {"stated_s": server.block(int(request["calls"]))},
        "last": lambda request: _last(spec.scratch, server),
        "memory_ready": lambda request: {"ready": server.memory_ready()},
        "memory_call": lambda request: {"allocator_peak_bytes": server.memory_call(bool(request["profiler"]))},
        "fresh_call": lambda request: dict(zip(("stated_s", "problems", "missing"), server.fresh_call(), strict=True)),
        "input_problems": lambda request: {"problems": server.input_problems()},
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
    result, _ = server.last_result()  # (the harness knows which set the last call used)
    return {"result": _shipped(scratch, "last", result)}


def _shared(described: Mapping[str, Any]) -> Shared:
    """The harness's files for the fresh call, mapped: its inputs, its output and gradients."""
    inputs = map_shared(Path(described["inputs"]["path"]),
                        [TensorFile.from_json(file) for file in described["inputs"]["tensors"]])
    outputs = map_shared(Path(described["outputs"]["path"]),
                         [TensorFile.from_json(file) for file in described["outputs"]["tensors"]])
    return Shared(Inputs(inputs["q"], inputs["k"], inputs["v"], inputs.get("grad_out")), outputs)


def _shipped(scratch: Path, label: str, result: Result) -> dict[str, Any]:
    """A call's result written to files for the harness: the output and gradients, and the device
    they are on; or why it is not a tensor."""
    out, grads = result
    problems = plain_tensor_problems(out, grads)
    if problems:
        return {"problems": problems}
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


def serve_catalog(control: Connection, job: None, spec: WorkerSpec, settings: process_state.Snapshot,
                  notes: list[str]) -> None:
    """Loads every plugin, sends what they registered as data, then answers what only their code
    can: invalid_options, not_supported_reasons (attnbench.execution.local.catalog)."""
    request = receive(control)
    entry_points = request.get("entry_points")
    registry = load_registry(tuple(request["builtins"]), entry_points=entry_points if isinstance(entry_points, bool)
                             else None, modules=tuple(request.get("modules", ())))
    send(control, {"catalog": catalog_data(registry)})
    while True:
        request = receive(control)
        command = request.get("command")
        if command == "end":
            return
        implementation = registry.get(request["name"])
        if command == "invalid_options":
            found = contained(lambda: invalid_option_values(implementation, request["options"]), "invalid_options")
            send(control, {"fault": found.summary} if isinstance(found, PluginFault) else {"problems": found})
        elif command == "support":
            answers = []
            for data in request["cases"]:
                case = Case.from_json(data)
                found = contained(lambda case=case: plugin_reasons(implementation, case), "not_supported_reasons",
                                  float(request["timeout_s"]))
                answers.append({"fault": found.summary, "timed_out": found.timed_out}
                               if isinstance(found, PluginFault) else found)
            send(control, {"answers": answers})


SERVE: dict[str, Callable[..., None]] = {"point": serve_point, "draw": serve_draw, "reference": serve_reference,
                                         "yardstick": serve_yardstick, "catalog": serve_catalog}


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


def _apply_memory_cap(device_name: str, cap: Mapping[str, int] | None) -> None:
    """The cap covers this case's allocations on top of what the process already holds (on the
    CPU the harness may also hold it with a memory cgroup: attnbench.execution.local.memory_group)."""
    if cap is None:
        return
    device = torch.device(device_name)
    if device.type == "cpu":
        # RLIMIT_DATA counts heap and private mappings (Linux >= 4.7): a large malloc fails
        # cleanly and torch raises, instead of the kernel's OOM killer taking the machine.
        held = _data_segment_bytes()
        resource.setrlimit(resource.RLIMIT_DATA, (held + int(cap["address_space_bytes"]), resource.RLIM_INFINITY))
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap["bytes"]) / total), device)


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
