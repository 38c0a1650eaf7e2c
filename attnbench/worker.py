"""The worker process side: runs one job and sends back its outcome, whatever happens.

Imported ahead of time by the fork server (with torch), so each job starts in a fresh
process in a few milliseconds, with no allocation left over from another job.
"""

from __future__ import annotations

import os
import resource
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import torch

from attnbench.allocator import steady_cpu_allocator
from attnbench.case import Case
from attnbench.errors import NotSupported
from attnbench.implementation import Implementation
from attnbench.measure import measure_case
from attnbench.results import Measurement
from attnbench.suite import Measure


@dataclass(frozen=True)
class Job:
    implementation: Implementation
    case: Case
    options: Mapping[str, Any]
    measure: Measure
    seed: int
    memory_cap_bytes: int | None


@dataclass(frozen=True)
class Failure:
    """A job that did not run to the end."""

    status: Literal["unsupported", "oom", "error", "timeout", "crashed"]
    reasons: tuple[str, ...]
    detail: str = ""


Outcome = Measurement | Failure


def child_main(connection: Connection, job: Job, log_path: str) -> None:
    """Entry point of the worker process."""
    _redirect_output(log_path)
    steady_cpu_allocator()
    if job.measure.threads is not None:
        torch.set_num_threads(job.measure.threads)
    try:
        _apply_memory_cap(job)
        outcome: Outcome = measure_case(job.implementation, job.case, job.options, job.measure, job.seed)
    except BaseException as error:  # everything becomes a row, even KeyboardInterrupt in the child
        outcome = failure_from_exception(error)
    connection.send(outcome)
    connection.close()


def failure_from_exception(error: BaseException) -> Failure:
    if isinstance(error, NotSupported):
        return Failure("unsupported", (str(error),))
    detail = "".join(traceback.format_exception(error))
    summary = f"{type(error).__name__}: {_first_line(error)}"
    if is_out_of_memory(error):
        return Failure("oom", (summary,), detail)
    return Failure("error", (summary,), detail)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    # The CPU allocator raises a plain RuntimeError when malloc fails (e.g. under RLIMIT_DATA).
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in message or "not enough memory" in message
    )


def _apply_memory_cap(job: Job) -> None:
    """The cap covers this case's allocations on top of what the process already holds."""
    if job.memory_cap_bytes is None:
        return
    device = torch.device(job.case.device)
    if device.type == "cpu":
        # RLIMIT_DATA counts heap and private mappings (Linux >= 4.7): a large malloc fails
        # cleanly and torch raises, instead of the kernel's OOM killer taking the machine.
        held = _data_segment_bytes()
        resource.setrlimit(resource.RLIMIT_DATA, (held + job.memory_cap_bytes, resource.RLIM_INFINITY))
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job.memory_cap_bytes / total), device)


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (C libraries included) to the job's log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
