"""axial: the two passes match their float64 form; grids that do not exist are refused with the reason."""

from __future__ import annotations

import pytest

from attnbench.contract.errors import NotSupported
from attnbench.measuring.in_process import measure_case
from attnbench.testing import CORRECTNESS_ONLY, check_implementation, small_case, small_cases


def test_matches_its_two_dense_passes(registry):
    measurements = check_implementation(registry.get("axial"))  # N=128: an 8 × 16 grid
    # Every square case; chunked prefill and decode are refused with the reason why.
    assert len(measurements) == len([case for case in small_cases() if not (case.chunked or case.decode)])
    for measurement in measurements.values():
        assert measurement.correctness.judged_against == "own"


def test_a_given_shape_is_used(registry):
    cases = [small_case(seq_len=96, causal=causal) for causal in (False, True)]
    check_implementation(registry.get("axial"), cases, options={"shape": [4, 24]})


def test_a_prime_length_has_no_grid(registry):
    reasons = registry.get("axial").not_supported_reasons(small_case(seq_len=127))
    assert reasons and reasons[0].startswith("seq_len=127 is prime: no useful grid for axial attention")


def test_a_shape_that_does_not_tile_the_sequence_is_unsupported(registry):
    with pytest.raises(NotSupported, match=r"shape=\[4, 24\] does not tile seq_len=128"):
        measure_case(registry.get("axial"), small_case(), {"shape": [4, 24]}, CORRECTNESS_ONLY)


def test_a_malformed_shape_is_a_suite_error(registry, write_suite):
    from attnbench.contract.errors import UserError
    from attnbench.settings.loader import load_suite

    with pytest.raises(UserError, match=r"options\.axial\.shape: expected null or \[rows, cols\]"):
        load_suite(write_suite("options: {axial: {shape: [4, 0]}}\n"), registry)
