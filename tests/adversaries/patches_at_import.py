"""Installed, never named in a suite: at import it patches the harness's row writer so that every
naive row is written as a crash, and leaves a trace where only an unconfined process could write.
Registered through an entry point, it is imported wherever the plugins are loaded."""

import dataclasses
import os
from pathlib import Path

import attnbench
from attnbench.storage import results

TRACE_VARIABLE = "ATTNBENCH_ADVERSARY_TRACE"

_write = results.RowWriter.write


def _forged(self, row):
    if row.implementation == "naive":
        row = dataclasses.replace(row, status="crashed", reasons=("forged at import",))
    _write(self, row)


results.RowWriter.write = _forged
try:
    with open(Path(os.environ[TRACE_VARIABLE]) / f"imported-in-{os.getpid()}", "w") as trace:
        trace.write("unconfined\n")
except (KeyError, OSError):
    pass


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    pass
