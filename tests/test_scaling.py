"""Scaling fits and verdicts: what each fit can detect, and a verdict only where that is useful."""

from __future__ import annotations

import random

import pytest
import yaml
from conftest import REPO
from synthetic_runs import curve, declared, row, shared_machine_rounds, standard_run, write_run

from attnbench.analysis.scaling import USEFUL_EXCESS, scaling_fits
from attnbench.storage.run_folder import load_run


def _suite_seq_lens(name: str) -> list[int]:
    """The N a shipped suite sweeps."""
    return yaml.safe_load((REPO / "suites" / f"{name}.yaml").read_text())["sweep"]["seq_len"]


def _fit(run, name, metric="latency"):
    return next(f for f in scaling_fits(run.rows, run.declared) if f.implementation == name and f.metric == metric)


def _noisy_run(folder, name, seconds, seq_lens, declaration, seed=0, **noise):
    rng = random.Random(seed)
    rows = [row(name, n, seconds(n), 4096 * n, 0.1, rounds=shared_machine_rounds(seconds(n), rng, **noise))
            for n in seq_lens]
    return load_run(write_run(folder, rows, {name: declared(False, declaration, "n")}))


# Rounds 20–30% apart, as on a loaded machine; long_seq's seven points also through rounds slowed
# up to 3×. (Three points with 40% of their rounds slowed catch it in about half the draws.)
@pytest.mark.parametrize(("suite", "spread", "disturbed"), [("long_seq", 0.3, 0.4), ("peers", 0.2, 0.0),
                                                            ("structured", 0.2, 0.0), ("scaling", 0.3, 0.4)])
def test_a_plugin_declaring_n_that_costs_n_squared_does_not_hold_over_a_shipped_suites_points(tmp_path, suite, spread,
                                                                                              disturbed):
    for seed in range(10):
        run = _noisy_run(tmp_path / str(seed), "liar", lambda n: 2e-9 * n**2, _suite_seq_lens(suite), "n", seed=seed,
                         spread=spread, disturbed=disturbed)
        liar = _fit(run, "liar")
        assert liar.verdict == "does not hold", liar.sentence()
        assert liar.exponent - 1 > liar.detectable  # the excess it has is more than the fit needs to see


def test_over_the_quick_suites_range_no_verdict_is_useful_and_the_reason_says_why(tmp_path):
    """×4 in N: an honest naive's cost per operation rises 2.2× across it on a CPU (its buffers
    leave the cache), which is more than half a power of N; n² cannot be told from n there."""
    liar = _fit(_noisy_run(tmp_path / "run", "liar", lambda n: 2e-9 * n**2, _suite_seq_lens("quick"), "n"), "liar")
    assert liar.verdict == "undetermined" and liar.detectable > USEFUL_EXCESS
    assert "too narrow a range: across N ×4" in liar.why


def test_an_honest_n_squared_curve_with_noise_holds_and_could_have_seen_half_a_power(tmp_path):
    # Its cost per operation rises 2.2× from N=1024 to 4096, as naive's does when its buffers leave the cache.
    def seconds(n):
        return 1e-9 * n**2 * (2.2 if n >= 4096 else 1.0)

    seq_lens = _suite_seq_lens("long_seq")
    fit = _fit(_noisy_run(tmp_path / "quiet", "honest", seconds, seq_lens, "n^2", disturbed=0.0), "honest")
    assert fit.verdict == "holds", fit.sentence()
    assert fit.detectable <= USEFUL_EXCESS and fit.noise == "rounds"
    # On a loaded machine (rounds slowed up to 3×) the same curve could not see half a power: no verdict.
    loaded = _fit(_noisy_run(tmp_path / "loaded", "honest", seconds, seq_lens, "n^2", disturbed=0.4), "honest")
    assert loaded.verdict == "undetermined" and "too noisy" in loaded.why


def test_a_slowdown_per_operation_across_a_narrow_range_is_not_a_failed_declaration(tmp_path):
    """naive's training step measured n^2.58 from N=256 to 1024 in a quick run: its per-operation
    cost rose 2.2×. A verdict from replicates alone, with a fixed margin, would call that 'does not hold'."""
    fit = _fit(_noisy_run(tmp_path / "run", "naive", lambda n: 1e-9 * n**2.58, _suite_seq_lens("quick"), "n^2",
                          disturbed=0.0), "naive")
    assert fit.interval[0] > 2.4  # precise: the rounds agree
    assert fit.verdict == "undetermined"


def test_a_three_point_curve_with_large_noise_is_undetermined_and_names_what_it_could_detect(tmp_path):
    seq_lens = _suite_seq_lens("long_seq")[::3]  # 512, 4096, 32768: wide enough that the noise is what limits it
    fit = _fit(_noisy_run(tmp_path / "run", "noisy", lambda n: 1e-9 * n**2, seq_lens, "n^2", rounds=3, spread=0.5),
               "noisy")
    assert fit.verdict == "undetermined"
    assert f"detects an excess of {fit.detectable:.2f} or more" in fit.reason and fit.detectable > USEFUL_EXCESS
    assert "too noisy" in fit.why


def test_the_rounds_are_counted_once(tmp_path):
    """The interval comes from the spread of the rounds where every point has them, else from the
    residuals; never both: the fastest rounds' residuals already carry the rounds' noise."""
    import numpy as np
    from scipy import stats

    rng = random.Random(1)
    seq_lens = (1024, 2048, 4096, 8192)
    # Each point's rounds scattered by 5%, the points themselves off a straight line by up to 10%.
    rounds = {n: [[1e-9 * n**2 * bend * rng.lognormvariate(0, 0.05)] for _ in range(5)]
              for n, bend in zip(seq_lens, (1.0, 1.1, 0.9, 1.0), strict=True)}
    rows = [row("bent", n, 1e-9 * n**2, 4096 * n, 0.1, rounds=rounds[n]) for n in seq_lens]
    fit = _fit(load_run(write_run(tmp_path / "run", rows, {"bent": declared(True, "n^2", "n")})), "bent")
    logs = [np.log([r[0] for r in rounds[n]]) for n in seq_lens]
    within = sum(((values - values.mean()) ** 2).sum() for values in logs) / (len(seq_lens) * 4)
    centred = np.log(seq_lens) - np.log(seq_lens).mean()
    expected = stats.t.ppf(0.975, len(seq_lens) * 4) * np.sqrt(within / (centred**2).sum())
    assert fit.noise == "rounds" and fit.rounds == (5, 5, 5, 5)
    assert fit.half_width == pytest.approx(expected, rel=1e-4)  # (samples are stored to 6 digits)


def test_exponents_are_fitted_over_every_measured_point(tmp_path):
    run = load_run(standard_run(tmp_path / "results" / "synthetic" / "run"))
    quadratic_memory = _fit(run, "quadratic", "memory")
    assert quadratic_memory.exponent == pytest.approx(2.0)
    assert quadratic_memory.seq_lens == (512, 1024, 2048, 4096, 8192)  # every point, the smallest too
    assert quadratic_memory.noise == "residuals" and quadratic_memory.half_width == pytest.approx(0.0, abs=1e-9)
    assert _fit(run, "tiled", "memory").exponent == pytest.approx(1.0)
    liar = _fit(run, "liar")
    assert liar.exponent == pytest.approx(2.0) and liar.verdict == "does not hold"
    assert liar.sentence() == ("declared n, measured n^2.00 (95%: 2.00 to 2.00) over 512–8192, 5 N × 1 round: "
                               "does not hold (detects an excess of 0.60 or more)")


def test_a_curve_with_gaps_is_fitted_on_what_ran(tmp_path):
    flaky = _fit(load_run(standard_run(tmp_path / "results" / "synthetic" / "run")), "flaky")
    assert flaky.seq_lens == (512, 1024, 2048) and flaky.exponent == pytest.approx(1.0)


def test_two_points_of_one_round_give_no_verdict(tmp_path):
    rows = [r for r in curve("two", lambda n: 3e-9 * n**2.4, lambda n: 4096 * n, 0.1) if r.case.seq_len >= 4096]
    run = load_run(write_run(tmp_path / "run", rows, {"two": declared(True, "n^2", "n")}))
    fit = _fit(run, "two")
    assert fit.exponent == pytest.approx(2.4) and fit.interval is None and fit.verdict == "undetermined"
    assert fit.sentence() == ("declared n^2, measured n^2.40 over 4096–8192, 2 N × 1 round: undetermined "
                              "(2 points of one measurement each: no estimate of the noise)")
