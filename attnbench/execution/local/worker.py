"""The worker process side: runs one job and sends back its outcome, whatever happens.

Imported ahead of time by the fork server (with torch), so each job starts in a fresh
process in a few milliseconds, with no allocation left over from another job.

A worker is contained: it leads a session of its own (a plugin that signals its process group
reaches nothing else), dies when the fork server dies (so when the harness dies), and leaves a
guard process behind it that kills whatever the point started once the worker is gone. Its
output goes to a pipe the parent drains, keeping a bounded tail. The job arrives pickled and is
unpickled here, so that a plugin that cannot be rebuilt in a worker is reported as such.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.implementation import Implementation, plugin_reasons
from attnbench.contract.inputs import InputSource
from attnbench.execution.local import sandbox
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.allocator import steady_cpu_allocator
from attnbench.measuring.correctness import Verifier
from attnbench.measuring.device_rates import copy_bytes_per_s, matmul_flops
from attnbench.measuring.figures import Measurement
from attnbench.measuring.measure import measure_case
from attnbench.measuring.outcome import Failure, Outcome, Yardstick
from attnbench.settings.suite import Measure
from attnbench.support import process_state


@dataclass(frozen=True)
class Job:
    """One round of one point."""

    implementation: Implementation
    case: Case
    options: Mapping[str, Any]
    measure: Measure
    seed: int
    memory_cap_bytes: int | None
    verifier: Verifier | None = None  # round 1's references, for the later rounds
    source: InputSource | None = None  # the case's input source; None: the built-in of that name

    def run(self, settings: process_state.Snapshot) -> Outcome:
        reasons = plugin_reasons(self.implementation, self.case)
        if reasons:
            return outcome_of.unsupported(reasons)
        _apply_memory_cap(self.case.device, self.memory_cap_bytes)
        return measure_case(self.implementation, self.case, self.options, self.measure, self.seed,
                            verifier=self.verifier, settings=settings, source=self.source)


@dataclass(frozen=True)
class YardstickJob:
    device: str
    dtype_name: str
    min_run_time_s: float

    def run(self, settings: process_state.Snapshot) -> Outcome:
        return Yardstick(matmul_flops(self.device, self.dtype_name, self.min_run_time_s),
                         copy_bytes_per_s(self.device, self.dtype_name, self.min_run_time_s / 2))


def child_main(connection: Connection, output: Connection, payload: bytes, threads: int) -> None:
    """Entry point of the worker process."""
    sandbox.lead_own_session()
    _redirect_output(output)
    steady_cpu_allocator()
    torch.set_num_threads(threads)
    settings = process_state.snapshot()  # what every plugin call must leave as it found it
    python_threads = threading.active_count()
    job = None
    try:
        job = pickle.loads(payload)  # imports the plugin's module: its import-time code runs here
        changed = process_state.restore(settings)
        outcome = job.run(settings)
        if changed:
            outcome = _with_note(outcome, f"importing the plugin changed process-wide settings "
                                          f"({'; '.join(changed)}); put back")
    except BaseException as error:  # everything becomes a row, even SystemExit or KeyboardInterrupt
        outcome = outcome_of.from_exception(error, unpickling=job is None)
    left = threading.active_count() - python_threads
    if left > 0:
        outcome = _with_note(outcome, f"{left} thread(s) it started were still running at the end (stopped with "
                                      "the worker)")
    connection.send(outcome)
    connection.close()
    signal.pause()  # the parent counts what the point left running, then ends the whole session


def _with_note(outcome: Outcome, note: str) -> Outcome:
    if isinstance(outcome, (Measurement, Failure)):
        return replace(outcome, notes=(*outcome.notes, note))
    return outcome


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
