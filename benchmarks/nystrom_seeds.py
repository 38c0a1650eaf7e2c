"""Nyström against its own declared tolerance, seed by seed, judged as the harness judges a point.

    .venv/bin/python benchmarks/nystrom_seeds.py [--seeds 200] [--only TEXT] [--skip TEXT] [--threads 1]
                                                 [--cache DIR]

A built-in must pass its own declaration on every honest input (issue 32). For each input source
(gaussian, structured, minilm, smollm2), shape (the plugin kit's and N = 512 to 4096 at a
typical head shape) and option set (the defaults, and the most pseudo-inverse iterations nystrom
takes for the mode, its inverse nearest convergence),
the input set of each seed 0..S-1 is drawn as a sweep draws a point's (``draw_set``), nystrom is
called on it as the worker calls it (``attention_call``: forward, or forward and backward), and
the result is judged by the harness's own code: the case's rows and exact references
(``case_references``), nystrom's own float64 reference (``own_references``) and the ``Verifier``
at its declared tolerance (``verifier_for``). The harness draws the rows it checks at random
(every row up to 256); here they are drawn from the seed, so that a failure can be replayed.

Prints, per row, the seeds tried, the failures (and their seeds), the worst error as a fraction
of the tolerance's bound and the time taken; a source that cannot give a shape is listed with
its reason (or nystrom's, for options it refuses). The model sources capture q, k, v on first use
into their cache (a minute or two).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from attnbench_plugins.nystrom import MOST_ITERATIONS

from attnbench.contract.case import Case
from attnbench.contract.errors import NotSupported
from attnbench.contract.implementation import Implementation, effective_options, plugin_reasons
from attnbench.contract.inputs import InputSource, source_reasons
from attnbench.contract.registry import Registry, load_registry
from attnbench.measuring.call_server import attention_call, split
from attnbench.measuring.correctness import PRIMARY, case_references, own_references, verifier_for
from attnbench.measuring.figures import Correctness
from attnbench.measuring.in_process import declarations_of
from attnbench.measuring.inputs import draw_set, every_position, on_device
from attnbench.presenting.summary import format_table
from attnbench.settings.suite import CorrectnessSettings
from attnbench.testing import small_case, small_cases

LONG_LENGTHS = (512, 1024, 2048, 4096)
# The defaults, and the most iterations nystrom takes for the case's mode (where float32 failed).
OPTION_SETS: Mapping[str, Callable[[Case], dict[str, Any]]] = {
    "defaults": lambda case: {},
    "most iterations": lambda case: {"pinv_iterations": MOST_ITERATIONS[case.backward]},
}
# The model sources' windows of text: as many as seeds, so that seeds mostly draw different text
# (the default, 4, gives a fresh seed other values from only a few windows).
MODEL_TEXTS = 200


@dataclass(frozen=True)
class SourcePlan:
    """An input source as this sweep asks for it: its parameters and its long-sequence head shape."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64


# minilm: the first four of its 12 heads (D=32, the kit's head shape), one batch entry per default
# layer (early, middle, late); smollm2 at its own shape (it is causal, which nystrom is not).
PLANS = (
    SourcePlan("gaussian"),
    SourcePlan("structured"),
    SourcePlan("minilm", {"heads": [0, 1, 2, 3], "texts": MODEL_TEXTS}, batch=3, head_dim=32),
    SourcePlan("smollm2", {"texts": MODEL_TEXTS}, batch=3, heads=9, kv_heads=3),
)


@dataclass(frozen=True)
class Point:
    plan: SourcePlan
    case: Case
    options: Mapping[str, Any]  # given: the rest are nystrom's defaults

    @property
    def shape(self) -> str:
        return dataclasses.replace(self.case, inputs="gaussian").describe()

    @property
    def options_text(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.options.items()) or "defaults"

    @property
    def label(self) -> str:
        return f"{self.plan.name} {self.shape} {self.options_text}"


@dataclass
class Tally:
    seeds: int = 0
    failed: list[int] = field(default_factory=list)
    worst: float = 0.0  # the largest max |error| / bound over every tensor and seed
    seconds: float = 0.0


def kit_shapes() -> list[Case]:
    """The plugin kit's cases that nystrom takes (its inputs aside: every source gets each shape)."""
    shapes = {dataclasses.replace(case, inputs="gaussian") for case in small_cases()
              if not (case.causal or case.chunked or case.decode)}
    return sorted(shapes, key=lambda case: (case.mode, -case.kv_heads))


def long_shapes(plan: SourcePlan) -> list[Case]:
    return [small_case(batch=plan.batch, heads=plan.heads, kv_heads=plan.kv_heads, head_dim=plan.head_dim,
                       seq_len=length) for length in LONG_LENGTHS]


def points() -> list[Point]:
    return [Point(plan, dataclasses.replace(shape, inputs=plan.name), given(shape))
            for given in OPTION_SETS.values() for plan in PLANS for shape in [*kit_shapes(), *long_shapes(plan)]]


def unavailable(implementation: Implementation, point: Point, source: InputSource | None) -> str:
    """Why this point cannot be drawn or run ("" when it can): the source's reasons, the plugin's,
    or its refusal of the options in prepare."""
    if source is None:
        return f"{point.plan.name} is not registered"
    reasons = [*source_reasons(source, every_position(point.case)), *plugin_reasons(implementation, point.case)]
    if not reasons:
        try:
            implementation.prepare(point.case, effective_options(implementation, point.options))
        except NotSupported as refusal:
            reasons.append(str(refusal))
    return "; ".join(reasons)


def judged(implementation: Implementation, case: Case, options: Mapping[str, Any], source: InputSource,
           seed: int) -> Correctness:
    """The input set of ``seed``, called and judged as a sweep's point judges its primary set."""
    inputs = draw_set(case, seed, source, None)
    with mock.patch("secrets.randbits", random.Random(seed).getrandbits):  # the rows checked, replayable
        references = case_references(case, CorrectnessSettings(), {PRIMARY: seed}, lambda _: inputs)
    own = own_references(implementation, case, options, {PRIMARY: inputs}, references.rows)
    declared = declarations_of(implementation, case, options).tolerance
    verifier, _ = verifier_for(references, own, implementation.exact, declared, case.dtype)
    call = attention_call(implementation.prepare(case, options), on_device(inputs, case), case.backward)
    out, grads = split(call(), case)
    return verifier.check(out, grads, PRIMARY, f"seed {seed}")


def worst_fraction(correctness: Correctness) -> float:
    """The largest max |error| / bound of the judged tensors (above 1: a failure)."""
    judged_figures = correctness.own if correctness.judged_against == "own" else correctness.exact
    return max(figures.max_abs / figures.bound for figures in judged_figures.values())


def tally(implementation: Implementation, point: Point, source: InputSource, seeds: int) -> Tally:
    options = effective_options(implementation, point.options)
    result, started = Tally(), time.perf_counter()
    for seed in range(seeds):
        correctness = judged(implementation, point.case, options, source, seed)
        result.seeds += 1
        result.worst = max(result.worst, worst_fraction(correctness))
        if correctness.failures:
            result.failed.append(seed)
    result.seconds = time.perf_counter() - started
    return result


HEADERS = ("source", "shape", "options", "seeds", "failed", "failing seeds", "worst err/bound", "s")


def row(point: Point, result: Tally) -> list[str]:
    failing = ", ".join(map(str, result.failed[:8])) + (" …" if len(result.failed) > 8 else "")
    return [point.plan.name, point.shape, point.options_text, str(result.seeds), str(len(result.failed)),
            failing or "-", f"{result.worst:.3g}", f"{result.seconds:.0f}"]


def configured_source(registry: Registry, plan: SourcePlan, cache: str) -> InputSource | None:
    source = registry.input_sources.get(plan.name)
    if source is None:
        return None
    cached = {"cache": cache} if cache and "cache" in source.parameters else {}
    return source.configured({**plan.parameters, **cached})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeds 0..SEEDS-1 per row (default 200)")
    parser.add_argument("--only", default="", help="only rows whose source, shape or options contain this")
    parser.add_argument("--skip", default="", help="leave out rows whose source, shape or options contain this")
    # One thread by default: nystrom's small batched products gain nothing from a second thread
    # on a small shared machine, where it mostly waits (many times slower); the figures judged
    # differ only by rounding.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", default="", help="the model sources' capture cache (default: theirs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = load_registry(entry_points=False)
    implementation = registry.get("nystrom")
    sources = {plan.name: configured_source(registry, plan, args.cache) for plan in PLANS}
    rows, skipped, started = [], {}, time.perf_counter()
    for point in points():
        if args.only not in point.label or (args.skip and args.skip in point.label):
            continue
        reason = unavailable(implementation, point, sources[point.plan.name])
        if reason:
            skipped[point.label] = reason
            continue
        rows.append(row(point, tally(implementation, point, sources[point.plan.name], args.seeds)))
        print("  ".join(rows[-1]), flush=True)
    print(f"\nnystrom against its own float64 reference at its declared tolerance, judged as the harness "
          f"judges ({time.perf_counter() - started:.0f} s in all, {args.threads} thread(s)):\n")
    print(format_table(HEADERS, rows))
    if skipped:
        print("\nunavailable:")
        for what, reason in skipped.items():
            print(f"  {what}: {reason}")
    return 1 if any(cells[4] != "0" for cells in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
