"""performer (FAVOR+): the chunked linear-time computation equals the estimator written out, the
estimate improves with more features, causal outputs never see the future."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from attnbench.measuring.inputs import make_inputs
from attnbench.testing import check_implementation, small_case, small_cases


def test_matches_its_dense_float64_estimator_with_ragged_chunks(registry):
    """Chunks of 48 over N=128: a ragged last chunk, and running maxima across chunks."""
    measurements = check_implementation(registry.get("performer"), options={"chunk_size": 48, "causal_chunk_size": 48})
    assert len(measurements) == len(small_cases())
    for measurement in measurements.values():
        assert measurement.correctness.judged_against == "own"
        assert measurement.correctness.exact["out"].bound is None  # the approximation is reported, not judged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stable_in_half_precision(registry, dtype):
    cases = [small_case(dtype=dtype, seq_len=512, causal=causal) for causal in (False, True)]
    check_implementation(registry.get("performer"), cases)


def _mean_error(performer, features: int, seeds=range(4)) -> float:
    """Relative error against exact attention, where random features work: |q|·|k|/√d small
    (the inputs are scaled by 1/2, logits with std 1/4; at std 1 the estimator's variance swamps it)."""
    case = small_case(seq_len=256, head_dim=64)
    errors = []
    for seed in seeds:
        inputs = make_inputs(case, seed)
        q, k = inputs.q * 0.5, inputs.k * 0.5
        attention = performer.prepare(case, {**performer.default_options, "features": features, "seed": seed})
        exact = F.scaled_dot_product_attention(q, k, inputs.v)
        errors.append(float((attention(q, k, inputs.v) - exact).norm() / exact.norm()))
    return statistics.mean(errors)


def test_error_falls_as_features_grow(registry):
    performer = registry.get("performer")
    few, many = _mean_error(performer, 64), _mean_error(performer, 1024)
    assert many < 0.5 * few, (few, many)


def test_orthogonal_features_are_no_worse_than_independent_ones(registry):
    performer = registry.get("performer")
    case = small_case(seq_len=256, head_dim=64)
    errors = {}
    for orthogonal in (True, False):
        runs = []
        for seed in range(6):
            inputs = make_inputs(case, seed)
            q, k = inputs.q * 0.5, inputs.k * 0.5
            options = {**performer.default_options, "features": 128, "seed": seed, "orthogonal": orthogonal}
            exact = F.scaled_dot_product_attention(q, k, inputs.v)
            runs.append(float((performer.prepare(case, options)(q, k, inputs.v) - exact).norm() / exact.norm()))
        errors[orthogonal] = statistics.mean(runs)
    assert errors[True] <= 1.05 * errors[False], errors


def test_invalid_options_are_refused(registry, write_suite):
    from attnbench.contract.errors import UserError
    from attnbench.settings.loader import load_suite

    with pytest.raises(UserError, match=r"options\.performer\.features: must be at least 1, got 0"):
        load_suite(write_suite("options: {performer: {features: 0}}\n"), registry)
