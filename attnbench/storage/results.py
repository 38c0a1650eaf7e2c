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

from attnbench.contract.case import Case
from attnbench.contract.errors import UserError
from attnbench.support.text import bounded_block, one_line

Status = Literal["ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error"]
STATUSES: tuple[Status, ...] = ("ok", "unsupported", "skipped", "incorrect", "oom", "timeout", "crashed", "error")

# Rows carry the version of their layout. 1: no "schema" field, one latency round.
# 2: latency rounds (round_sizes, calls_per_sample per round).
# 3: flags; latency round_loads and fresh_call_s; correctness seeds, checks and tolerance.
SCHEMA_VERSION = 3

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
    # Per round: the CPUs that other processes kept busy, on average, while it was timed (None:
    # not known on this system), and one call's time on fresh inputs written into the same
    # tensors after the timed calls (a call much slower than the samples suggests caching).
    round_loads: tuple[float | None, ...] = ()
    fresh_call_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.samples_s:
            raise ValueError("a latency with no samples")
        # Six significant digits (0.1 µs at 30 ms, far below any noise) keep committed runs small.
        object.__setattr__(self, "samples_s", tuple(float(f"{sample:.6g}") for sample in self.samples_s))
        if not self.round_sizes:
            object.__setattr__(self, "round_sizes", (len(self.samples_s),))
        if sum(self.round_sizes) != len(self.samples_s) or len(self.calls_per_sample) != len(self.round_sizes):
            raise ValueError(f"round sizes {self.round_sizes} and calls per sample {self.calls_per_sample} "
                             f"do not describe {len(self.samples_s)} samples")
        if 0 in self.round_sizes:
            raise ValueError(f"a latency round with no samples (round sizes {self.round_sizes})")

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
            round_loads=tuple(load for latency in rounds for load in latency.round_loads),
            fresh_call_s=tuple(seconds for latency in rounds for seconds in latency.fresh_call_s),
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

    @property
    def load(self) -> float | None:
        """CPUs other processes kept busy while this was timed, averaged over the rounds."""
        known = [load for load in self.round_loads if load is not None]
        return sum(known) / len(known) if known else None

    @property
    def fresh_call_ratio(self) -> float | None:
        """The fastest call on fresh inputs over the median of the timed calls (about 1 for an
        implementation that computes every call; far above 1 for one that returns a cached output)."""
        return min(self.fresh_call_s) / self.median_s if self.fresh_call_s else None


@dataclass(frozen=True)
class Memory:
    """Peak bytes above the baseline, for the measured call alone."""

    allocator_peak_bytes: int | None  # torch's allocator: profiler events on CPU, peak stats on CUDA
    rss_peak_bytes: int | None  # CPU only: process peak RSS (VmHWM) reset before the call
    source: str

    @property
    def peak_bytes(self) -> int | None:
        """The figure verdicts use: the larger of the two, so that memory a plugin takes outside
        torch's allocator (numpy, a native library) is counted too."""
        known = [value for value in (self.allocator_peak_bytes, self.rss_peak_bytes) if value is not None]
        return max(known) if known else None


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
    """The worst figures over every call checked: the first one, the last timed call of each round
    and a call on fresh inputs in each round."""

    rows_checked: int  # query rows compared (drawn after the first call, from rows_seed)
    exact: Mapping[str, ErrorFigures]  # vs full softmax attention: "out", and "dq", "dk", "dv" in training mode
    # vs the implementation's own float64 reference; its gradients only when every row is checked
    own: Mapping[str, ErrorFigures] | None
    judged_against: Literal["exact", "own"] | None  # None: an approximation, error only reported
    failures: tuple[str, ...] = ()
    rows_seed: int | None = None  # sample_rows(seq_len, rows, rows_seed) gives the rows checked
    key_rows_checked: int = 0  # key positions at which dk, dv were compared (training mode)
    fresh_seed: int | None = None  # make_inputs(case, fresh_seed): the fresh inputs
    calls_checked: int = 1
    tolerance: tuple[float, float] | None = None  # (atol, rtol) it was judged with
    # Exact implementations: every check within the dtype's default tolerance (only such points
    # can be the baseline others are compared with); None for approximations.
    within_default_tolerance: bool | None = None

    @classmethod
    def merge(cls, parts: Sequence[Correctness]) -> Correctness:
        """One record from the checks of several rounds: the worst figures, every failure."""
        first = parts[0]
        return dataclasses.replace(
            first,
            exact=worst_figures([part.exact for part in parts]),
            own=worst_figures([part.own for part in parts if part.own is not None]) if first.own is not None else None,
            failures=tuple(dict.fromkeys(failure for part in parts for failure in part.failures)),
            calls_checked=sum(part.calls_checked for part in parts),
            within_default_tolerance=None if first.within_default_tolerance is None else all(
                part.within_default_tolerance is not False for part in parts),
        )


def worst_figures(tables: Sequence[Mapping[str, ErrorFigures]]) -> dict[str, ErrorFigures]:
    """Per tensor, the check with the largest error against its bound, and the largest relative error."""
    worst: dict[str, ErrorFigures] = {}
    for table in tables:
        for name, figures in table.items():
            held = worst.get(name)
            if held is None:
                worst[name] = figures
                continue
            rel_fro = _nan_max(held.rel_fro, figures.rel_fro)
            chosen = figures if _severity(figures) > _severity(held) else held
            worst[name] = dataclasses.replace(chosen, rel_fro=rel_fro)
    return worst


def _severity(figures: ErrorFigures) -> float:
    if math.isnan(figures.max_abs):
        return math.inf
    return figures.max_abs / figures.bound if figures.bound else figures.max_abs


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


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
# fresh_inputs_slower: a call on fresh inputs was far slower than the timed calls on repeated ones.
# under_load: other processes kept CPUs busy while it was timed.
# loose_tolerance: judged at a tolerance looser than the dtype's default.
# memory_outside_torch: the process grew far beyond what torch's allocator counted.
FLAG_KINDS = ("implausible_speed", "fresh_inputs_slower", "under_load", "loose_tolerance", "memory_outside_torch")
LATENCY_VOIDING_FLAGS = ("implausible_speed", "fresh_inputs_slower")


@dataclass(frozen=True)
class Measurement:
    """What a worker returns when the case ran to the end."""

    status: Literal["ok", "incorrect"]
    reasons: tuple[str, ...]
    correctness: Correctness | None
    latency: Latency | None
    memory: Memory | None
    notes: tuple[str, ...] = ()  # warnings the implementation gave, settings it changed (put back)
    # Round 1 hands its float64 references to the later rounds (attnbench.correctness.Verifier);
    # never written to a row.
    verifier: Any = None


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
    flags: tuple[Flag, ...] = ()  # what the harness found: implausible speed, load, a loose tolerance

    def __post_init__(self) -> None:
        # Text from plugin code: bounded, printable, one line per reason (attnbench.support.text).
        object.__setattr__(self, "reasons", tuple(one_line(reason) for reason in self.reasons))
        object.__setattr__(self, "notes", tuple(one_line(note) for note in self.notes))
        object.__setattr__(self, "detail", bounded_block(self.detail))

    @property
    def latency_voided(self) -> bool:
        return any(flag.voids_latency for flag in self.flags)

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
            flags=tuple(Flag(**flag) for flag in data.get("flags", ())),
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
