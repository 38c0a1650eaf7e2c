"""The parent side: runs each job in its own worker process, with a timeout.

A crash, hang or out-of-memory kills the worker, never the sweep: every job ends in an
Outcome. Workers are forked from a fork server that has already imported torch, so a
fresh process per case costs milliseconds rather than the seconds of a new interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from attnbench import worker
from attnbench.worker import Failure, Job, Outcome

LOG_TAIL_CHARS = 2000


@dataclass(frozen=True)
class IsolatedResult:
    outcome: Outcome
    wall_time_s: float
    log_tail: str  # the worker's last output, kept for failures


def run_isolated(job: Job, timeout_s: float) -> IsolatedResult:
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    log_path = _new_log_file()
    process = context.Process(target=worker.child_main, args=(sender, job, str(log_path)), daemon=True)
    started = time.perf_counter()
    try:
        process.start()  # pickles the job: the implementation object travels to the worker
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        sender.close()
        receiver.close()
        log_path.unlink()
        return IsolatedResult(_unpicklable(error), 0.0, "")
    sender.close()  # the worker holds the other end: its exit closes the pipe
    try:
        outcome = _wait(process, receiver, timeout_s)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    wall_time_s = time.perf_counter() - started
    if outcome is None:
        outcome = _death(process.exitcode)
    log_tail = _read_tail(log_path)
    log_path.unlink()
    return IsolatedResult(outcome, wall_time_s, log_tail)


def _new_log_file() -> Path:
    descriptor, name = tempfile.mkstemp(prefix="attnbench-worker-", suffix=".log")
    os.close(descriptor)
    return Path(name)


def _wait(process: multiprocessing.process.BaseProcess, receiver, timeout_s: float) -> Outcome | None:
    """The worker's outcome; a Failure on timeout; None when it died without sending one."""
    if not receiver.poll(timeout_s):
        process.kill()
        return Failure("timeout", (f"no result within the case timeout of {timeout_s:g} s; worker killed",))
    try:
        return receiver.recv()
    except (EOFError, OSError):  # the pipe closed: the worker is gone
        return None


def _unpicklable(error: Exception) -> Failure:
    return Failure(
        "error",
        (f"the implementation cannot be sent to a worker process ({type(error).__name__}: {error}); "
         "define its class and what prepare() needs at module level",),
    )


def _death(exitcode: int | None) -> Failure:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (not sent by attnbench: most likely the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return Failure("crashed", (f"worker killed by {name}{hint}",))
    return Failure("crashed", (f"worker exited with code {exitcode} before sending a result",))


def _read_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-LOG_TAIL_CHARS:]


_fork_server: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _fork_server
    if _fork_server is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _fork_server = multiprocessing.get_context("forkserver")
            _fork_server.set_forkserver_preload(["attnbench.forkserver_preload"])
        else:  # no fork on this platform: a fresh interpreter per job, slower but as isolated
            _fork_server = multiprocessing.get_context("spawn")
    return _fork_server
