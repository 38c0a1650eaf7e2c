"""The harness's side of a worker: starting it, talking to it, watching it from outside, ending it.

Workers are forked from a fork server that has already imported torch (a fresh process costs
milliseconds). A ``WorkerProcess`` sends requests as JSON and waits for each reply within the
round's deadline, draining the worker's output meanwhile (only a bounded tail is kept; past
OUTPUT_CAP_BYTES the worker is stopped); a reply that is not JSON, a failure, a death or the
deadline ends the round (``RoundFailed``). What the harness learns of the worker it reads itself:
its clock around each request, the CPU time of its session and its peak memory from /proc.
When the worker is done, everything it started is killed (attnbench.execution.local.sandbox) and counted.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from attnbench.execution.local import sandbox, worker
from attnbench.execution.local.wire import WireError, receive, send, texts
from attnbench.measuring import outcome as outcome_of
from attnbench.measuring.outcome import Failure
from attnbench.support.confinement import Protections
from attnbench.support.containment import deferred_interrupts
from attnbench.support.text import bounded_block

LOG_TAIL_CHARS = 2000
OUTPUT_CAP_BYTES = 64 * 2**20  # a worker printing more is broken, and its timings measure printing
READ_BYTES = 2**16
# A worker's own failure can only be one of these; every other status is the harness's to decide.
WORKER_STATUSES = ("unsupported", "oom", "error")
ENDING_S = 5.0  # how long an ended worker may take to say so
# Workers started and not yet ended: ended at exit should a stop have come between a worker's
# start and its caller's hold on it (multiprocessing would otherwise wait on it for ever).
_running: set[WorkerProcess] = set()


class RoundFailed(Exception):
    """The worker's round ended without a measurement: ``failure`` says how."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reasons)
        self.failure = failure


@dataclass(frozen=True)
class Ended:
    """What the harness saw of a worker once it was gone."""

    wall_time_s: float  # start to end
    log_tail: str  # its last output, kept for failures
    notes: tuple[str, ...]  # what the harness did about it (processes it left, its output)


class WorkerProcess:
    """One confined worker (attnbench.execution.local.worker) and the harness's view of it."""

    def __init__(self, spec: worker.WorkerSpec, timeout_s: float) -> None:
        start_fork_server()  # (its start, seconds of imports, is no point's time)
        self.timeout_s = timeout_s
        self.scratch = spec.scratch
        self.deadline = time.monotonic() + timeout_s
        self.started = time.perf_counter()
        self.tail = _Tail()
        self.threads_left = 0
        self.ended = False
        context = _context()
        sandbox.become_subreaper()
        self.known_children = sandbox.own_children()
        self.control, control_child = context.Pipe(duplex=True)
        self.output, output_sender = context.Pipe(duplex=False)
        self.process = context.Process(target=worker.child_main, args=(control_child, output_sender, spec),
                                       daemon=True)
        with deferred_interrupts():  # a worker started must be known, to be ended
            try:
                self.process.start()
                _running.add(self)
            finally:
                control_child.close()  # the worker holds the other ends: its exit closes the pipes
                output_sender.close()
        try:
            self.protections = _protections(self.reply())
        except BaseException:  # a stop, or a worker that could not confine itself: no caller holds it yet
            self.end()
            raise

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(message)
        return self.reply()

    def timed_request(self, message: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The reply, and the harness's clock from sending the request to the reply's arrival."""
        began = time.perf_counter()
        self._send(message)
        reply = self.reply()
        return reply, time.perf_counter() - began

    def _send(self, message: dict[str, Any]) -> None:
        try:
            send(self.control, message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker has ended already: its last message (a failure) or its end says why

    def reply(self) -> dict[str, Any]:
        """The worker's next message; RoundFailed when it failed, died, flooded or ran out of time."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RoundFailed(outcome_of.timed_out(self.timeout_s))
            watched = [self.control, self.process.sentinel, *([self.output] if self.tail.open else [])]
            ready = wait(watched, timeout=remaining)
            if self.output in ready:
                self.tail.read(self.output)
                if self.tail.total > OUTPUT_CAP_BYTES:
                    raise RoundFailed(outcome_of.output_flood(OUTPUT_CAP_BYTES))
            if self.control in ready or (self.process.sentinel in ready and self.control.poll(0)):
                return self._message()
            if self.process.sentinel in ready:
                raise RoundFailed(outcome_of.died(self.process.exitcode))

    def _message(self) -> dict[str, Any]:
        try:
            message = receive(self.control)
        except (EOFError, OSError):  # the pipe closed: the worker is gone
            self.process.join(1.0)
            raise RoundFailed(outcome_of.died(self.process.exitcode)) from None
        except WireError as error:
            raise RoundFailed(outcome_of.unreadable_result(error)) from None
        if "failure" in message:
            raise RoundFailed(_failure(message["failure"]))
        if "ended" in message:
            self.ended = True
            ended = message["ended"]
            left = ended.get("threads_left") if isinstance(ended, dict) else None
            self.threads_left = left if isinstance(left, int) and not isinstance(left, bool) and left > 0 else 0
            raise RoundFailed(outcome_of.died(None))  # an end the harness did not ask for
        return message

    def end(self) -> Ended:
        """Asks the worker to end (if it is still serving), then kills what it started."""
        notes = []
        with deferred_interrupts():  # a Ctrl-C or SIGTERM now must not leave the worker's processes behind
            if not self.ended and self.process.is_alive():
                self._ask_to_end()
            left_running = sandbox.end_point_processes(self.pid, self.known_children, self._stop) \
                if self.process.pid is not None else 0
            self.tail.drain(self.output)
            self.control.close()
            self.output.close()
            _running.discard(self)
        if left_running:
            notes.append(f"{left_running} process(es) it started were still running when the point ended; killed")
        if self.threads_left:
            notes.append(f"{self.threads_left} thread(s) it started were still running at the end (stopped with "
                         "the worker)")
        if self.tail.total > LOG_TAIL_CHARS:
            notes.append(f"it wrote {self.tail.total} bytes to stdout/stderr (the last {LOG_TAIL_CHARS} characters "
                         "kept)")
        return Ended(time.perf_counter() - self.started, self.tail.text(), tuple(notes))

    def _ask_to_end(self) -> None:
        self.deadline = min(self.deadline, time.monotonic() + ENDING_S)
        try:
            send(self.control, {"command": "end"})
            while True:
                self.reply()
        except RoundFailed:  # its "ended" message, or anything else: it is ending either way
            pass
        except OSError:  # it closed the pipe already
            pass

    def _stop(self) -> None:
        if self.process.is_alive():  # (killed with its group already, unless it never got to lead one)
            self.process.kill()
        self.process.join()


@atexit.register
def _end_running() -> None:
    for process in list(_running):
        process.end()


def _protections(message: dict[str, Any]) -> Protections:
    """The first message of every worker: what confines it (sent before any plugin code ran)."""
    found = message.get("confined")
    if not isinstance(found, dict):
        raise RoundFailed(outcome_of.unreadable_result(WireError("no word of its confinement")))
    fields = Protections.__dataclass_fields__
    return Protections(**{name: value for name, value in found.items()
                          if name in fields and isinstance(value, (bool, int, type(None)))})


def _failure(data: object) -> Failure:
    """A failure the worker reported for itself; an unknown status is an error."""
    if not isinstance(data, dict):
        return outcome_of.unreadable_result(WireError("a failure that is not an object"))
    status = data.get("status") if data.get("status") in WORKER_STATUSES else "error"
    try:
        reasons = tuple(texts(data, "reasons")) or ("the worker failed without a reason",)
    except WireError:
        reasons = ("the worker failed with unreadable reasons",)
    detail = data.get("detail") if isinstance(data.get("detail"), str) else ""
    return Failure(status, reasons, bounded_block(detail))


class _Tail:
    """The last bytes of the worker's output, and how many it wrote in all."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.kept = 0
        self.total = 0
        self.open = True

    def read(self, output: Connection) -> None:
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

    def drain(self, output: Connection) -> None:
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


_fork_server: multiprocessing.context.BaseContext | None = None
_fork_server_started = False


def start_fork_server() -> None:
    """Start the fork server (once) and wait until it serves: its imports (torch, the measuring
    code) take seconds, which would otherwise land in the first point's wall time and deadline
    (a cluster's slot pays them as it starts)."""
    global _fork_server_started
    context = _context()
    if context.get_start_method() == "forkserver" and not _fork_server_started:
        ready = context.Process(target=int, daemon=True)  # a child that does nothing
        ready.start()
        ready.join()
        _fork_server_started = True


def _context() -> multiprocessing.context.BaseContext:
    global _fork_server
    if _fork_server is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _fork_server = multiprocessing.get_context("forkserver")
            _fork_server.set_forkserver_preload(["attnbench.execution.local.forkserver_preload"])
        else:  # no fork on this platform: a fresh interpreter per job, slower but as isolated
            _fork_server = multiprocessing.get_context("spawn")
    return _fork_server
