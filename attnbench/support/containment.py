"""Plugin code that runs in the harness process, contained like code in a worker.

Importing a plugin, its registration hook, ``invalid_options``, ``not_supported_reasons`` in
``attnbench list`` and pickling an implementation all run in the harness. ``contained`` runs such
a call so that whatever it does (raises anything, ``sys.exit``, raises KeyboardInterrupt, hangs
in Python code) ends as a PluginFault reported against that plugin, and the run goes on.

A real interruption (Ctrl-C, SIGTERM) is told apart from a plugin raising KeyboardInterrupt:
the CLI's handlers raise ``Interrupted``, which is never contained. A hang inside C code that
never returns to Python cannot be interrupted in-process; workers have no such limit.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from attnbench.support.text import bounded_block, one_line, safe_str

T = TypeVar("T")

# Importing a plugin (which may import torch extensions) and the other harness-side calls.
PLUGIN_CALL_TIMEOUT_S = 60.0

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """The user (Ctrl-C) or the system (SIGTERM, SIGHUP) asked attnbench to stop."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name))


class _PluginTimeout(BaseException):
    """Raised in the main thread when a contained call runs out of time."""


@dataclass(frozen=True)
class PluginFault:
    what: str  # the call, e.g. "not_supported_reasons"
    summary: str  # the exception, e.g. "SystemExit(0)"; or "no return within 60 s"
    detail: str = ""  # its traceback
    timed_out: bool = False

    @property
    def message(self) -> str:
        """One line, e.g. 'not_supported_reasons raised SystemExit(0)'."""
        if self.timed_out:
            return f"{self.what} did not return within {self.summary}"
        return f"{self.what} raised {self.summary}"


_handlers_installed = False
_deferring = 0  # open deferred_interrupts blocks (main thread only)
_held_signal: str | None = None  # the first stop asked for while one was open


def install_interrupt_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP raise Interrupted in the main thread (the CLI calls this)."""
    global _handlers_installed

    def raise_interrupted(number: int, _frame: object) -> None:
        global _held_signal
        name = signal.Signals(number).name
        if _deferring:  # cleanup that must finish is running: deferred_interrupts raises it after
            _held_signal = _held_signal or name
            return
        raise Interrupted(name)

    for name in SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), raise_interrupted)
    _handlers_installed = True


def contained(
    call: Callable[[], T], what: str, timeout_s: float = PLUGIN_CALL_TIMEOUT_S,
    passthrough: tuple[type[BaseException], ...] = (),
) -> T | PluginFault:
    """``call()``'s result, or a PluginFault saying how ``what`` failed (``passthrough``: exceptions
    that are not the plugin's fault, e.g. the UserError of an invalid option, raised as they are)."""
    try:
        with _time_limit(timeout_s):
            return call()
    except (Interrupted, *passthrough):
        raise
    except KeyboardInterrupt as error:
        if not _handlers_installed:  # no way to tell it from a real Ctrl-C: treat it as one
            raise
        return _fault(what, error)
    except _PluginTimeout:
        return PluginFault(what, f"{timeout_s:g} s", timed_out=True)
    except BaseException as error:  # noqa: BLE001 (SystemExit, GeneratorExit, anything a plugin raises)
        return _fault(what, error)


def _fault(what: str, error: BaseException) -> PluginFault:
    lines = safe_str(error).strip().splitlines()
    summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if isinstance(error, SystemExit):
        summary = f"SystemExit({safe_str(error.code)})"
    return PluginFault(what, one_line(summary), bounded_block("".join(traceback.format_exception(error))))


class deferred_interrupts:
    """Holds Ctrl-C, SIGTERM and SIGHUP back until the block is done (cleanup that must finish:
    starting or killing a worker, writing a row); they are raised right after.

    Blocking the signals in the main thread is not enough: torch starts threads in the harness,
    the kernel hands a process's signal to any thread that does not block it, and Python then runs
    the handler in the main thread all the same. So the handler itself holds the signal while a
    block is open; the mask covers the default handlers, where install_interrupt_handlers never ran.
    """

    def __enter__(self) -> None:
        global _deferring
        self.active = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
        if self.active:
            wanted = {getattr(signal, name) for name in SIGNALS if hasattr(signal, name)}
            self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
            _deferring += 1

    def __exit__(self, *exc_info: object) -> None:
        global _deferring, _held_signal
        if self.active:
            _deferring -= 1
            signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)
            if not _deferring and _held_signal:
                name, _held_signal = _held_signal, None
                raise Interrupted(name)


class _time_limit:
    """SIGALRM after ``seconds`` raises _PluginTimeout (main thread only; elsewhere no limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")

    def __enter__(self) -> None:
        if not self.active:
            return

        def expire(_number: int, _frame: object) -> None:
            raise _PluginTimeout

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc_info: object) -> None:
        if not self.active:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)
