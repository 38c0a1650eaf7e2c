"""hybrid: equals its own float64 formula, its band is whole blocks covering the window, it is
exact with a window covering everything, and on inputs with local and global structure beats
both of its components."""

from __future__ import annotations

import statistics

import pytest
import torch
from attnbench_plugins.hybrid_steps import band_pairs, block_and_reach, on_band

from attnbench.measuring.inputs import make_inputs
from attnbench.measuring.reference import softmax_attention
from attnbench.testing import check_implementation, small_case, small_cases


@pytest.mark.parametrize("window, block, chunk", [(20, 16, 32), (40, 32, 512)])  # 4 chunks of queries, or 1
def test_matches_its_dense_float64_formula(registry, window, block, chunk):
    options = {"window": window, "block_size": block, "chunk_size": chunk, "features": 64}
    measurements = check_implementation(registry.get("hybrid"), options=options)
    assert len(measurements) == len(small_cases())
    for measurement in measurements.values():
        assert measurement.correctness.judged_against == "own"


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_everything_is_exact_attention(registry, causal):
    hybrid = registry.get("hybrid")
    case = small_case(seq_len=96, causal=causal)
    inputs = make_inputs(case, 0)
    options = {**hybrid.default_options, "window": 96, "block_size": 32, "chunk_size": 32}
    out = hybrid.prepare(case, options)(inputs.q, inputs.k, inputs.v)
    exact = softmax_attention(*(t.double() for t in (inputs.q, inputs.k, inputs.v)), torch.arange(96), causal).out
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq_len, block, window", [(100, 16, 20), (96, 32, 32), (64, 16, 0), (50, 64, 10)])
@pytest.mark.parametrize("causal", [False, True])
def test_the_band_is_whole_blocks_covering_the_window(seq_len, block, window, causal):
    """Every pair within ±window (causal: the window back) is exact, exact pairs come in whole
    blocks of keys, and the count the FLOP declaration uses is the mask's."""
    block, reach = block_and_reach(seq_len, window, block)
    i, j = torch.arange(seq_len).unsqueeze(1), torch.arange(seq_len)
    band = on_band(i, j, block, reach, causal)
    within = ((i - j) <= window) & ((i - j) >= (0 if causal else -window))
    assert bool(band[within].all())
    if causal:
        assert not bool(band[j > i].any())
    else:  # a query's exact keys are a run of whole blocks (cut only by the sequence's ends)
        key_blocks = [set((row.nonzero().squeeze(1) // block).tolist()) for row in band]
        assert all(int(band[q].sum()) == sum(min(seq_len, (c + 1) * block) - c * block for c in blocks)
                   for q, blocks in enumerate(key_blocks))
        assert all(max(blocks) - min(blocks) + 1 == len(blocks) for blocks in key_blocks)
    assert band_pairs(seq_len, block, reach, causal) == int(band.sum())


def _relative_error(registry, name: str, options: dict, case, seed: int) -> float:
    implementation = registry.get(name)
    inputs = make_inputs(case, seed)
    merged = {**implementation.default_options, **options}
    if "seed" in merged:
        merged["seed"] = seed
    out = implementation.prepare(case, merged)(inputs.q, inputs.k, inputs.v).double()
    rows = torch.arange(case.seq_len)
    exact = softmax_attention(*(t.double() for t in (inputs.q, inputs.k, inputs.v)), rows, case.causal).out
    return float((out - exact).norm() / exact.norm())


def test_on_structured_inputs_it_beats_sparse_and_performer(registry):
    """Same window (64) as sparse (hybrid's, in blocks of 32, spans 160 keys against sparse's
    129), same features (256) as performer, seeded structured inputs."""
    case = small_case(batch=1, heads=4, seq_len=1024, head_dim=64, inputs="structured")
    errors = {
        name: statistics.mean(_relative_error(registry, name, options, case, seed) for seed in range(3))
        for name, options in [
            ("sparse", {"window": 64, "backend": "blocked"}),
            ("performer", {"features": 256}),
            ("hybrid", {"window": 64, "features": 256, "block_size": 32}),
        ]
    }
    assert errors["hybrid"] < 0.9 * min(errors["sparse"], errors["performer"]), errors
