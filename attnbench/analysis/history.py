"""One implementation's latency across the stored runs of a suite: a table and a plot per group.

A latency moves with the machine (its CPU, the threads) and with the implementation's options as
much as with the code, so each run says which it had, and a history whose runs differ in either
says so: such a change is not a trend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnbench.analysis.curves import metric_value
from attnbench.contract.case import Case, curve_x, group_key
from attnbench.contract.errors import UserError
from attnbench.settings.variants import setting_text
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
    machines: dict[str, str]  # run id -> its CPU and threads
    options: dict[str, str]  # run id -> the options its rows ran with ("" for none)

    def changes(self) -> list[str]:
        """What differs between the runs besides the code, one line each (none: comparable)."""
        lines = []
        for what, by_run in (("machines", self.machines), ("options", self.options)):
            seen = list(dict.fromkeys(by_run[run] for run in self.runs))
            if len(seen) > 1:
                shown = "; ".join(text or "none" for text in seen)
                lines.append(f"these runs differ in {what} ({shown}): a latency moves with them, so a step where "
                             f"they change is not the code's")
        return lines


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
    options: dict[Case, dict[str, set[str]]] = {}
    for run in runs:
        for row in run.rows:
            if row.implementation != implementation:
                continue
            group, key = group_key(row.case), (run.run_id, curve_x(row.case))
            options.setdefault(group, {}).setdefault(run.run_id, set()).add(_options_text(row.options))
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
            machines={run.run_id: machine(run) for run in runs},
            options={run_id: " | ".join(sorted(texts)) for run_id, texts in options[group].items()},
        )
        for group, group_cells in cells.items()
    ]


def machine(run: RunFolder) -> str:
    """e.g. 'AMD EPYC, 2 threads', from the run's environment."""
    environment = run.environment
    cpu = environment.get("cpu_model") or "CPU not recorded"
    threads = environment.get("torch_threads")
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}" if threads else str(cpu)


def _options_text(options: dict) -> str:
    return ", ".join(f"{key}={setting_text(value)}" for key, value in sorted(options.items()))
