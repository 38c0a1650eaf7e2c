"""What one round of one point measured: latency samples, peak memory, error figures.

A worker returns a Measurement; the rounds of a point merge into the figures its Row carries.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from attnbench.measuring.gpu_state import GpuSample, throttling

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
    # "cold": each timed call followed a flush of the device's L2 cache; "warm": calls back to
    # back (always on the CPU). Empty: a row written before this was recorded.
    cache: str = ""
    prepare_s: float | None = None  # the untimed prepare() of the first round: set-up, compilation
    # The GPU's state (NVML) just before and just after each round's timed calls; empty: not sampled.
    gpu_samples: tuple[GpuSample, ...] = ()
    # What the harness saw from outside the worker: for each sample, its own clock from asking for
    # the block to the answer, per call (beside samples_s, which the worker stated); per round,
    # the CPU time of the worker and everything it started while its blocks ran (from /proc; None
    # where not known) and the time that took by the harness's clock; per round, its clock around
    # the call on fresh inputs. A worker that states less time than passed, or uses more CPUs than
    # it was given, is caught (attnbench.storage.flags). Empty in rows written before the harness
    # drove the timing.
    observed_s: tuple[float, ...] = ()
    round_cpu_s: tuple[float | None, ...] = ()
    round_wall_s: tuple[float, ...] = ()
    fresh_observed_s: tuple[float, ...] = ()
    threads: int | None = None  # the torch threads the worker was given (CPU time above them is flagged)

    def __post_init__(self) -> None:
        if not self.samples_s:
            raise ValueError("a latency with no samples")
        # Six significant digits (0.1 µs at 30 ms, far below any noise) keep committed runs small.
        object.__setattr__(self, "samples_s", tuple(float(f"{sample:.6g}") for sample in self.samples_s))
        object.__setattr__(self, "observed_s", tuple(float(f"{sample:.6g}") for sample in self.observed_s))
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
            cache=rounds[0].cache,
            prepare_s=rounds[0].prepare_s,
            gpu_samples=tuple(sample for latency in rounds for sample in latency.gpu_samples),
            observed_s=tuple(seconds for latency in rounds for seconds in latency.observed_s),
            round_cpu_s=tuple(seconds for latency in rounds for seconds in latency.round_cpu_s),
            round_wall_s=tuple(seconds for latency in rounds for seconds in latency.round_wall_s),
            fresh_observed_s=tuple(seconds for latency in rounds for seconds in latency.fresh_observed_s),
            threads=rounds[0].threads,
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
    def band_s(self) -> tuple[float, float]:
        """Where the latency lay: from the fastest round's first quartile up to its third quartile
        or the slowest round's median, whichever is higher (the plots' error bars)."""
        fastest = min(self.rounds, key=statistics.median)
        low, high = self.median_s, max(self.round_medians_s)
        if len(fastest) >= 2:
            quartiles = statistics.quantiles(fastest, n=4, method="inclusive")
            low, high = min(low, quartiles[0]), max(high, quartiles[2])
        return low, high

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
    def throttling(self) -> list[str]:
        """What slowed the GPU down while this was timed (power cap, heat); empty: nothing seen."""
        return throttling(self.gpu_samples)

    def derived(self) -> dict[str, Any]:
        """Figures derived from the samples, written to rows.jsonl for its readers; never read back."""
        return {"median_s": self.median_s, "iqr_s": self.iqr_s, "noisy": self.noisy,
                "round_medians_s": [float(f"{m:.6g}") for m in self.round_medians_s]}

    @property
    def observed_rounds(self) -> list[tuple[float, ...]]:
        """The harness's per-call times of each round's samples (empty lists before they were kept)."""
        if len(self.observed_s) != len(self.samples_s):
            return [() for _ in self.round_sizes]
        bounds = list(itertools.accumulate(self.round_sizes, initial=0))
        return [self.observed_s[start:end] for start, end in itertools.pairwise(bounds)]

    @property
    def fresh_call_ratio(self) -> float | None:
        """The fastest call on fresh inputs over the median of the timed calls (about 1 for an
        implementation that computes every call; far above 1 for one that returns a cached output)."""
        return min(self.fresh_call_s) / self.median_s if self.fresh_call_s else None


# Process memory beyond torch's count: more than this many times it, and by more than this many
# bytes, was taken outside torch (numpy, a native library, another process). Training steps of the
# built-ins reach twice the count (autograd's temporaries); a plugin computing in numpy is tens of
# times above it.
MEMORY_GAP_FACTOR = 3
MEMORY_GAP_BYTES = 16 * 2**20


def outside_torch(process_bytes: int, torch_bytes: int) -> bool:
    return process_bytes - torch_bytes > MEMORY_GAP_BYTES and process_bytes > MEMORY_GAP_FACTOR * torch_bytes


@dataclass(frozen=True)
class Memory:
    """What the implementation takes: what it keeps resident between calls, and the peak of one
    call above that."""

    allocator_peak_bytes: int | None  # torch's allocator: profiler events on CPU, peak stats on CUDA
    rss_peak_bytes: int | None  # CPU only: process peak RSS (VmHWM) reset before the call
    source: str
    # Decode: what the step keeps between calls (its cache or state), as torch's allocator counts
    # the tensors prepare_decode left alive; None outside decode.
    state_bytes: int | None = None
    # What the point's processes keep resident between calls (their proportional set size once
    # free memory is handed back, above what they held with the inputs loaded, before prepare;
    # read from /proc by the harness): buffers made in prepare, caches, helper processes. None in
    # rows measured before it was, and where /proc cannot tell.
    kept_bytes: int | None = None

    @property
    def peak_bytes(self) -> int | None:
        """The call's peak, the figure curves and verdicts use: the larger of the two, so that
        memory a plugin takes outside torch's allocator (numpy, a native library, another
        process) is counted too."""
        known = [value for value in (self.allocator_peak_bytes, self.rss_peak_bytes) if value is not None]
        return max(known) if known else None

    @property
    def state_kept_bytes(self) -> int | None:
        """What a decode step keeps between steps, the figure its comparisons use: torch's count,
        or, where the point's processes keep far more than torch counted (a cache in numpy or a
        native library), what /proc saw them keep."""
        if self.state_bytes is None or self.kept_bytes is None:
            return self.state_bytes
        return self.kept_bytes if outside_torch(self.kept_bytes, self.state_bytes) else self.state_bytes

    @property
    def footprint_bytes(self) -> int | None:
        """What it takes in all: what it keeps between calls and the call's peak above it (a buffer
        made in prepare and reused by every call counts here, not in the call's peak)."""
        peak = self.peak_bytes
        return peak + (self.kept_bytes or 0) if peak is not None else None


@dataclass(frozen=True)
class Work:
    """The FLOPs of one timed call: exact attention's as the harness counts it, or what the
    implementation declared (attnbench.contract.work)."""

    flops: float
    formula: str
    declared: bool  # by the implementation (an approximation); False: counted by the harness


@dataclass(frozen=True)
class Traffic:
    """The bytes one decode step must read and write: exact attention's as the harness counts it
    (the whole cache), or what the implementation declared (``step_bytes``)."""

    bytes: float
    formula: str
    declared: bool


@dataclass(frozen=True)
class ErrorFigures:
    """Error of one tensor against a float64 reference, over the checked rows."""

    max_abs: float
    rel_fro: float  # ||actual - ref||_F / ||ref||_F
    bound: float | None  # max_abs must stay within this when judged (from the dtype's tolerance)
    # Cosine similarity of each checked row (a query's output vector) with the reference's: the
    # mean over rows, batch and heads, and the lowest. Direction, blind to scale: what a model's
    # next layer mostly sees. None in rows written before it was measured.
    cosine_mean: float | None = None
    cosine_worst: float | None = None

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
            worst[name] = dataclasses.replace(chosen, rel_fro=rel_fro,
                                              cosine_mean=_nan_min(held.cosine_mean, figures.cosine_mean),
                                              cosine_worst=_nan_min(held.cosine_worst, figures.cosine_worst))
    return worst


def _severity(figures: ErrorFigures) -> float:
    if math.isnan(figures.max_abs):
        return math.inf
    return figures.max_abs / figures.bound if figures.bound else figures.max_abs


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _nan_min(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


@dataclass(frozen=True)
class Measurement:
    """What a worker returns when the case ran to the end."""

    status: Literal["ok", "incorrect"]
    reasons: tuple[str, ...]
    correctness: Correctness | None
    latency: Latency | None
    memory: Memory | None
    notes: tuple[str, ...] = ()  # warnings the implementation gave, settings it changed (put back)
    work: Work | None = None  # the FLOPs of one timed call, where counted or declared
    traffic: Traffic | None = None  # a decode step's bytes, where counted or declared
    # Round 1 hands its float64 references to the later rounds (attnbench.correctness.Verifier);
    # never written to a row.
    verifier: Any = None
