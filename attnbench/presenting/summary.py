"""The terminal summary of a run: per group of fixed axes, implementation × seq_len."""

from __future__ import annotations

from collections.abc import Sequence

from attnbench.contract.case import CURVE_LABEL, curve_x, describe_group, group_key
from attnbench.presenting.columns import point_note, speed_order, summary_cells
from attnbench.storage.results import Row

NOTE_CHARS = 120


def summary_table(rows: Sequence[Row]) -> str:
    groups: dict[object, list[Row]] = {}
    for row in rows:
        groups.setdefault(group_key(row.case), []).append(row)
    sections = []
    for group_rows in groups.values():
        case = group_rows[0].case
        heading = describe_group(case)
        ordered = sorted(group_rows, key=speed_order)
        table = [_cells(row) for row in ordered]
        headers = (*LEADING, *summary_cells(ordered[0]), "note")
        sections.append(heading + "\n" + format_table(headers, table))
    return "\n\n".join(sections)


# A status ending in "!" has flags (in the note); a median shown as "flagged" is no result
# (implausible speed, cached outputs). The figures' columns come from attnbench.presenting.columns.
LEADING = ("implementation", CURVE_LABEL, "status")


def _cells(row: Row) -> list[str]:
    note = point_note(row)
    cells = [row.implementation, str(curve_x(row.case)), row.status + ("!" if row.flags else ""),
             *summary_cells(row).values()]
    return [*cells, note if len(note) <= NOTE_CHARS else note[: NOTE_CHARS - 1] + "…"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain columns; text left-aligned, figures right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    numeric = [all(_looks_numeric(row[i]) for row in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if is_numeric else cell.ljust(width)
            for cell, width, is_numeric in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])


def _looks_numeric(cell: str) -> bool:
    return cell == "" or cell[0].isdigit()


def points_by_implementation(rows: Sequence[Row]) -> list[str]:
    """One line per implementation: how many points, in which groups, at which N."""
    by_name: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        by_name.setdefault(row.implementation, {}).setdefault(describe_group(group_key(row.case)), []).append(
            curve_x(row.case))
    lines = []
    for name, groups in sorted(by_name.items()):
        count = sum(len(seq_lens) for seq_lens in groups.values())
        where = "; ".join(f"{group} at {CURVE_LABEL}={','.join(map(str, sorted(set(seq_lens))))}"
                          for group, seq_lens in groups.items())
        lines.append(f"{name}: {count} point{'s' if count != 1 else ''} ({where})")
    return lines
