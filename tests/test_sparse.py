"""sparse: exact on its pattern (both computations), equal to full attention when the window
covers everything, and never a quadratic matrix."""

from __future__ import annotations

import pytest
import torch

from attnbench.measuring.inputs import make_inputs
from attnbench.measuring.in_process import measure_case
from attnbench.measuring.reference import softmax_attention
from attnbench.testing import CORRECTNESS_ONLY, check_implementation, small_case, small_cases

PATTERNS = [
    {"window": 20, "global_tokens": 0},
    {"window": 20, "global_tokens": 5},  # globals inside the first block, and a ragged last block (128 = 3·40 + 8)
    {"window": 0, "global_tokens": 0},  # only itself
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"window={p['window']},global={p['global_tokens']}")
def test_blocked_path_is_exact_on_its_pattern(registry, pattern):
    options = {**pattern, "backend": "blocked", "block_size": 40}
    square = [case for case in small_cases() if case.query_len == case.key_len]  # the blocked path's shapes
    measurements = check_implementation(registry.get("sparse"), square, options=options)
    assert len(measurements) == len(square)
    for measurement in measurements.values():
        assert measurement.correctness.judged_against == "own"


def test_flex_path_is_exact_on_its_pattern(registry):
    """Compiled FlexAttention (forward only on the CPU); the same pattern check."""
    cases = [small_case(causal=causal, kv_heads=kv_heads) for causal in (False, True) for kv_heads in (4, 2)]
    options = {"window": 24, "global_tokens": 3, "backend": "flex", "flex_block_size": 32}
    measurements = check_implementation(registry.get("sparse"), cases, options)
    assert len(measurements) == len(cases)


def test_flex_training_on_the_cpu_is_unsupported_and_auto_says_which_path_it_took(registry):
    sparse = registry.get("sparse")
    training = small_case(mode="forward_backward")
    forced = {**sparse.default_options, "backend": "flex"}
    from attnbench.contract.errors import NotSupported

    with pytest.raises(NotSupported, match="backend=flex: FlexAttention has no backward on the CPU"):
        measure_case(sparse, training, forced, CORRECTNESS_ONLY)
    auto = measure_case(sparse, training, {**sparse.default_options, "window": 16}, CORRECTNESS_ONLY)
    assert auto.status == "ok" and auto.notes == ("blocked path: FlexAttention has no backward on the CPU",)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_everything_is_exact_attention(registry, causal):
    sparse = registry.get("sparse")
    case = small_case(seq_len=96, causal=causal)
    inputs = make_inputs(case, 0)
    options = {**sparse.default_options, "window": 96, "backend": "blocked", "block_size": 32}
    out = sparse.prepare(case, options)(inputs.q, inputs.k, inputs.v)
    exact = softmax_attention(*(t.double() for t in (inputs.q, inputs.k, inputs.v)), torch.arange(96), causal).out
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["blocked", "flex"])
def test_peak_memory_grows_linearly(registry, backend):
    """Window 64: doubling N from 2048 to 4096 at most doubles the call's peak (plus slack),
    where one N×N score matrix would quadruple it."""
    sparse = registry.get("sparse")
    measure = CORRECTNESS_ONLY.__class__(correctness=None, latency=None, memory=True)
    options = {**sparse.default_options, "window": 64, "backend": backend, "block_size": 64,
               "flex_block_size": 64}
    peaks = {
        seq_len: measure_case(sparse, small_case(batch=1, heads=2, seq_len=seq_len, head_dim=32), options, measure)
        .memory.allocator_peak_bytes
        for seq_len in (2048, 4096)
    }
    assert peaks[4096] < 2.2 * peaks[2048], peaks
    assert peaks[4096] < 0.2 * 2 * 4096**2 * 4, peaks  # well under one N×N float32 matrix per head


@pytest.mark.parametrize("value, shown", [("8", "8"), ("'big'", "'big'"), ("true", "True")])
def test_a_flex_block_size_that_is_not_a_block_is_refused(registry, write_suite, value, shown):
    from attnbench.contract.errors import UserError
    from attnbench.settings.loader import load_suite

    expected = (r"options\.sparse\.flex_block_size: must be null \(per device\) or an integer of at least 16, "
                rf"got {shown}")
    with pytest.raises(UserError, match=expected):
        load_suite(write_suite(f"options: {{sparse: {{flex_block_size: {value}}}}}\n"), registry)


def test_flex_block_size_is_the_devices_unless_given(registry):
    from attnbench_plugins.sparse import FLEX_BLOCK_SIZE, _flex_block_size

    assert _flex_block_size(small_case(), None) == FLEX_BLOCK_SIZE["cpu"]
    assert _flex_block_size(small_case(device="cuda"), None) == FLEX_BLOCK_SIZE["default"]
    assert _flex_block_size(small_case(), 32) == 32
