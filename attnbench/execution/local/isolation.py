"""The parent side: runs each job in its own worker process, with a timeout.

A crash, hang or out-of-memory kills the worker, never the sweep: every job ends in an
Outcome. Workers are forked from a fork server that has already imported torch, so a
fresh process per case costs milliseconds rather than the seconds of a new interpreter.

The job is pickled here, where a plugin's ``__getstate__`` may fail or hang (contained like any
harness-side plugin call); the worker's output comes through a pipe of which only a bounded tail
is kept, and a worker that writes more than OUTPUT_CAP_BYTES is stopped; when the round ends,
everything the worker started is killed (attnbench.execution.local.sandbox) and counted.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch

from attnbench.execution.local import sandbox, worker
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.outcome import Outcome
from attnbench.support.containment import PLUGIN_CALL_TIMEOUT_S, PluginFault, contained, deferred_interrupts

LOG_TAIL_CHARS = 2000
OUTPUT_CAP_BYTES = 64 * 2**20  # a worker printing more is broken, and its timings measure printing
READ_BYTES = 2**16


@dataclass(frozen=True)
class IsolatedResult:
    outcome: Outcome
    wall_time_s: float
    log_tail: str  # the worker's last output, kept for failures
    notes: tuple[str, ...] = ()  # what the harness did about the worker (processes it left, its output)


def run_isolated(job: object, timeout_s: float, threads: int | None = None) -> IsolatedResult:
    """Run ``job.run`` in a fresh worker with ``threads`` torch threads (default: this process's)."""
    payload = contained(lambda: pickle.dumps(job), "pickling the implementation for a worker", PLUGIN_CALL_TIMEOUT_S)
    if isinstance(payload, PluginFault):
        return IsolatedResult(outcome_of.unsendable(payload.message, payload.detail), 0.0, "")
    context = _context()
    sandbox.become_subreaper()
    known_children = sandbox.own_children()
    receiver, sender = context.Pipe(duplex=False)
    output, output_sender = context.Pipe(duplex=False)
    threads = threads or torch.get_num_threads()
    process = context.Process(target=worker.child_main, args=(sender, output_sender, payload, threads), daemon=True)
    started = time.perf_counter()
    tail = _Tail()
    left_running = 0
    try:
        process.start()
        sender.close()  # the worker holds the other ends: its exit closes the pipes
        output_sender.close()
        outcome = _wait(process, receiver, output, tail, timeout_s)
    finally:
        with deferred_interrupts():  # a Ctrl-C or SIGTERM now must not leave the worker's processes behind
            if process.pid is not None:
                left_running = sandbox.end_point_processes(process.pid, known_children, lambda: _stop(process))
            tail.drain(output)
            receiver.close()
            output.close()
    wall_time_s = time.perf_counter() - started
    if outcome is None:
        outcome = outcome_of.died(process.exitcode)
    notes = []
    if left_running:
        notes.append(f"{left_running} process(es) it started were still running when the point ended; killed")
    if tail.total > LOG_TAIL_CHARS:
        notes.append(f"it wrote {tail.total} bytes to stdout/stderr (the last {LOG_TAIL_CHARS} characters kept)")
    return IsolatedResult(outcome, wall_time_s, tail.text(), tuple(notes))


class _Tail:
    """The last bytes of the worker's output, and how many it wrote in all."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.kept = 0
        self.total = 0
        self.open = True

    def read(self, output) -> None:
        try:
            chunk = os.read(output.fileno(), READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.open = False
            return
        self.total += len(chunk)
        self.chunks.append(chunk)
        self.kept += len(chunk)
        while self.kept - len(self.chunks[0]) >= LOG_TAIL_CHARS * 4:  # UTF-8: up to 4 bytes a character
            self.kept -= len(self.chunks.popleft())

    def drain(self, output) -> None:
        """What is left in the pipe, without waiting for writers that may never close it."""
        if output.closed:
            return
        os.set_blocking(output.fileno(), False)
        while self.open:
            before = self.total
            self.read(output)
            if self.total == before:
                return

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")[-LOG_TAIL_CHARS:]


def _wait(
    process: multiprocessing.process.BaseProcess, receiver, output, tail: _Tail, timeout_s: float
) -> Outcome | None:
    """The worker's outcome; a Failure on timeout or too much output; None when it died without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return outcome_of.timed_out(timeout_s)
        watched = [receiver, process.sentinel, *([output] if tail.open else [])]
        ready = wait(watched, timeout=remaining)
        if output in ready:
            tail.read(output)
            if tail.total > OUTPUT_CAP_BYTES:
                return outcome_of.output_flood(OUTPUT_CAP_BYTES)
        if receiver in ready or (process.sentinel in ready and receiver.poll(0)):
            try:
                return receiver.recv()
            except (EOFError, OSError):  # the pipe closed: the worker is gone
                return None
            except Exception as error:  # noqa: BLE001 (an outcome that does not unpickle here)
                return outcome_of.unreadable_result(error)
        if process.sentinel in ready:
            return None


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():  # (killed with its group already, unless it never got to lead one)
        process.kill()
    process.join()


_fork_server: multiprocessing.context.BaseContext | None = None


def start_fork_server() -> None:
    """Start the fork server and wait until it serves: its imports (torch, the plugins) take
    seconds, which would otherwise land in the first point's wall time (a cluster's slot pays
    them as it starts)."""
    context = _context()
    if context.get_start_method() == "forkserver":
        ready = context.Process(target=int, daemon=True)  # a child that does nothing
        ready.start()
        ready.join()


def _context() -> multiprocessing.context.BaseContext:
    global _fork_server
    if _fork_server is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _fork_server = multiprocessing.get_context("forkserver")
            _fork_server.set_forkserver_preload(["attnbench.execution.local.forkserver_preload"])
        else:  # no fork on this platform: a fresh interpreter per job, slower but as isolated
            _fork_server = multiprocessing.get_context("spawn")
    return _fork_server
