"""Measuring one case in-process: what is judged, what is only reported, and why a row fails."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import toys

from attnbench import Implementation
from attnbench.measuring.in_process import measure_case
from attnbench.settings.suite import CorrectnessSettings, LatencySettings, Measure
from attnbench.testing import CORRECTNESS_ONLY, small_case

TRAINING = small_case(mode="forward_backward", kv_heads=2)  # the toys are not causal


@pytest.mark.parametrize(
    "behaviour, words",
    [
        (toys.returns_query, "out vs float64 softmax attention (first call): max abs error"),
        (toys.returns_nan, "output contains NaN or Inf"),
        (toys.wrong_shape, "output shape (2, 4, 127, 32) (expected (2, 4, 128, 32))"),
    ],
)
def test_wrong_outputs_are_incorrect_with_the_reason(behaviour, words):
    measurement = measure_case(toys.Toy("toy", behaviour), small_case(), {}, CORRECTNESS_ONLY)
    assert measurement.status == "incorrect"
    assert any(words in reason for reason in measurement.reasons), measurement.reasons


def test_a_backward_bug_is_caught_in_training_mode():
    toy = toys.Toy("toy", toys.wrong_backward)
    assert measure_case(toy, small_case(), {}, CORRECTNESS_ONLY).status == "ok"  # forward is right
    measurement = measure_case(toy, TRAINING, {}, CORRECTNESS_ONLY)
    assert measurement.status == "incorrect"
    assert {reason.split(" vs ")[0] for reason in measurement.reasons} == {"dq"}
    assert measurement.correctness.exact["dk"].passed and measurement.correctness.exact["dv"].passed


def test_an_exact_implementation_reports_every_error_figure_in_training_mode():
    measurement = measure_case(toys.Toy("toy", toys.exact_attention), TRAINING, {}, CORRECTNESS_ONLY)
    correctness = measurement.correctness
    assert measurement.status == "ok" and correctness.judged_against == "exact"
    assert set(correctness.exact) == {"out", "dq", "dk", "dv"}
    for figures in correctness.exact.values():
        assert 0 < figures.max_abs < 1e-5 and figures.bound is not None


class FirstHalfOfKeys(Implementation):
    """An approximation: attends only to the first half of the keys, and says so in its reference."""

    name = "first_half"
    exact = False
    time_complexity = "n^2"
    memory_complexity = "n^2"

    def __init__(self, computes_what_it_claims: bool = True) -> None:
        self.computes_what_it_claims = computes_what_it_claims

    def prepare(self, case, options):
        def attention(q, k, v):
            keep = k.shape[-2] // 2 if self.computes_what_it_claims else k.shape[-2] // 4
            return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :keep], v[:, :, :keep])

        return attention

    def reference(self, q, k, v, case, options, rows):
        keep = k.shape[-2] // 2
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k[:, :, :keep], v[:, :, :keep])


def test_an_approximation_is_judged_against_its_own_reference_and_reports_its_real_error():
    measurement = measure_case(FirstHalfOfKeys(), TRAINING_FULL_HEADS, {}, CORRECTNESS_ONLY)
    correctness = measurement.correctness
    assert measurement.status == "ok" and correctness.judged_against == "own"
    assert correctness.own["out"].max_abs < 1e-5 and correctness.own["dq"].max_abs < 1e-5
    assert correctness.exact["out"].rel_fro > 0.1  # the approximation's real error, reported
    assert correctness.exact["out"].bound is None  # ...and not judged


def test_an_approximation_that_departs_from_its_own_reference_is_incorrect():
    measurement = measure_case(FirstHalfOfKeys(computes_what_it_claims=False), small_case(), {}, CORRECTNESS_ONLY)
    assert measurement.status == "incorrect"
    assert measurement.reasons[0].startswith("out vs its own float64 reference")


TRAINING_FULL_HEADS = small_case(mode="forward_backward")


def test_large_sequences_are_checked_on_sampled_rows_and_sampled_key_rows():
    settings = dataclasses.replace(CORRECTNESS_ONLY, correctness=CorrectnessSettings(rows=16))
    measurement = measure_case(toys.Toy("toy", toys.exact_attention), TRAINING_FULL_HEADS, {}, settings)
    correctness = measurement.correctness
    assert measurement.status == "ok" and correctness.rows_checked == 16 and correctness.key_rows_checked == 16
    assert set(correctness.exact) == {"out", "dq", "dk", "dv"}
    assert all(figures.max_abs < 1e-5 for figures in correctness.exact.values())


def test_key_row_gradients_beyond_the_budget_are_not_checked_and_say_so():
    settings = dataclasses.replace(CORRECTNESS_ONLY, correctness=CorrectnessSettings(rows=16, max_reference_gflop=1e-6))
    measurement = measure_case(toys.Toy("toy", toys.exact_attention), TRAINING_FULL_HEADS, {}, settings)
    assert set(measurement.correctness.exact) == {"out", "dq"} and measurement.correctness.key_rows_checked == 0
    assert any(note.startswith("dk, dv not checked: their float64 reference needs every query row")
               for note in measurement.notes)


def test_latency_and_memory_are_measured_when_asked():
    measure = Measure(correctness=None, latency=LatencySettings(0.01, 0.05, 3), memory=True)
    measurement = measure_case(toys.Toy("toy", toys.exact_attention), small_case(), {}, measure)
    assert measurement.correctness is None
    assert len(measurement.latency.samples_s) >= 3 and measurement.latency.median_s > 0
    assert measurement.memory.allocator_peak_bytes >= 2 * 4 * 128 * 32 * 4  # at least the output


class MeanQuery(Implementation):
    """An approximation that mixes query rows: every row attends with the mean query."""

    name = "mean_query"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"

    def prepare(self, case, options):
        def attention(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q.mean(-2, keepdim=True).expand_as(q), k, v)

        return attention

    def reference(self, q, k, v, case, options, rows):
        return self.prepare(case, options)(q, k, v)[:, :, rows]


def test_row_mixing_approximations_are_not_misjudged_on_sampled_rows():
    """dq at a sampled row depends on every row's upstream gradient here, so the own reference's
    gradients are only compared when all rows are checked."""
    settings = dataclasses.replace(CORRECTNESS_ONLY, correctness=CorrectnessSettings(rows=16))
    sampled = measure_case(MeanQuery(), TRAINING_FULL_HEADS, {}, settings)
    assert sampled.status == "ok" and set(sampled.correctness.own) == {"out"}
    every_row = measure_case(MeanQuery(), TRAINING_FULL_HEADS, {}, CORRECTNESS_ONLY)
    assert every_row.status == "ok" and set(every_row.correctness.own) == {"out", "dq", "dk", "dv"}


def test_set_up_in_prepare_is_reported_apart_from_the_timed_calls():
    """A compiled kernel's compile time (or any set-up in prepare) is the row's prepare_s; it is
    never part of a latency sample."""
    import time

    class SlowToPrepare(toys.Toy):
        def prepare(self, case, options):
            time.sleep(0.3)
            return super().prepare(case, options)

    latency_only = Measure(correctness=None, latency=LatencySettings(0.01, 0.05, 3), memory=False)
    latency = measure_case(SlowToPrepare("toy", toys.exact_attention), small_case(), {}, latency_only).latency
    assert latency.prepare_s >= 0.3
    assert max(latency.samples_s) < 0.3 and latency.first_call_s < 0.3


def test_row_cosines_see_direction_apart_from_scale():
    # Twice the exact output: every row points the right way (cosine 1) though the relative
    # error is 1; one row reversed: the worst cosine is -1 while the mean stays near 1.
    doubled = measure_case(toys.Toy("doubled", lambda q, k, v: 2 * toys.exact_attention(q, k, v)), small_case(), {},
                           CORRECTNESS_ONLY).correctness.exact["out"]
    assert doubled.rel_fro == pytest.approx(1.0, abs=1e-5)
    assert doubled.cosine_mean == pytest.approx(1.0, abs=1e-6) and doubled.cosine_worst == pytest.approx(1.0, abs=1e-6)

    def one_row_reversed(q, k, v):
        out = toys.exact_attention(q, k, v).clone()
        out[..., 0, :] *= -1  # row 0 is always among the rows checked
        return out

    reversed_row = measure_case(toys.Toy("reversed", one_row_reversed), small_case(), {},
                                CORRECTNESS_ONLY).correctness.exact["out"]
    assert reversed_row.cosine_worst == pytest.approx(-1.0, abs=1e-6)
    assert 0.95 < reversed_row.cosine_mean < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_single_non_finite_value_anywhere_is_found(dtype):
    from attnbench.measuring.correctness import all_finite

    clean = torch.randn(2, 3, 17, 8).to(dtype)
    assert all_finite(clean) and all_finite(clean[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in (0, 101, clean.numel() - 1):
            dirty = clean.clone()
            dirty.view(-1)[position] = bad
            assert not all_finite(dirty), (bad, position)


def test_an_approximation_whose_reference_answers_none_is_reported_not_blamed():
    """reference() may return None: the point is then reported against exact attention only."""
    in_process = measure_case(toys.NoReferenceHere(), small_case(), {}, CORRECTNESS_ONLY)
    isolated = toys.run_alone(toys.NoReferenceHere(), small_case(), CORRECTNESS_ONLY).outcome
    for measurement in (in_process, isolated):
        assert measurement.status == "ok", measurement.reasons
        correctness = measurement.correctness
        assert correctness.judged_against is None and not correctness.own  # error reported, not judged
        assert correctness.exact["out"].max_abs < 1e-5
