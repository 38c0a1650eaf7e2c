"""What a report is made of, before it is written as Markdown, HTML or text: tables and sections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    title: str
    stem: str  # file name without extension, inside the plots folder
    caption: str


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    tables: tuple[Table, ...]
    plots: tuple[Plot, ...] = ()
