"""Progress of a sweep on stderr: a bar on a terminal, one line per point in a log."""

from __future__ import annotations

import sys
from typing import Any, TextIO

try:
    from tqdm import tqdm
except ImportError:  # machines with only torch's scientific stack (benchmarks/gpu_check.sh): lines, no bar
    tqdm = None

from attnbench.contract.case import CURVE_LABEL, Case, curve_x
from attnbench.storage.results import Row
from attnbench.support.units import format_seconds


class TerminalProgress:
    def __init__(self, stream: TextIO | None = None) -> None:
        # Looked up when the bar is made, not when this module was imported: sys.stderr may
        # have been replaced since (pytest's capture, a redirecting caller).
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() and tqdm is not None
        self.bar: Any = None  # a tqdm bar on a terminal
        self.done = 0
        self.total = 0

    def started(self, total: int) -> None:
        self.total = total
        if self.interactive:
            self.bar = tqdm(total=total, file=self.stream, unit="point", dynamic_ncols=True)

    def point(self, implementation: str, case: Case) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{implementation} {CURVE_LABEL}={curve_x(case)}")

    def close(self) -> None:
        """End the bar (a sweep stopped early leaves it short of its total)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finished(self, row: Row) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.done == self.total:
                self.bar.close()
            return
        latency = f" {format_seconds(row.latency.median_s)}" if row.latency else ""
        if row.latency and row.latency_voided:  # as the table: a voided latency is no figure to quote
            latency = f" latency flagged ({', '.join(flag.kind for flag in row.flags if flag.voids_latency)})"
        print(f"[{self.done}/{self.total}] {row.implementation} {row.case.describe()}: {row.status}{latency}",
              file=self.stream, flush=True)
