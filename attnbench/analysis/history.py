"""One implementation's latency across the stored runs of a suite: a table and a plot per group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnbench.analysis.curves import metric_value
from attnbench.contract.case import Case, curve_x, group_key
from attnbench.contract.errors import UserError
from attnbench.storage.run_folder import ROWS_FILE, RunFolder, load_run
from attnbench.support.units import format_seconds


@dataclass(frozen=True)
class History:
    implementation: str
    group: Case
    runs: tuple[str, ...]  # run ids, oldest first
    seq_lens: tuple[int, ...]
    cells: dict[tuple[str, int], str]  # (run id, seq_len) -> median latency, or the status
    medians: dict[tuple[str, int], float]


def suite_runs(suite_folder: Path) -> list[RunFolder]:
    """Every run stored under results/<suite>/, oldest first (run ids start with the UTC time)."""
    if not suite_folder.is_dir():
        raise UserError(f"{suite_folder}: no such folder (give results/<suite>, e.g. results/long_seq)")
    folders = sorted(path for path in suite_folder.iterdir() if (path / ROWS_FILE).exists())
    if not folders:
        raise UserError(f"{suite_folder}: no runs in it (a run is a folder with {ROWS_FILE})")
    return [load_run(folder) for folder in folders]


def histories(runs: Sequence[RunFolder], implementation: str) -> list[History]:
    """One History per group of fixed axes the implementation was measured on."""
    cells: dict[Case, dict[tuple[str, int], str]] = {}
    medians: dict[Case, dict[tuple[str, int], float]] = {}
    for run in runs:
        for row in run.rows:
            if row.implementation != implementation:
                continue
            group, key = group_key(row.case), (run.run_id, curve_x(row.case))
            value = metric_value(row, "latency")
            cells.setdefault(group, {})[key] = format_seconds(value) if value is not None else row.status
            if value is not None:
                medians.setdefault(group, {})[key] = value
    if not cells:
        names = sorted({row.implementation for run in runs for row in run.rows})
        raise UserError(f"implementation {implementation!r} is in none of these runs (they have: {', '.join(names)})")
    return [
        History(
            implementation, group,
            runs=tuple(run.run_id for run in runs if any(run_id == run.run_id for run_id, _ in group_cells)),
            seq_lens=tuple(sorted({seq_len for _, seq_len in group_cells})),
            cells=group_cells,
            medians=medians.get(group, {}),
        )
        for group, group_cells in cells.items()
    ]
