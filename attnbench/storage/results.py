"""What a run produces: one Row per (implementation, case), and the JSONL file that keeps them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnbench.contract.case import Case
from attnbench.contract.errors import UserError
from attnbench.measuring.figures import Correctness, ErrorFigures, Latency, Memory, Traffic, Work
from attnbench.measuring.flops import matmul_key
from attnbench.measuring.gpu_state import GpuSample
from attnbench.measuring.outcome import Status
from attnbench.storage.ledger import SEAL_FIELD, Entry, Sealer, content_digest
from attnbench.support.text import bounded_block, one_line

# Rows carry the version of their layout. 1: no "schema" field, one latency round.
# 2: latency rounds (round_sizes, calls_per_sample per round).
# 3: flags; latency round_loads and fresh_call_s; correctness seeds, checks and tolerance.
# 4: the figures under "figures", one entry per kind (FIGURE_READERS); before, at the top level.
# 5: "work", the FLOPs of one timed call.
# 6: error figures carry the rows' cosine similarity with the reference (mean, worst).
# 7: the case's q_len and the decode mode; memory's state_bytes; "traffic", a decode step's bytes.
# 8: "where": the host, cluster node and device the point ran on; started_at and ended_at.
# 9: latency's harness observations (observed_s, round_cpu_s, round_wall_s, fresh_observed_s, threads).
# 10: where.memory_cap, the point's memory cap and how it was held there.
SCHEMA_VERSION = 10


DEVICE_NAME_SEPARATOR = " ("


def named_device(device: str, device_name: str) -> str:
    """A device of the sweep with the name of the model that ran it: "cuda (NVIDIA H100)"."""
    return f"{device}{DEVICE_NAME_SEPARATOR}{device_name})"


@dataclass(frozen=True)
class Where:
    """The machine and device a point ran on."""

    host: str
    device_name: str  # the CPU's model, or the GPU's name
    device_uuid: str = ""  # a GPU's UUID
    node: str = ""  # the Ray node's id on a cluster; empty for the machine that started the run
    memory_cap: str = ""  # the point's memory cap and how it was held there; empty in rows before schema 10

    @property
    def slot(self) -> str:
        """The yardstick's owner: empty on the machine that started the run (its yardsticks are the
        run's own), else the node and, for a GPU, which one."""
        if not self.node:
            return ""
        return f"{self.host}/{self.node[:8]}" + (f"/{self.device_uuid}" if self.device_uuid else "")


@dataclass(frozen=True)
class Flag:
    """Something the harness found about a point that the reader must see beside its figures."""

    kind: str  # one of FLAG_KINDS
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", one_line(self.message))

    @property
    def voids_latency(self) -> bool:
        """The point's latency is not a result: it is shown as flagged, never compared."""
        return self.kind in LATENCY_VOIDING_FLAGS


# implausible_speed: faster than the device's measured matmul peak allows.
# implausible_work: an approximation's declared FLOPs would put it beyond that peak (no throughput).
# fresh_inputs_slower: a call on fresh inputs was far slower than the timed calls on repeated ones.
# under_load: other processes kept CPUs busy while it was timed.
# throttled: the GPU slowed itself down (power cap, heat) while it was timed (NVML).
# loose_tolerance: judged at a tolerance looser than the dtype's default.
# memory_outside_torch: the process grew far beyond what torch's allocator counted.
# state_outside_torch: a decode step's processes keep far more between steps than torch counted.
# timing_disagrees: the worker stated less time than the harness's own clock saw pass.
# cpu_over_threads: it used more CPU time than the threads it was given allow.
FLAG_KINDS = ("implausible_speed", "implausible_work", "fresh_inputs_slower", "under_load", "throttled",
              "loose_tolerance", "memory_outside_torch", "state_outside_torch", "timing_disagrees",
              "cpu_over_threads")
LATENCY_VOIDING_FLAGS = ("implausible_speed", "fresh_inputs_slower", "timing_disagrees", "cpu_over_threads")


@dataclass(frozen=True)
class Row:
    run_id: str
    implementation: str
    case: Case
    status: Status
    reasons: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    correctness: Correctness | None = None
    latency: Latency | None = None
    memory: Memory | None = None
    work: Work | None = None
    traffic: Traffic | None = None
    wall_time_s: float = 0.0  # the whole point, worker start to result
    # Unix time on the clock of the machine that ran it: its first round's start, its last one's end
    started_at: float | None = None
    ended_at: float | None = None
    detail: str = ""  # traceback or the worker's last output, for failures
    notes: tuple[str, ...] = ()  # warnings from the implementation, e.g. which path it took
    flags: tuple[Flag, ...] = ()  # what the harness found: implausible speed, load, a loose tolerance
    where: Where | None = None  # None in rows of schema 7 and before

    def __post_init__(self) -> None:
        # Text from plugin code: bounded, printable, one line per reason (attnbench.support.text).
        object.__setattr__(self, "reasons", tuple(one_line(reason) for reason in self.reasons))
        object.__setattr__(self, "notes", tuple(one_line(note) for note in self.notes))
        object.__setattr__(self, "detail", bounded_block(self.detail))

    @property
    def latency_voided(self) -> bool:
        return any(flag.voids_latency for flag in self.flags)

    @property
    def throughput_voided(self) -> bool:
        """The FLOPs it declared are not believable (implausible_work): no throughput is shown."""
        return any(flag.kind == "implausible_work" for flag in self.flags)

    @property
    def figures(self) -> dict[str, Any]:
        """Every kind of figures the row can carry (FIGURE_READERS), by name; None where not measured."""
        return {name: getattr(self, name) for name in FIGURE_READERS}

    def yardstick_key(self, dtype_name: str) -> str:
        """The key of the yardstick, in ``dtype_name``, of the device that ran this row."""
        device = self.case.device.partition(DEVICE_NAME_SEPARATOR)[0]  # as the sweep named it
        return matmul_key(device, dtype_name, self.where.slot if self.where else "")

    def to_json(self) -> dict[str, Any]:
        data = {"schema": SCHEMA_VERSION,
                **{name: value for name, value in dataclasses.asdict(self).items() if name not in FIGURE_READERS}}
        data["case"] = self.case.to_json()
        data["figures"] = {name: {**dataclasses.asdict(figures), **getattr(figures, "derived", dict)()}
                           for name, figures in self.figures.items() if figures is not None}
        return _finite_or_string(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Row:
        stored = data.get("figures", data)  # schemas 1 to 3 kept them at the top level
        figures = {name: read(stored[name]) if stored.get(name) else None for name, read in FIGURE_READERS.items()}
        return cls(
            run_id=data["run_id"],
            implementation=data["implementation"],
            case=Case.from_json(data["case"]),
            status=data["status"],
            reasons=tuple(data.get("reasons", ())),
            options=data.get("options", {}),
            wall_time_s=data.get("wall_time_s", 0.0),
            started_at=data.get("started_at"),
            ended_at=data.get("ended_at"),
            detail=data.get("detail", ""),
            notes=tuple(data.get("notes", ())),
            flags=tuple(Flag(**flag) for flag in data.get("flags", ())),
            where=Where(**data["where"]) if data.get("where") else None,
            **figures,
        )


class RowWriter:
    """Appends rows to a JSONL file as each finishes, so a killed run keeps every finished row;
    with a ``sealer`` (attnbench.storage.ledger), each line carries its seal, written with it."""

    def __init__(self, path: Path, sealer: Sealer | None = None) -> None:
        self.path = path
        self._sealer = sealer
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: Row) -> None:
        data = row.to_json()
        line = self._sealer.sealed_line(data) if self._sealer is not None else json.dumps(data)
        self._file.write(line + "\n")  # one write: a kill mid-write leaves a torn last line, no seal apart
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the next point starts: a kill loses no row
        if self._sealer is not None:
            self._sealer.written()

    def close(self) -> None:
        self._file.close()


def read_rows(path: Path) -> list[Row]:
    return read_rows_tolerantly(path).rows


@dataclass(frozen=True)
class StoredRows:
    rows: list[Row]
    complete_bytes: int  # the file's length up to the end of its last complete row
    torn_tail: bool  # a last line cut short (a run killed while writing): ignored
    entries: list[Entry] = field(default_factory=list)  # each row's line and seal, for the ledger's check


def read_rows_tolerantly(path: Path) -> StoredRows:
    """The rows of a JSONL file. A last line without its newline that does not parse is the
    trace of a kill mid-write and is ignored; any other bad line is an error naming it."""
    data = path.read_bytes()
    rows, entries, offset = [], [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.strip():
            try:
                fields = json.loads(line)
            except ValueError as error:
                if last:  # no newline after it: it was being written when the run died
                    return StoredRows(rows, offset, torn_tail=True, entries=entries)
                raise UserError(f"{path}: line {number} is not a result row (not JSON: {error})") from None
            rows.append(_row_from_line(fields, path, number))
            seal = fields.get(SEAL_FIELD)
            entries.append(Entry(number, seal, content_digest(fields) if seal is not None else None))
        if not last:
            offset += len(line) + 1
    return StoredRows(rows, offset, torn_tail=False, entries=entries)


def _row_from_line(fields: Any, path: Path, number: int) -> Row:
    version = fields.get("schema", 1) if isinstance(fields, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"{path}: line {number} was written by a newer attnbench (row schema {version}; this "
                        f"version reads schemas 1 to {SCHEMA_VERSION}): upgrade attnbench to read it")
    try:
        return Row.from_json(fields)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        problem = one_line(f"{type(error).__name__}: {error}", 300)
        raise UserError(f"{path}: line {number}{_which_point(fields)} is not a result row ({problem})") from None


def _which_point(fields: Any) -> str:
    """' (naive B=1 H=8 N=512 ...)' when the line says which point it is, else ''."""
    try:
        return f" ({one_line(fields['implementation'], 40)} {Case.from_json(fields['case']).describe()})"
    except Exception:  # noqa: BLE001 (a line too broken to name)
        return ""


def write_rows(path: Path, rows: Iterable[Row]) -> None:
    writer = RowWriter(path)
    try:
        for row in rows:
            writer.write(row)
    finally:
        writer.close()


def _latency_from_json(data: Mapping[str, Any]) -> Latency:
    calls = data["calls_per_sample"]
    return Latency(
        samples_s=tuple(data["samples_s"]),
        calls_per_sample=tuple(calls) if isinstance(calls, list) else (calls,),  # schema 1: one round, an int
        first_call_s=data["first_call_s"],
        timer=data["timer"],
        round_sizes=tuple(data.get("round_sizes", ())),
        round_loads=tuple(data.get("round_loads", ())),
        fresh_call_s=tuple(data.get("fresh_call_s", ())),
        cache=data.get("cache", ""),
        prepare_s=data.get("prepare_s"),
        gpu_samples=tuple(GpuSample(**{**sample, "slowdown_reasons": tuple(sample.get("slowdown_reasons", ()))})
                          for sample in data.get("gpu_samples", ())),
        observed_s=tuple(data.get("observed_s", ())),
        round_cpu_s=tuple(data.get("round_cpu_s", ())),
        round_wall_s=tuple(data.get("round_wall_s", ())),
        fresh_observed_s=tuple(data.get("fresh_observed_s", ())),
        threads=data.get("threads"),
    )


def _correctness_from_json(data: Mapping[str, Any]) -> Correctness:
    def figures(table: Mapping[str, Any] | None) -> dict[str, ErrorFigures] | None:
        if table is None:
            return None
        return {name: ErrorFigures(**{k: _number(v) for k, v in values.items()}) for name, values in table.items()}

    tolerance = data.get("tolerance")
    return Correctness(
        rows_checked=data["rows_checked"],
        exact=figures(data["exact"]) or {},
        own=figures(data.get("own")),
        judged_against=data.get("judged_against"),
        failures=tuple(data.get("failures", ())),
        rows_seed=data.get("rows_seed"),
        key_rows_checked=data.get("key_rows_checked", 0),
        fresh_seed=data.get("fresh_seed"),
        calls_checked=data.get("calls_checked", 1),
        tolerance=tuple(tolerance) if tolerance else None,
        within_default_tolerance=data.get("within_default_tolerance"),
    )


# The kinds of figures a row carries: each is a Row field of that name, stored under "figures" in
# rows.jsonl and read back by its reader. A new measurement adds its field to Row and a reader here
# (and its columns in attnbench.presenting.columns).
FIGURE_READERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "correctness": _correctness_from_json,
    "latency": _latency_from_json,
    "memory": lambda data: Memory(**data),
    "work": lambda data: Work(**data),
    "traffic": lambda data: Traffic(**data),
}


def _finite_or_string(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as strings (an incorrect output can produce them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_or_string(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_string(item) for item in value]
    return value


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value
