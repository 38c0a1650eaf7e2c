"""Run folders with made-up rows whose scaling is known exactly: for the analysis and reports."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from attnbench.contract.implementation import complexity_exponent
from attnbench.measuring.figures import Correctness, ErrorFigures, Latency, Memory
from attnbench.storage.results import Row, write_rows
from attnbench.storage.run_folder import Declared, write_declared
from attnbench.testing import small_case

SEQ_LENS = (512, 1024, 2048, 4096, 8192)


def declared(exact: bool, time: str, memory: str) -> Declared:
    return Declared(exact, time, memory, complexity_exponent(time), complexity_exponent(memory))


def row(
    name: str, seq_len: int, seconds: float, peak: int, error: float, *, status: str = "ok",
    causal: bool = False, samples: Sequence[float] | None = None, run_id: str = "20260101T000000Z-abc1234",
    rounds: Sequence[Sequence[float]] | None = None,
) -> Row:
    """``samples``: one round's; ``rounds``: each round's samples (each round its own worker)."""
    case = small_case(batch=1, heads=8, seq_len=seq_len, head_dim=64, causal=causal)
    if status != "ok":
        return Row(run_id, name, case, status, reasons=(f"{name} cannot at {seq_len}",))
    if rounds:
        latency = Latency(tuple(s for round_ in rounds for s in round_), (1,) * len(rounds), seconds, "synthetic",
                          round_sizes=tuple(len(round_) for round_ in rounds))
    else:
        latency = Latency(tuple(samples or (seconds * 0.99, seconds, seconds * 1.01)), (1,), seconds, "synthetic")
    return Row(
        run_id, name, case, "ok",
        correctness=Correctness(256, {"out": ErrorFigures(error, error, None)}, None, None),
        latency=latency,
        memory=Memory(peak, peak, "synthetic"),
    )


def write_run(
    folder: Path, rows: Sequence[Row], declarations: dict[str, Declared], matmul: float | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "rows.jsonl", rows)
    write_declared(folder, declarations)
    environment = {"cpu_model": "synthetic", "torch_threads": 2}
    if matmul:
        environment["matmul_flops"] = {"cpu/float32": matmul}
    (folder / "environment.json").write_text(json.dumps(environment))
    return folder


def curve(name: str, seconds: Callable[[int], float], peak: Callable[[int], float], error: float) -> list[Row]:
    return [row(name, n, seconds(n), int(peak(n)), error) for n in SEQ_LENS]


def standard_run(folder: Path) -> Path:
    """quadratic (exact, n²/n²), tiled (exact, n²/n), linear (approximate, n/n) and a plugin that
    claims n but is n² ('liar'); 'flaky' fails at the two largest seq_lens."""
    rows = [
        *curve("quadratic", lambda n: 1e-9 * n**2, lambda n: 8 * n**2, 1e-7),
        *curve("tiled", lambda n: 5e-10 * n**2, lambda n: 4096 * n, 2e-7),
        *curve("linear", lambda n: 4e-5 * n, lambda n: 8192 * n, 0.3),
        *curve("liar", lambda n: 2e-9 * n**2, lambda n: 10_000 * n, 0.5),
        *[row("flaky", n, 1e-5 * n, 1000 * n, 0.2) for n in SEQ_LENS[:3]],
        *[row("flaky", n, 0, 0, 0, status="oom") for n in SEQ_LENS[3:]],
    ]
    declarations = {
        "quadratic": declared(True, "n^2", "n^2"),
        "tiled": declared(True, "n^2", "n"),
        "linear": declared(False, "n", "n"),
        "liar": declared(False, "n", "n"),
        "flaky": declared(False, "n", "n"),
    }
    return write_run(folder, rows, declarations, matmul=1e13)  # tiled runs at 41% of it


def rounds_row(
    name: str, seq_len: int, round_medians: Sequence[float], *, per_round: int = 4,
    options: dict | None = None, run_id: str = "20260101T000000Z-abc1234",
) -> Row:
    """An ok row whose latency was taken in rounds, one per median, each of ``per_round`` samples
    within ±0.1% of it (tight within a round, as a round's back-to-back calls are)."""
    samples = tuple(median * (1 + 0.001 * (2 * i / max(per_round - 1, 1) - 1))
                    for median in round_medians for i in range(per_round))
    latency = Latency(samples, (1,) * len(round_medians), round_medians[0], "synthetic",
                      round_sizes=(per_round,) * len(round_medians))
    base = row(name, seq_len, min(round_medians), 4096 * seq_len, 1e-7, run_id=run_id)
    return dataclasses.replace(base, latency=latency, options=options or {})


def shared_machine_rounds(seconds: float, rng: random.Random, *, rounds: int = 5, samples: int = 7,
                          spread: float = 0.03, disturbed: float = 0.4) -> list[list[float]]:
    """Rounds as a shared CPU gives them: each round a few per cent off the cost, and ``disturbed``
    of them slowed 1.2–3× as a whole by other work (the quick suite's rounds on a 2-core VM ranged
    up to 4.5× their fastest); the samples within a round close together."""
    measured = []
    for _ in range(rounds):
        slowdown = rng.uniform(1.2, 3.0) if rng.random() < disturbed else 1.0
        median = seconds * rng.lognormvariate(0, spread) * slowdown
        measured.append([median * rng.lognormvariate(0, spread) for _ in range(samples)])
    return measured
