"""Crossovers, throughput and Pareto fronts from rows with known scaling (scaling verdicts:
tests/test_scaling.py)."""

from __future__ import annotations

import pytest
from synthetic_runs import curve, declared, standard_run, write_run

from attnbench.analysis.curves import crossovers, pareto, throughputs
from attnbench.analysis.scaling import scaling_fits
from attnbench.measuring.flops import attention_flops
from attnbench.storage.run_folder import load_run
from attnbench.testing import small_case


@pytest.fixture
def run(tmp_path):
    return load_run(standard_run(tmp_path / "results" / "synthetic" / "run"))


def test_crossover_is_interpolated_on_the_log_log_curves(run):
    found = {(c.implementation, c.metric): c for c in crossovers(run.rows, run.declared, 1.0)}
    # linear 4e-5·n against the best exact, tiled 5e-10·n²: equal at n = 80000, beyond the range.
    assert found[("linear", "latency")].seq_len is None
    assert "not faster within the measured range" in found[("linear", "latency")].text
    # Memory: 8192·n against tiled's 4096·n: never leaner. liar (10000·n): never either.
    assert found[("linear", "memory")].seq_len is None
    # flaky, 1e-5·n against 5e-10·n²: equal at 20000 -> beyond its measured 2048.
    assert found[("flaky", "latency")].seq_len is None


def test_crossover_inside_the_range(tmp_path):
    rows = [*curve("exact", lambda n: 1e-9 * n**2, lambda n: n, 0),
            *curve("approx", lambda n: 2e-6 * n, lambda n: n, 0.1)]
    declarations = {"exact": declared(True, "n^2", "n"), "approx": declared(False, "n", "n")}
    run = load_run(write_run(tmp_path / "r" / "x", rows, declarations))
    latency = next(c for c in crossovers(run.rows, run.declared, 1.0) if c.metric == "latency")
    assert latency.seq_len == pytest.approx(2000, rel=1e-6)  # 1e-9·n² = 2e-6·n
    assert latency.text == "faster from ~2000 (between 1024 and 2048)"


def test_throughput_counts_flops_as_flashattention_does(run):
    case = small_case(batch=2, heads=4, seq_len=1024, head_dim=64)
    assert attention_flops(case) == 4 * 2 * 4 * 1024**2 * 64
    causal_training = small_case(batch=2, heads=4, seq_len=1024, head_dim=64, causal=True, mode="forward_backward")
    assert attention_flops(causal_training) == attention_flops(case) / 2 * 3.5
    results = {(t.row.implementation, t.row.case.seq_len): t for t in throughputs(run.rows, run.declared,
                                                                                   run.matmul_flops)}
    tiled = results[("tiled", 4096)]  # 4·8·4096²·64 FLOPs in 5e-10·4096² s
    assert tiled.achieved_flops == pytest.approx(4 * 8 * 64 / 5e-10)
    assert tiled.fraction_of_matmul == pytest.approx(tiled.achieved_flops / 1e13)
    assert ("linear", 4096) not in results  # an approximation that declared no work has no throughput


def test_half_precision_computed_in_float32_is_a_fraction_of_float32_matmul():
    """On a CPU whose float16 matmul is slow, an implementation computing float16 inputs in float32
    runs at float32's rate: its fraction is of that rate, never over 100% of a slower one."""
    import torch

    from attnbench.measuring.figures import Latency
    from attnbench.storage.results import Row, matmul_key

    case = small_case(batch=1, heads=8, seq_len=1024, head_dim=64, dtype=torch.float16)
    latency = Latency(samples_s=(0.01,) * 3, calls_per_sample=(1,), first_call_s=0.01, timer="perf_counter")
    rows = [Row("r", "exact", case, "ok", latency=latency)]
    rates = {matmul_key("cpu", "float16", ""): 1e9, matmul_key("cpu", "float32", ""): 50e9}
    (result,) = throughputs(rows, {"exact": declared(True, "n^2", "n")}, rates)
    assert result.achieved_flops == pytest.approx(attention_flops(case) / 0.01)  # 34 GFLOP/s
    assert result.matmul_dtype == "float32"
    assert result.fraction_of_matmul == pytest.approx(result.achieved_flops / 50e9)


def test_pareto_front_keeps_only_the_unbeaten(run):
    front = {(p.row.implementation, p.row.case.seq_len): p.on_front for p in pareto(run.rows)}
    assert front[("tiled", 4096)]  # the fastest
    assert front[("quadratic", 4096)]  # slower than tiled, but more accurate (1e-7 against 2e-7)
    assert not front[("linear", 4096)] and not front[("liar", 4096)]  # slower and less accurate than tiled
    assert ("flaky", 4096) not in front  # did not run


def test_a_point_correct_only_at_a_loose_tolerance_is_never_the_baseline(tmp_path):
    from dataclasses import replace

    from attnbench.analysis.curves import crossovers

    rows = [
        *curve("honest", lambda n: 1e-9 * n**2, lambda n: 4096 * n, 1e-7),
        *[replace(r, correctness=replace(r.correctness, within_default_tolerance=False))
          for r in curve("loose", lambda n: 1e-10 * n**2, lambda n: 4096 * n, 1e-4)],
        *curve("linear", lambda n: 4e-6 * n, lambda n: 8192 * n, 0.3),
    ]
    declarations = {"honest": declared(True, "n^2", "n"), "loose": declared(True, "n^2", "n"),
                    "linear": declared(False, "n", "n")}
    run = load_run(write_run(tmp_path / "run", rows, declarations, matmul=1e14))
    found = {(c.implementation, c.metric): c for c in crossovers(run.rows, run.declared, 1.0)}
    # Against honest (1e-9·n²), linear (4e-6·n) wins from n = 4000; the 10× faster 'loose' would move it.
    assert found[("linear", "latency")].seq_len == pytest.approx(4000, rel=1e-6)


def test_a_point_faster_than_the_matmul_yardstick_is_flagged_and_no_result(tmp_path):
    rows = curve("fast", lambda n: 1e-12 * n**2, lambda n: 4096 * n, 1e-7)  # 4·8·64/1e-12 = 2 PFLOP/s
    run = load_run(write_run(tmp_path / "run", rows, {"fast": declared(True, "n^2", "n")}, matmul=1e12))
    assert all(r.latency_voided and r.flags[0].kind == "implausible_speed" for r in run.rows)
    message = run.rows[0].flags[0].message
    assert "is 204800% of the device's best measured matmul (1000 GFLOP/s in float32); not a result" in message
    fits = [f for f in scaling_fits(run.rows, run.declared) if f.implementation == "fast" and f.metric == "latency"]
    assert fits[0].exponent is None  # no latency to fit


def test_a_precision_without_fast_matmuls_is_judged_against_float32():
    """float16 matmuls on many CPUs run a hundred times slower than float32 ones, while an
    attention kernel may compute in float32: the ceiling is the faster of the two yardsticks."""
    import dataclasses

    import torch

    from attnbench.storage import flags

    (fp16,) = [dataclasses.replace(r, case=dataclasses.replace(r.case, dtype=torch.float16))
               for r in curve("fp16", lambda n: 0.1, lambda n: 4096 * n, 1e-3)[:1]]  # 5.4 GFLOP/s
    slow_fp16 = {"cpu/float16": 1e9}
    assert [f.kind for f in flags.flags_of(fp16, True, slow_fp16)] == ["implausible_speed"]
    assert flags.flags_of(fp16, True, {**slow_fp16, "cpu/float32": 1e11}) == ()
    (flag,) = flags.flags_of(fp16, True, {**slow_fp16, "cpu/float32": 2e9})
    assert "(2 GFLOP/s in float32)" in flag.message


def test_a_point_that_is_not_ok_has_no_throughput_anywhere():
    """An incorrect point keeps its latency (shown, flagged by its status) but no GFLOP/s, % of
    matmul or speed-up: its speed achieved nothing."""
    import dataclasses

    from attnbench.measuring.figures import Work
    from attnbench.presenting.columns import _work_table
    from synthetic_runs import row

    honest = dataclasses.replace(row("tiled", 1024, 1e-3, 2**20, 1e-7), work=Work(1e9, "4·B·H·N²·D", declared=False))
    wrong = dataclasses.replace(honest, implementation="wrong", status="incorrect", reasons=("out vs exact",))
    declarations = {"tiled": declared(True, "n^2", "n"), "wrong": declared(True, "n^2", "n")}
    assert [t.row.implementation for t in throughputs([honest, wrong], declarations, {"cpu/float32": 1e12})] \
        == ["tiled"]
    assert _work_table(honest)["achieved_flops_per_s"] == pytest.approx(1e12)
    assert _work_table(wrong)["achieved_flops_per_s"] is None
