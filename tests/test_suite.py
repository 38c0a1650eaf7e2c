"""Suite files: valid ones load with defaults; every mistake is one line naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO

from attnbench.cli import main
from attnbench.contract.errors import UserError
from attnbench.settings.grid import expand, expand_all
from attnbench.settings.loader import load_suite
from attnbench.settings.suite import LatencySettings


def test_a_minimal_suite_takes_defaults(registry, write_suite):
    suite = load_suite(write_suite("sweep: {seq_len: [2048, 512]}\n", name="tiny.yaml"), registry)
    assert suite.name == "tiny"
    assert suite.implementations == tuple(registry.names())
    assert suite.sweeps[0].seq_len == (512, 2048)
    cases = expand(suite.sweeps[0])
    assert [case.seq_len for case in cases] == [512, 2048]
    first = cases[0]
    assert (first.batch, first.heads, first.kv_heads, first.head_dim) == (1, 8, 8, 64)
    assert (first.dtype, first.device, first.causal, first.mode) == (torch.float32, "cpu", False, "forward")
    assert suite.measure.latency == LatencySettings()
    assert suite.output == Path("results")


def test_every_field_is_read(registry, write_suite):
    suite = load_suite(
        write_suite(
            """
name: full
description: every field
implementations: [flash]
options: {naive: {}}
seed: 7
output: elsewhere
sweep:
  seq_len: [128]
  heads: [8, 16]
  kv_heads: [2, 8]
  batch: 2
  head_dim: [32, 128]
  dtype: [float16, bfloat16]
  device: [cpu, cuda:1]
  causal: [true, false]
  mode: [forward_backward]
  inputs: [gaussian, structured]
measure: {correctness: {rows: 64}, latency: false, memory: true}
limits: {timeout_s: 30, memory_gb: 1.5, budget_s: 100}
"""
        ),
        registry,
    )
    assert suite.implementations == ("flash",)
    assert suite.seed == 7 and suite.output == Path("elsewhere")
    assert suite.sweeps[0].kv_heads == (2, 8) and suite.sweeps[0].device == ("cpu", "cuda:1")
    assert suite.measure.correctness.rows == 64 and suite.measure.latency is None
    assert suite.limits.memory_gb == 1.5 and suite.limits.budget_s == 100
    assert len(expand(suite.sweeps[0])) == 2 * 2 * 2 * 2 * 2 * 2 * 2
    assert {case.inputs for case in expand(suite.sweeps[0])} == {"gaussian", "structured"}


def test_limits_may_be_null_where_the_default_is_none(registry, write_suite):
    suite = load_suite(write_suite("limits: {memory_gb: null, budget_s: null}\n"), registry)
    assert suite.limits.memory_gb is None and suite.limits.budget_s is None


def test_measure_short_form_lists_what_to_measure(registry, write_suite):
    suite = load_suite(write_suite("measure: [latency]\n"), registry)
    assert suite.measure.correctness is None and suite.measure.latency is not None and not suite.measure.memory


@pytest.mark.parametrize("name", ["quick", "long_seq"])
def test_shipped_suites_load(registry, name):
    suite = load_suite(REPO / "suites" / f"{name}.yaml", registry)
    left_out = {"quick": {"flex"}, "long_seq": set()}[name]
    assert set(suite.implementations) == set(registry.names()) - left_out
    if name == "long_seq":
        assert min(suite.sweeps[0].seq_len) <= 512 and max(suite.sweeps[0].seq_len) >= 32768


BAD_SUITES = [
    # (what is wrong, YAML, words the one-line message must contain)
    ("negative error budget", "report: {error_budgets: [0.01, -1]}",
     ["report.error_budgets[1]: must be a positive finite number, got -1"]),
    ("too many error budgets", "report: {error_budgets: [0.01, 0.02, 0.05, 0.1, 0.2]}",
     ["report.error_budgets: 5 budgets given (allowed: 1 to 4"]),
    ("unknown report field", "report: {budgets: [0.1]}", ["report.budgets: unknown field (allowed: error_budgets)"]),
    ("typo'd top-level key", "sweeep: {seq_len: 4}", ["sweeep: unknown field", "allowed:", "did you mean 'sweep'"]),
    ("typo'd sweep key", "sweep: {seqlen: 4}", ["sweep.seqlen: unknown field", "seq_len"]),
    ("string for a number", "sweep: {batch: four}", ["sweep.batch: expected a positive integer, got 'four'"]),
    ("float for an integer", "sweep: {head_dim: 64.5}", ["sweep.head_dim: expected a positive integer, got 64.5"]),
    ("negative length", "sweep: {seq_len: [512, -4]}", ["sweep.seq_len[1]: must be at least 1, got -4"]),
    ("zero heads", "sweep: {heads: 0}", ["sweep.heads: must be at least 1, got 0"]),
    ("kv_heads not dividing", "sweep: {heads: 8, kv_heads: 3}", ["sweep.kv_heads[0]: 3 does not divide heads=8"]),
    ("unknown implementation", "implementations: [naive, flsh]",
     ["implementations[1]: unknown implementation 'flsh'", "registered: naive, flash", "did you mean 'flash'"]),
    ("implementations not a list", "implementations: 3", ["implementations: expected 'all' or a non-empty list"]),
    ("unknown dtype", "sweep: {dtype: float64}",
     ["sweep.dtype: unknown dtype 'float64'", "allowed: float32, float16, bfloat16"]),
    ("unknown device", "sweep: {device: [cpu, tpu]}",
     ["sweep.device[1]: unknown device 'tpu'", "allowed: cpu, cuda, cuda:N, mps"]),
    ("unknown mode", "sweep: {mode: backward}", ["sweep.mode: unknown mode 'backward'", "forward_backward"]),
    ("unknown inputs", "sweep: {inputs: [gaussian, spiky]}",
     ["sweep.inputs[1]: unknown input distribution 'spiky' (allowed: gaussian, structured, sink, low_entropy, "
      "outliers, minilm, smollm2)"]),
    ("empty list of sweeps", "sweep: []", ["sweep: expected a mapping of axes, or a non-empty list of them"]),
    ("bad axis in the second sweep", "sweep: [{heads: 8}, {heads: 0}]", ["sweep[1].heads: must be at least 1"]),
    ("options for a missing implementation", "options: {sparse9: {window: 4}}",
     ["options.sparse9: unknown implementation 'sparse9'", "registered:"]),
    ("unknown option", "options: {naive: {window: 4}}", ["options.naive.window: unknown option for naive"]),
    ("invalid YAML", "name: quick\nsweep: [1, 2\n", ["invalid YAML at line 3"]),
    ("empty file", "", ["the file is empty"]),
    ("only a comment", "# nothing\n", ["the file is empty"]),
    ("a list at the top", "- seq_len: 3\n", ["expected a mapping of fields at the top level, got a list"]),
    ("duplicate key", "seed: 1\nseed: 2\n", ["duplicate key 'seed'", "line 2"]),
    ("empty axis", "sweep: {seq_len: []}", ["sweep.seq_len: the list is empty"]),
    ("repeated value", "sweep: {seq_len: [64, 64]}", ["sweep.seq_len[1]: 64 is listed twice"]),
    ("negative limit", "limits: {timeout_s: -1}", ["limits.timeout_s: must be a positive finite number, got -1"]),
    ("null timeout", "limits: {timeout_s: null}", ["limits.timeout_s: expected a positive number, got null"]),
    ("measure setting not a mapping", "measure: {latency: fast}",
     ["measure.latency: expected true, false or a mapping of settings "
      "(min_run_time_s, max_run_time_s, min_samples, rounds, cache)"]),
    ("unknown cache state", "measure: {latency: {cache: hot}}",
     ["measure.latency.cache: unknown cache state 'hot' (allowed: cold, warm)"]),
    ("threads not a count", "measure: {threads: 0}", ["measure.threads: must be at least 1, got 0"]),
    ("options not a mapping", "options: {naive: 3}", ["options.naive: expected a mapping, got 3"]),
    ("unknown measurement", "measure: [latency, speed]", ["measure[1]: unknown measurement 'speed'"]),
    ("bad boolean", "sweep: {causal: maybe}", ["sweep.causal: expected true or false, got 'maybe'"]),
    ("name unusable as a folder", "name: ../escape", ["name: '../escape' is not a usable folder name"]),
    # Found by the fuzz test: a field name that is a line break once gave a two-line error.
    ("field name with a line break", 'limits: {"\\n": null}', ["limits.'\\n': unknown field"]),
    ("a list as a field name", "[]: 1\n", ["a list cannot be a field name", "line 1"]),
    ("option name with a line break", 'options: {naive: {"a\\nb": 1}}', ["options.naive.a\\nb: unknown option"]),
    # Issue 12's validation gaps.
    ("nan option", "options: {performer: {epsilon: .nan}}",
     ["options.performer.epsilon: expected a finite value, got nan (nan and inf are not allowed)"]),
    ("inf option", "options: {sparse: {window: .inf}}", ["options.sparse.window: expected a finite value, got inf"]),
    ("seed beyond 2^64", f"seed: {2**64}", [f"seed: must be at most {2**64 - 1} (2^64 - 1), got {2**64}"]),
    ("one correctness row", "measure: {correctness: {rows: 1}}",
     ["measure.correctness.rows: must be at least 2, got 1"]),
]


@pytest.mark.parametrize("problem, text, expected", BAD_SUITES, ids=[case[0] for case in BAD_SUITES])
def test_bad_suite_is_one_clear_line(registry, write_suite, problem, text, expected):
    path = write_suite(text)
    with pytest.raises(UserError) as caught:
        load_suite(path, registry)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for words in expected:
        assert words in message, f"{words!r} not in {message!r}"


def test_an_invalid_options_that_fails_is_the_plugins_problem_not_the_suites(registry, write_suite):
    from adversaries.faults import OptionsRaise

    from attnbench.contract.registry import Registry

    plugins = Registry()
    plugins.add(registry.get("naive"))
    plugins.add(OptionsRaise())
    suite = load_suite(write_suite("options: {options_raise: {}}\n"), plugins)  # loads: the run reports it
    assert suite.implementations == ("naive", "options_raise")


def test_a_very_large_sweep_says_its_size_before_it_starts(registry, write_suite, tmp_path, monkeypatch):
    from attnbench.execution import runner
    from attnbench.storage import run_folder

    said = []
    monkeypatch.setattr(run_folder, "new_run_folder", lambda *args: (_ for _ in ()).throw(RuntimeError("stop here")))
    suite = load_suite(write_suite("sweep: {seq_len: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], heads: [1, 2, 3, 4, 5], "
                                   "batch: [1, 2, 3, 4, 5], causal: [false, true]}\n"), registry)
    with pytest.raises(RuntimeError, match="stop here"):
        runner.run_suite(suite, registry, output=tmp_path, warn=said.append)
    points = len(registry.names()) * 500
    assert len(said) == 1 and f"this sweep has {points} points (implementations × cases); at least" in said[0]


def test_python_tags_are_refused_and_never_executed(registry, write_suite, tmp_path):
    marker = tmp_path / "pwned"
    path = write_suite(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match=r"line 1, column 7: YAML tag '!!python/object/apply:os.system' is not allowed"):
        load_suite(path, registry)
    assert not marker.exists()


def test_missing_file(registry, tmp_path):
    with pytest.raises(UserError, match="no such suite file"):
        load_suite(tmp_path / "nope.yaml", registry)


@pytest.mark.parametrize("problem, text, expected", BAD_SUITES[:6], ids=[case[0] for case in BAD_SUITES[:6]])
def test_cli_prints_one_line_and_exits_2(write_suite, capsys, problem, text, expected):
    path = write_suite(text)
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"attnbench: error: {path}: ")
    assert "Traceback" not in captured.err


def test_error_budgets_default_and_are_kept_ascending(registry, write_suite):
    assert load_suite(write_suite("name: plain\n"), registry).report.error_budgets == (0.01, 0.1)
    chosen = load_suite(write_suite("report: {error_budgets: [0.2, 0.05]}\n"), registry)
    assert chosen.report.error_budgets == (0.05, 0.2)



def test_a_list_of_sweeps_measures_the_cases_of_each_once_in_order(registry, write_suite):
    suite = load_suite(write_suite("sweep:\n  - {inputs: [gaussian, minilm], heads: 12, head_dim: 32, seq_len: [128]}\n"
                                   "  - {inputs: [gaussian, smollm2], heads: 9, kv_heads: 3, causal: true, "
                                   "seq_len: [256, 128]}\n  - {inputs: [minilm], heads: 12, head_dim: 32, "
                                   "seq_len: [128]}\n"), registry)
    cases = expand_all(suite.sweeps)
    assert [(c.inputs, c.heads, c.kv_heads, c.head_dim, c.seq_len) for c in cases] == [
        ("gaussian", 12, 12, 32, 128), ("minilm", 12, 12, 32, 128),
        ("gaussian", 9, 3, 64, 128), ("gaussian", 9, 3, 64, 256),
        ("smollm2", 9, 3, 64, 128), ("smollm2", 9, 3, 64, 256)]
