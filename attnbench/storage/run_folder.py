"""The run folder, and the one module that knows its layout: creating it, locking it, writing
and reading its files, resuming it.

``results/<suite>/<run-id>/``:

    rows.jsonl            one Row per (implementation, case)
    environment.json      versions, CPU, threads, timing settings, commit, matmul throughput
    implementations.json  each implementation's declared exactness and complexity
    suite.yaml            the suite as it was
    ledger.json           the ledger's id and head: how many rows the harness wrote (attnbench.storage.ledger)

Every reader goes through ``load_run``, which checks the ledger's seals and leaves out each row
changed or added after the run, naming it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from attnbench.contract.case import Case
from attnbench.contract.errors import UserError
from attnbench.contract.implementation import Implementation, complexity_exponent, complexity_of_shape
from attnbench.measuring import outcome
from attnbench.settings.suite import Suite
from attnbench.storage import flags, ledger
from attnbench.storage.environment import Environment, capture_environment, code_version
from attnbench.storage.ledger import LedgerCheck
from attnbench.storage.results import Row, RowWriter, StoredRows, named_device, read_rows_tolerantly
from attnbench.support.units import format_bytes

ROWS_FILE = "rows.jsonl"
ENVIRONMENT_FILE = "environment.json"
IMPLEMENTATIONS_FILE = "implementations.json"
SUITE_COPY = "suite.yaml"
# The least a run folder needs: rows, reports and plots of a large run take a few MiB.
MIN_FREE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Declared:
    """What an implementation says of itself, kept with each run (``implementations.json``)."""

    exact: bool
    time_complexity: str  # of a square pass (q_len = seq_len)
    memory_complexity: str
    time_exponent: float
    memory_exponent: float
    decode_time_complexity: str | None = None  # of one decode step, in the cache's length
    decode_memory_complexity: str | None = None  # of what a step keeps between steps

    def complexity(self, metric: str, case: Case) -> tuple[str | None, float | None]:
        """The declared complexity of a curve of ``case``'s shape for ``metric``: text and exponent."""
        return complexity_of_shape(self, metric, case)


@dataclass(frozen=True)
class RunFolder:
    path: Path  # the folder; for a bare rows file, the folder holding it
    rows: tuple[Row, ...]
    environment: Mapping[str, Any]  # empty when the run kept none
    declared: Mapping[str, Declared]
    ledger: LedgerCheck = LedgerCheck()  # what the check of its seals found; rows edited after the run are not in rows

    @property
    def run_id(self) -> str:
        return self.rows[0].run_id if self.rows else self.path.name

    @property
    def suite_name(self) -> str:
        return self.path.parent.name

    @property
    def matmul_flops(self) -> Mapping[str, float]:
        return self.environment.get("matmul_flops", {})

    @property
    def copy_bytes_per_s(self) -> Mapping[str, float]:
        return self.environment.get("copy_bytes_per_s", {})


def declared_of(implementations: Mapping[str, Implementation]) -> dict[str, Declared]:
    """``implementations``: series name (an implementation or a variant) -> what it runs."""
    return {
        name: Declared(
            exact=impl.exact,
            time_complexity=impl.time_complexity,
            memory_complexity=impl.memory_complexity,
            time_exponent=complexity_exponent(impl.time_complexity),
            memory_exponent=complexity_exponent(impl.memory_complexity),
            decode_time_complexity=impl.decode_time_complexity if impl.supports_decode else None,
            decode_memory_complexity=impl.decode_memory_complexity if impl.supports_decode else None,
        )
        for name, impl in implementations.items()
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
    stored = read_rows_tolerantly(rows_path)
    if stored.torn_tail:
        print(f"attnbench: warning: {rows_path}: its last line was cut short (a run killed mid-write); ignored",
              file=sys.stderr)
    check = _checked(folder, stored)
    for warning in check.warnings(rows_path):
        print(f"attnbench: warning: {warning}", file=sys.stderr)
    excluded = check.excluded_lines
    rows = _measured_since(row for row, entry in zip(stored.rows, stored.entries) if entry.line not in excluded)
    if not rows:
        edited = ": every row was edited after the run" if excluded else ""
        raise UserError(f"{rows_path}: no result rows in it{edited}")
    environment = _read_json(folder / ENVIRONMENT_FILE) or {}
    kept = _read_json(folder / IMPLEMENTATIONS_FILE)
    declared = {name: Declared(**info) for name, info in kept.items()} if kept else dict(fallback or {})
    # Flagged again with the run's final yardstick: the best matmul rate measured in the whole run.
    exact = {name: info.exact for name, info in declared.items()}
    rows = flags.refresh(rows, exact, environment.get("matmul_flops", {}))
    return RunFolder(folder, tuple(by_device_name(rows)), environment, declared, check)


def _measured_since(rows: Iterable[Row]) -> list[Row]:
    """The rows, less those of points lost with their cluster node that --resume measured later."""
    rows = list(rows)
    later = {(row.implementation, row.case): position for position, row in enumerate(rows)}
    return [row for position, row in enumerate(rows) if not (
        outcome.never_measured(row.status, row.reasons) and later[(row.implementation, row.case)] > position)]


def verify_ledger(run_dir: Path) -> LedgerCheck:
    """The run's rows against what the harness recorded when it wrote them (attnbench.storage.ledger)."""
    return _checked(run_dir, read_rows_tolerantly(run_dir / ROWS_FILE))


def _checked(run_dir: Path, stored: StoredRows) -> LedgerCheck:
    def name(position: int) -> str:
        row = stored.rows[position]
        return f"{row.implementation}, {row.case.describe()}"

    return ledger.check_ledger(run_dir, stored.entries, name)


def by_device_name(rows: Sequence[Row]) -> list[Row]:
    """Where one device of the sweep ran on devices of more than one name (a cluster of mixed
    GPUs), each of its rows' device names its model, e.g. "cuda (NVIDIA H100)": curves, answers
    and tables then never join one model's points with another's."""
    names: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.where is not None:
            names[row.case.device].add(row.where.device_name)
    mixed = {device for device, found in names.items() if len(found) > 1}
    return [dataclasses.replace(row, case=dataclasses.replace(row.case, device=named_device(row.case.device,
                                                                                            row.where.device_name)))
            if row.where is not None and row.case.device in mixed else row for row in rows]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None


# --- creating, locking and resuming a run ----------------------------------------------------


def resume_run(run_dir: Path, suite: Suite, warn: Callable[[str], None]) -> tuple[Environment, list[Row], IO[str]]:
    """The run's environment, its finished rows and its lock, after checking that the suite and
    the code are the ones it started with and that its ledger was not edited (its key here, for
    the rows to come); a torn last line (a kill mid-write) is cut off."""
    if not (run_dir / ROWS_FILE).exists() or not (run_dir / SUITE_COPY).exists():
        raise UserError(f"--resume {run_dir}: not a run folder (no {ROWS_FILE} or {SUITE_COPY})")
    lock = lock_run_folder(run_dir, f"--resume {run_dir}")  # before its rows are read
    try:
        environment, rows = _checked_for_resume(run_dir, suite, warn)
    except BaseException:
        lock.close()
        raise
    return environment, rows, lock


def _checked_for_resume(run_dir: Path, suite: Suite, warn: Callable[[str], None]) -> tuple[Environment, list[Row]]:
    rows_path = run_dir / ROWS_FILE
    if (run_dir / SUITE_COPY).read_text() != suite.path.read_text():
        raise UserError(f"--resume {run_dir}: {suite.path} has changed since this run started (its copy is "
                        f"{run_dir / SUITE_COPY}); start a new run instead of mixing two suites")
    stored = read_rows_tolerantly(rows_path)  # refuses unreadable rows before anything is measured
    check = _checked(run_dir, stored)  # and rows edited since
    if check.edited:
        raise UserError(f"--resume {run_dir}: its {ROWS_FILE} was edited after the run ("
                        f"{'; '.join([*check.problems, *(finding.short for finding in check.findings)])}); "
                        "start a new run")
    if check.state == ledger.SEALED and not check.key_present:
        raise UserError(f"--resume {run_dir}: its ledger key is not on this machine (in {ledger.ledger_key_store()}); "
                        "only the machine that started a run can add rows to it: start a new run")
    try:
        environment = Environment.from_json(json.loads((run_dir / ENVIRONMENT_FILE).read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"--resume {run_dir}: {ENVIRONMENT_FILE} cannot be read ({type(error).__name__}: {error}); "
                        "start a new run") from None
    now = capture_environment()
    then = environment.git_commit
    if then != now.git_commit:
        raise UserError(f"--resume {run_dir}: the code has changed since this run started (commit {then} then, "
                        f"{now.git_commit} now); start a new run instead of mixing two versions")
    if environment.git_dirty or now.git_dirty:
        warn(f"--resume {run_dir}: uncommitted changes (then or now): whether the code changed cannot be told")
    busy = now.busy_warning()
    if busy:
        warn(busy)
    if stored.torn_tail:
        with rows_path.open("r+b") as file:
            file.truncate(stored.complete_bytes)
    if check.state == ledger.SEALED:
        ledger.record_head(run_dir, check)  # the rows found: the next row's seal follows the last
    return environment, stored.rows


def lock_run_folder(run_dir: Path, label: str) -> IO[str]:
    """An exclusive lock on the run's rows file, held while this process measures into it: two
    processes must never append the same points."""
    try:
        handle = (run_dir / ROWS_FILE).open("a")
    except OSError as error:
        raise UserError(f"{label}: cannot open {ROWS_FILE} there ({error.strerror or error})") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{label}: another attnbench is measuring this run now (its {ROWS_FILE} is locked); "
                        "wait for it to finish or stop it first") from None
    return handle


def new_run_folder(output: Path | None, suite: Suite) -> tuple[Path, IO[str]]:
    """results/<suite>/<UTC time>-<short commit>/, created and locked; a bad output location is a
    one-line error before anything is measured."""
    base = output if output is not None else suite.output
    label = f"--output {base}" if output is not None else f"{suite.path}: output {base}"
    if base.exists() and not base.is_dir():
        raise UserError(f"{label}: is a file, not a folder")
    commit, _ = code_version()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{stamp}-{commit[:7]}" if commit else stamp
    candidate = base / suite.name / run_id
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base / suite.name / f"{run_id}-{suffix}"
    try:
        candidate.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"{label}: cannot create the run folder there ({error.strerror or error})") from None
    free = shutil.disk_usage(candidate).free
    if free < MIN_FREE_BYTES:
        _remove_empty(candidate)
        raise UserError(f"{label}: the disk is full ({format_bytes(free)} free; a run needs at least "
                        f"{format_bytes(MIN_FREE_BYTES)})")
    return candidate, lock_run_folder(candidate, label)


def write_run_files(run_dir: Path, environment: Environment, implementations: Mapping[str, Implementation],
                     suite: Suite) -> None:
    try:
        write_environment(run_dir, environment)
        write_declared(run_dir, declared_of(implementations))
        shutil.copyfile(suite.path, run_dir / SUITE_COPY)
        ledger.start_ledger(run_dir)
    except OSError as error:
        raise UserError(f"{run_dir}: cannot write the run's files ({error.strerror or error})") from None


def write_environment(run_dir: Path, environment: Environment) -> None:
    (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment.to_json(), indent=2) + "\n")


def _remove_empty(folder: Path) -> None:
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


def row_writer(run_dir: Path) -> RowWriter:
    """The run's writer, sealing each row it appends (a run from before seals: as it was)."""
    return RowWriter(run_dir / ROWS_FILE, ledger.open_sealer(run_dir))
