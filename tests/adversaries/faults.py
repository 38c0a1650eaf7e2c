"""Implementations whose code that runs in the harness process (or on the way to a worker) misbehaves."""

from __future__ import annotations

import sys
import time

import attnbench
from adversaries.cheats import Adversary, exact


class ReasonsExit(Adversary):
    name = "reasons_exit"

    def not_supported_reasons(self, case):
        sys.exit(0)

    def prepare(self, case, options):
        return exact


class ReasonsKeyboardInterrupt(Adversary):
    name = "reasons_interrupt"

    def not_supported_reasons(self, case):
        raise KeyboardInterrupt

    def prepare(self, case, options):
        return exact


class ReasonsHang(Adversary):
    name = "reasons_hang"

    def not_supported_reasons(self, case):
        time.sleep(3600)
        return []

    def prepare(self, case, options):
        return exact


class ReasonsNotStrings(Adversary):
    name = "reasons_not_strings"

    def not_supported_reasons(self, case):
        return [42, None]

    def prepare(self, case, options):
        return exact


class OptionsRaise(Adversary):
    name = "options_raise"

    def invalid_options(self, options):
        raise RuntimeError("invalid_options is broken on purpose")

    def prepare(self, case, options):
        return exact


class GetstateRaises(Adversary):
    name = "getstate_raises"

    def __getstate__(self):
        raise ValueError("cannot be pickled, on purpose")

    def prepare(self, case, options):
        return exact


def _refuse_to_unpickle():
    raise ImportError("this plugin's module is missing in the worker, on purpose")


class CannotBeRebuilt(Adversary):
    """Pickles fine in the harness; unpickling it in the worker fails."""

    name = "cannot_be_rebuilt"

    def __reduce__(self):
        return _refuse_to_unpickle, ()

    def prepare(self, case, options):
        return exact


FAULTS = (ReasonsExit, ReasonsKeyboardInterrupt, ReasonsHang, ReasonsNotStrings, OptionsRaise, GetstateRaises,
          CannotBeRebuilt)


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    for fault in FAULTS:
        registry.add(fault())
