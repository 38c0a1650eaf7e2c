"""Progress: a bar on a terminal, one line per finished point in a log."""

from __future__ import annotations

import io

from attnbench.presenting.progress import TerminalProgress
from attnbench.storage.results import Row
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


def test_a_terminal_gets_a_bar():
    output = _report(_Terminal())
    assert "naive N=128" in output and "2/2" in output and "100%" in output
