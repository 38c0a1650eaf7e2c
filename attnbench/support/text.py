"""Text that came from plugin code, made safe to store and to show.

A plugin's reasons, warnings and exception messages end up in rows.jsonl, on the terminal and
in the reports. They can be megabytes long, hold line breaks, table separators, HTML or
terminal escape sequences. Rows keep them bounded and printable; each presentation escapes
what is special to it (HTML in report.html, Markdown in report.md).
"""

from __future__ import annotations

import unicodedata
from typing import Any

REASON_CHARS = 2000  # a reason or note: one line
DETAIL_CHARS = 20_000  # a traceback or the worker's last output: the end is what matters


def safe_str(value: Any) -> str:
    """str(value), even when the object's own __str__ raises or returns something else."""
    try:
        text = str(value)
    except BaseException as error:  # noqa: BLE001 (a plugin's __str__ may do anything)
        return f"<{type(value).__name__} whose str() raised {type(error).__name__}>"
    return text if isinstance(text, str) else f"<{type(value).__name__}>"


def one_line(value: Any, limit: int = REASON_CHARS) -> str:
    """One printable line: line breaks become ' / ', other control characters visible escapes."""
    text = " / ".join(part.strip() for part in safe_str(value).splitlines() if part.strip())
    return _cut_end(_escape_controls(text, keep=""), limit)


def bounded_block(value: Any, limit: int = DETAIL_CHARS) -> str:
    """Several printable lines (tabs and line breaks kept), the last ``limit`` characters of them."""
    text = _escape_controls(safe_str(value).replace("\r\n", "\n"), keep="\n\t")
    if len(text) <= limit:
        return text
    marker = f"[… {len(text)} characters, the first ones cut …]\n"
    return marker + text[len(text) - (limit - len(marker)):]  # at most ``limit`` in all: cutting again changes nothing


def markdown_cell(text: str) -> str:
    """Text for a Markdown table cell: no HTML, no emphasis or links, no column breaks."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for special in "\\`*[]|":
        text = text.replace(special, "\\" + special)
    return " ".join(text.split())


def _escape_controls(text: str, keep: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        char if char in keep or not unicodedata.category(char).startswith("C") or char == " "
        else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _cut_end(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"
