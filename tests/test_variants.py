"""Option sweeps: an option given several values makes one series per value, named after it."""

from __future__ import annotations

import json

import pytest

from attnbench.analysis.compare import compare_runs
from attnbench.analysis.history import histories
from attnbench.contract.errors import UserError
from attnbench.execution.runner import run_suite
from attnbench.settings.loader import load_suite
from attnbench.settings.variants import parse_variant, variant_name, variants
from attnbench.storage.run_folder import IMPLEMENTATIONS_FILE, load_run
from attnbench.tracking import point, point_figures

FAST = "measure: {correctness: {rows: 32}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 1}}\n"


def test_a_list_of_values_makes_one_named_variant_per_value(registry, write_suite):
    suite = load_suite(write_suite("implementations: [naive, performer]\n"
                                   "options: {performer: {features: [16, 64], orthogonal: false}}\n"), registry)
    found = variants(suite)
    assert [v.name for v in found] == ["naive", "performer[features=16]", "performer[features=64]"]
    assert found[1].implementation == "performer"
    assert found[1].options == {"orthogonal": False, "features": 16}


def test_two_swept_options_make_every_combination_in_the_order_given(registry, write_suite):
    suite = load_suite(write_suite("implementations: [nystrom]\n"
                                   "options: {nystrom: {landmarks: [32, 64], pinv_iterations: [3, 6]}}\n"), registry)
    assert [v.name for v in variants(suite)] == [
        "nystrom[landmarks=32,pinv_iterations=3]", "nystrom[landmarks=32,pinv_iterations=6]",
        "nystrom[landmarks=64,pinv_iterations=3]", "nystrom[landmarks=64,pinv_iterations=6]"]


def test_an_option_whose_value_is_a_list_is_swept_only_when_asked(registry, write_suite):
    # axial's shape is one list ([rows, cols]): a list is its value, {sweep: [...]} sweeps it.
    one = load_suite(write_suite("implementations: [axial]\noptions: {axial: {shape: [8, 8]}}\n"), registry)
    assert [v.name for v in variants(one)] == ["axial"]
    swept = load_suite(write_suite("implementations: [axial]\noptions: {axial: {shape: {sweep: [[8, 8], [4, 16]]}}}\n"),
                       registry)
    assert [v.name for v in variants(swept)] == ["axial[shape=[8,8]]", "axial[shape=[4,16]]"]
    assert variants(swept)[1].options == {"shape": [4, 16]}


@pytest.mark.parametrize("text, expected", [
    ("{performer: {features: [16, 'many']}}", r"options\.performer\.features\[1\]: expected an integer, got 'many'"),
    ("{performer: {features: [16, 16]}}", r"options\.performer\.features\[1\]: 16 is listed twice"),
    ("{performer: {features: []}}", r"options\.performer\.features: expected a non-empty list of values to sweep"),
    ("{performer: {features: {sweep: 16}}}", r"options\.performer\.features\.sweep: expected a non-empty list"),
    ("{performer: {features: [16, -4]}}", r"options\.performer\.features: .*\(in performer\[features=-4\]\)"),
    ("{nystrom: {landmarks: [1, 2, 3, 4, 5, 6, 7, 8, 9], pinv_iterations: [1, 2, 3, 4, 5, 6, 7, 8]}}",
     r"options\.nystrom: the swept values make 72 variants \(allowed: at most 64"),
])
def test_a_bad_sweep_is_one_line_naming_the_value(registry, write_suite, text, expected):
    with pytest.raises(UserError, match=expected):
        load_suite(write_suite(f"options: {text}\n"), registry)


def test_variant_names_read_back_as_their_implementation_and_options():
    for implementation, settings in [("performer", {"features": 64}), ("axial", {"shape": [4, 16]}),
                                     ("sparse", {"window": 32, "backend": "blocked"}), ("naive", {})]:
        assert parse_variant(variant_name(implementation, settings)) == (implementation, settings)
    with pytest.raises(ValueError, match="not a variant name"):
        parse_variant("performer[features=64")


def test_each_variant_is_a_series_with_its_own_rows_options_and_declarations(registry, write_suite, tmp_path):
    suite = load_suite(write_suite("implementations: [naive, performer]\n"
                                   "options: {performer: {features: [8, 512]}}\n"
                                   "sweep: {seq_len: [64], heads: 2, head_dim: 16}\n"
                                   + FAST.replace("rows: 32", "rows: 64")), registry)  # every row: no sampling noise
    result = run_suite(suite, registry, output=tmp_path / "out")
    rows = {row.implementation: row for row in result.rows}
    assert set(rows) == {"naive", "performer[features=8]", "performer[features=512]"}
    assert rows["performer[features=8]"].options["features"] == 8
    assert rows["performer[features=512]"].options["features"] == 512
    few, many = (rows[name].correctness.exact["out"].rel_fro for name in ("performer[features=8]",
                                                                          "performer[features=512]"))
    assert many < few  # more random features, a closer estimate: the variants really differ
    declared = json.loads((result.run_dir / IMPLEMENTATIONS_FILE).read_text())
    assert declared["performer[features=8]"]["exact"] is False
    assert set(load_run(result.run_dir).declared) == set(rows)

    again = run_suite(suite, registry, output=tmp_path / "out")
    comparison = compare_runs(load_run(result.run_dir), load_run(again.run_dir))
    assert {change.implementation for change in comparison.changes} == set(rows)  # matched by variant
    assert not comparison.only_in_base and not comparison.only_in_new
    (history,) = histories([load_run(result.run_dir), load_run(again.run_dir)], "performer[features=512]")
    assert history.runs == (result.run_dir.name, again.run_dir.name) and history.seq_lens == (64,)


def test_tracking_measures_a_variant_by_its_name():
    case = point(64, heads=2, head_dim=16)
    few = point_figures("performer[features=8]", case)
    many = point_figures("performer[features=512]", case)
    assert many.error < few.error
