"""The outcome classifier: every status a point can end with is decided here, and only here.

A point's status comes from what its worker reported (a Measurement, or an exception), from how
the worker ended (killed, timed out, flooded its output, could not be sent or read), or from the
scheduler's refusal to run it (no such device, a broken plugin, a predicted overrun).

    ok           every check passed              incorrect    a check failed
    unsupported  the implementation or device    skipped      predicted to exceed a limit
                 refused the case
    oom          ran out of memory               timeout      no result within the case timeout
    crashed      the worker died                 error        anything else went wrong
"""

from __future__ import annotations

import dataclasses

import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from attnbench.contract.errors import NotSupported
from attnbench.measuring.figures import Measurement
from attnbench.support.text import one_line, safe_str

Status = Literal["ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error"]
STATUSES: tuple[Status, ...] = ("ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error")
FailureStatus = Literal["unsupported", "skipped", "oom", "error", "timeout", "crashed"]


@dataclass(frozen=True)
class Failure:
    """A round that did not run to the end, or a point that was not run."""

    status: FailureStatus
    reasons: tuple[str, ...]
    detail: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Yardstick:
    """The device's matmul and copy rates, measured in a worker as the points are."""

    flops: float
    copy_bytes_per_s: float


# What a worker sends back.
Outcome = Measurement | Failure | Yardstick


class SettingsChangedInCall(Exception):
    """The timed call changed process-wide settings: its timings are not comparable with others'."""


# --- a round that ran to the end -------------------------------------------------------------


def round_status(problems: Sequence[str]) -> Literal["ok", "incorrect"]:
    """A measured round: incorrect when any check found a problem."""
    return "incorrect" if problems else "ok"


def point_status(round_statuses: Sequence[str]) -> Literal["ok", "incorrect"]:
    """A point whose every round ran: incorrect when any round was."""
    return "incorrect" if "incorrect" in round_statuses else "ok"


# --- in the worker: what an exception means --------------------------------------------------


def unsupported(reasons: Sequence[str]) -> Failure:
    return Failure("unsupported", tuple(reasons))


def from_exception(error: BaseException, unpickling: bool = False) -> Failure:
    """The failure an exception raised in the worker stands for."""
    if isinstance(error, NotSupported):
        return Failure("unsupported", (one_line(error),))
    detail = "".join(traceback.format_exception(error))
    summary = f"{type(error).__name__}: {_first_line(error)}"
    if unpickling:
        return Failure("error", (f"the implementation could not be rebuilt in the worker process ({summary}); "
                                 "its class and what it holds must be importable there",), detail)
    if isinstance(error, SettingsChangedInCall):
        return Failure("error", (safe_str(error),), detail)
    if is_out_of_memory(error):
        return Failure("oom", (summary,), detail)
    return Failure("error", (summary,), detail)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    # The CPU allocator raises a plain RuntimeError when malloc fails (e.g. under RLIMIT_DATA).
    message = safe_str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in message or "not enough memory" in message
    )


def _first_line(error: BaseException) -> str:
    lines = safe_str(error).strip().splitlines()
    return lines[0] if lines else ""


# --- in the parent: how the worker ended -----------------------------------------------------


def timed_out(timeout_s: float) -> Failure:
    return Failure("timeout", (f"no result within the case timeout of {timeout_s:g} s; worker killed",))


def output_flood(cap_bytes: int) -> Failure:
    return Failure("error", (f"the worker wrote more than {cap_bytes // 2**20} MiB to stdout/stderr;"
                             " stopped (its timings would measure the printing)",))


def unreadable_result(error: Exception) -> Failure:
    return Failure("error", (f"the worker's result could not be read ({type(error).__name__}: {error})",))


def unsendable(message: str, detail: str) -> Failure:
    return Failure("error", (f"the implementation cannot be sent to a worker process ({message}); "
                             "define its class and what prepare() needs at module level",), detail)


def harness_failed(error: Exception) -> Failure:
    """What the worker sent broke the harness's own handling of it (a shape no check foresaw): the
    point ends here, with the traceback, and every other point goes on."""
    return Failure("error", (f"the harness could not use what the worker sent ({type(error).__name__}: "
                             f"{_first_line(error)})",), "".join(traceback.format_exception(error)))


def unexpected_result(outcome: object) -> Failure:
    return Failure("error", (f"the worker sent {type(outcome).__name__}, not a measurement",))


def died(exitcode: int | None) -> Failure:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (not sent by attnbench: most likely the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return Failure("crashed", (f"worker killed by {name}{hint}",))
    return Failure("crashed", (f"worker exited with code {exitcode} before sending a result",))


def over_memory_cap(enforced: str) -> Failure:
    return Failure("oom", (f"the kernel ended the worker when the point's memory passed its cap: {enforced}",))


def with_memory_cap(failure: Failure, enforced: str) -> Failure:
    """An allocation that failed, and the cap it failed under (how this machine held it)."""
    return dataclasses.replace(failure, reasons=(*failure.reasons, f"memory cap: {enforced}"))


NODE_LOST = "the cluster lost "


def node_lost(slot: str, reason: str) -> Failure:
    return Failure("crashed", (f"{NODE_LOST}{slot}, which was measuring it: {reason}",))


def never_measured(status: str, reasons: Sequence[str]) -> bool:
    """A point recorded only because the node measuring it was lost: --resume measures it, and its
    new row takes this one's place."""
    return status == "crashed" and bool(reasons) and reasons[0].startswith(NODE_LOST)


def not_here(implementation: str, plugin: str) -> Failure:
    return Failure("error", (f"implementation {implementation!r} of plugin {plugin!r} is not registered where the "
                             "work ran (install the same plugins there)",))


def no_such_source(name: str) -> Failure:
    return Failure("error", (f"input source {name!r} is not registered where the work ran (install the same "
                             "plugins there)",))


# --- in the scheduler: points that are not run -----------------------------------------------


def no_slot(kind: str) -> Failure:
    return Failure("unsupported", (f"no node of the cluster has a {kind} device",))


def refused(broken_options: str | None, device_unavailable: str | None, skip: str | None) -> Failure | None:
    """Why a point is not run at all, in order of precedence; None when it runs."""
    if broken_options is not None:
        return Failure("error", (broken_options,))
    if device_unavailable:
        return Failure("unsupported", (device_unavailable,))
    if skip:
        return Failure("skipped", (skip,))
    return None
