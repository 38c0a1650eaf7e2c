"""How often the scaling verdict is wrong, and how often it can speak, on simulated rounds.

    python benchmarks/verdict_calibration.py [--draws 300]

For each shipped suite's N (and its rounds) and a few kinds of noise, it draws curves and counts:
false alarms, 'does not hold' for a curve whose exponent exceeds its declaration by exactly the
allowance (the worst an honest implementation may show; 2.5% is what the 95% interval means);
'holds' for a curve exactly as declared; and 'does not hold' for a plugin declaring n that costs
n². The interval attnbench uses (the rounds' spread, Student's t) is set beside a bootstrap of
each point's fastest round, which looks tighter but does not keep its 2.5%.

A round's median is the cost times a few per cent of noise (``spread``) and, for a share of the
rounds (``disturbed``), a slowdown of 1.2–3× as other work on a shared machine gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from attnbench.analysis.scaling import CONFIDENCE, USEFUL_EXCESS, allowance, fit_exponent
from attnbench.settings.suite import LatencySettings

SUITES = ("quick", "scaling", "regression", "structured", "long_seq")
NOISE = ((0.03, 0.0), (0.03, 0.4), (0.15, 0.4), (0.3, 0.0))  # (spread, disturbed)
Lower = Callable[[Sequence[tuple[int, np.ndarray]]], tuple[float, float]]  # (exponent, interval's lower end)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"{'suite':10s} {'spread':>6s} {'disturbed':>9s} {'allow':>5s} | false alarms: t, bootstrap | "
          "holds when exact | liar caught")
    for suite in SUITES:
        seq_lens, rounds = _suite(suite)
        edge = allowance(seq_lens)
        for spread, disturbed in NOISE:
            rng = np.random.default_rng(0)  # the same draws for each noise: the false alarms of pure spread scale away

            def draw(power: float, seq_lens: Sequence[int] = seq_lens, spread: float = spread,
                     disturbed: float = disturbed, rng: np.random.Generator = rng) -> list[tuple[int, np.ndarray]]:
                return [(n, n**power * 1e-9 * _rounds(rng, rounds, spread, disturbed)) for n in seq_lens]

            alarms_t = alarms_boot = holds = caught = 0
            for _ in range(args.draws):
                edge_curve = draw(2 + edge)
                alarms_t += _shipped(edge_curve)[1] > 2 + edge
                alarms_boot += _bootstrap_fastest(edge_curve)[1] > 2 + edge
                exponent, low = _shipped(draw(2.0))
                holds += exponent - low + edge <= USEFUL_EXCESS
                caught += _shipped(draw(2.0))[1] > 1 + edge
            share = 100 / args.draws
            print(f"{suite:10s} {spread:6.2f} {disturbed:9.1f} {edge:5.2f} | {alarms_t * share:5.1f}% "
                  f"{alarms_boot * share:5.1f}% | {holds * share:5.0f}% | {caught * share:5.0f}%")
    return 0


def _suite(name: str) -> tuple[list[int], int]:
    suite = yaml.safe_load((Path(__file__).resolve().parent.parent / "suites" / f"{name}.yaml").read_text())
    seq_lens = suite["sweep"]["seq_len"]
    return seq_lens, suite.get("measure", {}).get("latency", {}).get("rounds", LatencySettings.rounds)


def _rounds(rng: np.random.Generator, count: int, spread: float, disturbed: float) -> np.ndarray:
    slowdown = np.where(rng.random(count) < disturbed, rng.uniform(1.2, 3.0, count), 1.0)
    return rng.lognormal(0, spread, count) * slowdown


def _shipped(points: Sequence[tuple[int, np.ndarray]]) -> tuple[float, float]:
    exponent, interval, _ = fit_exponent(points)
    return exponent, interval[0]


def _bootstrap_fastest(points: Sequence[tuple[int, np.ndarray]]) -> tuple[float, float]:
    """Each point's rounds resampled (scipy.stats.bootstrap), its fastest taken, the slope refitted."""
    xs = np.log([n for n, _ in points])
    centred = xs - xs.mean()

    def slope(*rounds: np.ndarray, axis: int = -1) -> np.ndarray:
        ys = np.stack([np.min(sample, axis=axis) for sample in rounds], axis=-1)
        return (centred * (ys - ys.mean(axis=-1, keepdims=True))).sum(axis=-1) / (centred**2).sum()

    logs = tuple(np.log(values) for _, values in points)
    result = stats.bootstrap(logs, slope, n_resamples=499, vectorized=True, paired=False, method="percentile",
                             confidence_level=CONFIDENCE, rng=np.random.default_rng(0))
    return float(slope(*(values[None, :] for values in logs))[0]), float(result.confidence_interval.low)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
