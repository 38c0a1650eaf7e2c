"""A stored run: ``results/<suite>/<run-id>/`` with its rows and what the analysis needs besides.

    rows.jsonl            one Row per (implementation, case)
    environment.json      versions, CPU, threads, timing settings, commit, matmul throughput
    implementations.json  each implementation's declared exactness and complexity
    suite.yaml            the suite as it was
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnbench.analysis.curves import Declared
from attnbench.contract.errors import UserError
from attnbench.contract.implementation import Implementation, complexity_exponent
from attnbench.storage import flags
from attnbench.storage.results import Row, read_rows_tolerantly

ROWS_FILE = "rows.jsonl"
ENVIRONMENT_FILE = "environment.json"
IMPLEMENTATIONS_FILE = "implementations.json"
SUITE_COPY = "suite.yaml"


@dataclass(frozen=True)
class RunFolder:
    path: Path  # the folder; for a bare rows file, the folder holding it
    rows: tuple[Row, ...]
    environment: Mapping[str, Any]  # empty when the run kept none
    declared: Mapping[str, Declared]

    @property
    def run_id(self) -> str:
        return self.rows[0].run_id if self.rows else self.path.name

    @property
    def suite_name(self) -> str:
        return self.path.parent.name

    @property
    def matmul_flops(self) -> Mapping[str, float]:
        return self.environment.get("matmul_flops", {})


def declared_of(implementations: Iterable[Implementation]) -> dict[str, Declared]:
    return {
        impl.name: Declared(
            exact=impl.exact,
            time_complexity=impl.time_complexity,
            memory_complexity=impl.memory_complexity,
            time_exponent=complexity_exponent(impl.time_complexity),
            memory_exponent=complexity_exponent(impl.memory_complexity),
        )
        for impl in implementations
    }


def write_declared(run_dir: Path, declared: Mapping[str, Declared]) -> None:
    data = {name: vars(info) for name, info in declared.items()}
    (run_dir / IMPLEMENTATIONS_FILE).write_text(json.dumps(data, indent=2) + "\n")


def load_run(location: Path, fallback: Mapping[str, Declared] | None = None) -> RunFolder:
    """A run folder, or a rows file inside one. ``fallback`` supplies the declared complexity
    of runs stored before it was kept with them (from the registry, for what is installed)."""
    rows_path = location / ROWS_FILE if location.is_dir() else location
    if not rows_path.exists():
        raise UserError(f"{location}: no {ROWS_FILE} here (give a run folder such as results/quick/<run-id>, "
                        f"or its {ROWS_FILE})")
    folder = rows_path.parent
    rows = _read_rows(rows_path)
    environment = _read_json(folder / ENVIRONMENT_FILE) or {}
    stored = _read_json(folder / IMPLEMENTATIONS_FILE)
    declared = {name: Declared(**info) for name, info in stored.items()} if stored else dict(fallback or {})
    # Flagged again with the run's final yardstick: the best matmul rate measured in the whole run.
    exact = {name: info.exact for name, info in declared.items()}
    rows = flags.refresh(rows, exact, environment.get("matmul_flops", {}))
    return RunFolder(folder, tuple(rows), environment, declared)


def _read_rows(path: Path) -> list[Row]:
    stored = read_rows_tolerantly(path)
    if stored.torn_tail:
        print(f"attnbench: warning: {path}: its last line was cut short (a run killed mid-write); ignored",
              file=sys.stderr)
    if not stored.rows:
        raise UserError(f"{path}: no result rows in it")
    return stored.rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
