"""What a run produces: one Row per (implementation, case), and the JSONL file that keeps them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attnbench.case import Case
from attnbench.errors import UserError

Status = Literal["ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error"]
STATUSES: tuple[Status, ...] = ("ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error")

# Rows carry the version of their layout. 1: no "schema" field, one latency round.
# 2: latency rounds (round_sizes, calls_per_sample per round).
SCHEMA_VERSION = 2

# IQR / median (or the spread between rounds) above this marks a latency as noisy; the same
# threshold stops adaptive repeats.
NOISY_RELATIVE_IQR = 0.1


@dataclass(frozen=True)
class Latency:
    """Raw timing samples, taken in one or more rounds (each in its own worker process,
    interleaved with the case's other implementations); a sample of round i is the mean of
    ``calls_per_sample[i]`` back-to-back calls."""

    samples_s: tuple[float, ...]  # every round's, in order
    calls_per_sample: tuple[int, ...]  # per round
    first_call_s: float  # the untimed first call of the first round, lazy initialisation included
    timer: str
    round_sizes: tuple[int, ...] = ()  # samples per round; empty: one round

    def __post_init__(self) -> None:
        # Six significant digits (0.1 µs at 30 ms, far below any noise) keep committed runs small.
        object.__setattr__(self, "samples_s", tuple(float(f"{sample:.6g}") for sample in self.samples_s))
        if not self.round_sizes:
            object.__setattr__(self, "round_sizes", (len(self.samples_s),))
        if sum(self.round_sizes) != len(self.samples_s) or len(self.calls_per_sample) != len(self.round_sizes):
            raise ValueError(f"round sizes {self.round_sizes} and calls per sample {self.calls_per_sample} "
                             f"do not describe {len(self.samples_s)} samples")

    @property
    def rounds(self) -> list[tuple[float, ...]]:
        bounds = list(itertools.accumulate(self.round_sizes, initial=0))
        return [self.samples_s[start:end] for start, end in itertools.pairwise(bounds)]

    @property
    def round_medians_s(self) -> list[float]:
        return [statistics.median(samples) for samples in self.rounds]

    @classmethod
    def merge(cls, rounds: Sequence[Latency]) -> Latency:
        """One latency from rounds measured apart; the pooled samples keep their round."""
        return cls(
            samples_s=tuple(sample for latency in rounds for sample in latency.samples_s),
            calls_per_sample=tuple(calls for latency in rounds for calls in latency.calls_per_sample),
            first_call_s=rounds[0].first_call_s,
            timer=rounds[0].timer,
            round_sizes=tuple(size for latency in rounds for size in latency.round_sizes),
        )

    @property
    def median_s(self) -> float:
        """The headline figure: the median of the fastest round.

        Rounds run in separate processes at different moments; what disturbs them here (other
        work on the machine, a slow process start) only ever adds time, so the least disturbed
        round is the best estimate of the implementation's own cost. On a 2-core VM, over two
        runs of the quick suite (3 rounds, 2 threads), it moved flash/naive ratios by at most
        9.8% where the median of all samples moved them by up to 33.5%.
        """
        return min(self.round_medians_s)

    @property
    def pooled_median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def iqr_s(self) -> float:
        """Spread of the fastest round's samples."""
        fastest = min(self.rounds, key=statistics.median)
        if len(fastest) < 2:
            return 0.0
        quartiles = statistics.quantiles(fastest, n=4, method="inclusive")
        return quartiles[2] - quartiles[0]

    @property
    def round_spread(self) -> float:
        """How much slower the slowest round's median was than the fastest's (0.25: 25%)."""
        medians = self.round_medians_s
        return max(medians) / min(medians) - 1

    @property
    def noisy(self) -> bool:
        return self.iqr_s > NOISY_RELATIVE_IQR * self.median_s or self.round_spread > NOISY_RELATIVE_IQR


@dataclass(frozen=True)
class Memory:
    """Peak bytes above the baseline, for the measured call alone."""

    allocator_peak_bytes: int | None  # torch's allocator: profiler events on CPU, peak stats on CUDA
    rss_peak_bytes: int | None  # CPU only: process peak RSS (VmHWM) reset before the call
    source: str

    @property
    def peak_bytes(self) -> int | None:
        return self.allocator_peak_bytes if self.allocator_peak_bytes is not None else self.rss_peak_bytes


@dataclass(frozen=True)
class ErrorFigures:
    """Error of one tensor against a float64 reference, over the checked rows."""

    max_abs: float
    rel_fro: float  # ||actual - ref||_F / ||ref||_F
    bound: float | None  # max_abs must stay within this when judged (from the dtype's tolerance)

    @property
    def passed(self) -> bool:
        return self.bound is None or self.max_abs <= self.bound  # NaN compares False: fails


@dataclass(frozen=True)
class Correctness:
    rows_checked: int  # query rows compared; dk and dv are compared only when all rows are
    exact: Mapping[str, ErrorFigures]  # vs full softmax attention: "out", and "dq", "dk", "dv" in training mode
    # vs the implementation's own float64 reference; its gradients only when every row is checked
    own: Mapping[str, ErrorFigures] | None
    judged_against: Literal["exact", "own"] | None  # None: an approximation, error only reported
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """What a worker returns when the case ran to the end."""

    status: Literal["ok", "incorrect"]
    reasons: tuple[str, ...]
    correctness: Correctness | None
    latency: Latency | None
    memory: Memory | None
    notes: tuple[str, ...] = ()  # warnings the implementation gave while preparing or running


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
    wall_time_s: float = 0.0  # the whole point, worker start to result
    detail: str = ""  # traceback or the worker's last output, for failures
    notes: tuple[str, ...] = ()  # warnings from the implementation, e.g. which path it took

    def to_json(self) -> dict[str, Any]:
        data = {"schema": SCHEMA_VERSION, **dataclasses.asdict(self)}
        data["case"] = self.case.to_json()
        if self.latency is not None:  # derived, for readers of the file; never read back
            latency = self.latency
            data["latency"].update(median_s=latency.median_s, iqr_s=latency.iqr_s, noisy=latency.noisy,
                                   round_medians_s=[float(f"{m:.6g}") for m in latency.round_medians_s])
        return _finite_or_string(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Row:
        latency = data.get("latency")
        memory = data.get("memory")
        correctness = data.get("correctness")
        return cls(
            run_id=data["run_id"],
            implementation=data["implementation"],
            case=Case.from_json(data["case"]),
            status=data["status"],
            reasons=tuple(data.get("reasons", ())),
            options=data.get("options", {}),
            correctness=_correctness_from_json(correctness) if correctness else None,
            latency=_latency_from_json(latency) if latency else None,
            memory=Memory(**memory) if memory else None,
            wall_time_s=data.get("wall_time_s", 0.0),
            detail=data.get("detail", ""),
            notes=tuple(data.get("notes", ())),
        )


class RowWriter:
    """Appends rows to a JSONL file as each finishes, so a killed run keeps every finished row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: Row) -> None:
        self._file.write(json.dumps(row.to_json(), sort_keys=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the next point starts: a kill loses no row

    def close(self) -> None:
        self._file.close()


def read_rows(path: Path) -> list[Row]:
    return read_rows_tolerantly(path).rows


@dataclass(frozen=True)
class StoredRows:
    rows: list[Row]
    complete_bytes: int  # the file's length up to the end of its last complete row
    torn_tail: bool  # a last line cut short (a run killed while writing): ignored


def read_rows_tolerantly(path: Path) -> StoredRows:
    """The rows of a JSONL file. A last line without its newline that does not parse is the
    trace of a kill mid-write and is ignored; any other bad line is an error naming it."""
    data = path.read_bytes()
    rows, offset = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.strip():
            try:
                fields = json.loads(line)
            except ValueError as error:
                if last:  # no newline after it: it was being written when the run died
                    return StoredRows(rows, offset, torn_tail=True)
                raise UserError(f"{path}: line {number} is not a result row (not JSON: {error})") from None
            rows.append(_row_from_line(fields, path, number))
        if not last:
            offset += len(line) + 1
    return StoredRows(rows, offset, torn_tail=False)


def _row_from_line(fields: Any, path: Path, number: int) -> Row:
    version = fields.get("schema", 1) if isinstance(fields, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"{path}: line {number} was written by a newer attnbench (row schema {version}; this "
                        f"version reads schemas 1 to {SCHEMA_VERSION}): upgrade attnbench to read it")
    try:
        return Row.from_json(fields)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise UserError(f"{path}: line {number} is not a result row ({problem})") from None


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
    )


def _correctness_from_json(data: Mapping[str, Any]) -> Correctness:
    def figures(table: Mapping[str, Any] | None) -> dict[str, ErrorFigures] | None:
        if table is None:
            return None
        return {name: ErrorFigures(**{k: _number(v) for k, v in values.items()}) for name, values in table.items()}

    return Correctness(
        rows_checked=data["rows_checked"],
        exact=figures(data["exact"]) or {},
        own=figures(data.get("own")),
        judged_against=data.get("judged_against"),
        failures=tuple(data.get("failures", ())),
    )


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
