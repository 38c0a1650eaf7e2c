"""Progress: a bar on a terminal, one line per finished point in a log."""

from __future__ import annotations

import io

from attnbench.measuring.figures import Latency
from attnbench.presenting.progress import TerminalProgress
from attnbench.storage.results import Flag, Row
from attnbench.testing import small_case


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report(stream: io.StringIO) -> str:
    progress = TerminalProgress(stream)
    progress.started(2)
    for status in ("ok", "skipped"):
        progress.point("naive", small_case())
        progress.finished(Row("run", "naive", small_case(), status))
    return stream.getvalue()


def test_a_log_gets_one_line_per_point():
    lines = _report(io.StringIO()).splitlines()
    assert lines == [
        f"[1/2] naive {small_case().describe()}: ok",
        f"[2/2] naive {small_case().describe()}: skipped",
    ]


def test_a_latency_the_harness_voided_is_never_printed_as_a_figure():
    latency = Latency(samples_s=(3e-6,) * 5, calls_per_sample=(100,), first_call_s=1e-3, timer="t")
    flags = (Flag("implausible_speed", "faster than the device allows"), Flag("under_load", "busy"))
    progress = TerminalProgress(stream := io.StringIO())
    progress.started(1)
    progress.finished(Row("run", "cheat", small_case(), "ok", latency=latency, flags=flags))
    assert stream.getvalue().strip().endswith(": ok latency flagged (implausible_speed)"), stream.getvalue()


def test_a_terminal_gets_a_bar():
    output = _report(_Terminal())
    assert "naive N=128" in output and "2/2" in output and "100%" in output
