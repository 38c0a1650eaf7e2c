"""The built-in implementations: correct on small cases, honest about where they run, and
their peak memory where the arithmetic says it must be."""

from __future__ import annotations

import pytest

import toys

from attnbench.settings.suite import Measure
from attnbench.testing import check_implementation, small_case, small_cases


@pytest.mark.parametrize("name", ["naive", "flash"])
def test_exact_on_every_small_case(registry, name):
    measurements = check_implementation(registry.get(name))
    assert len(measurements) == len(small_cases())  # every one supported
    for measurement in measurements.values():
        assert measurement.correctness.judged_against == "exact"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["naive", "flash"])
def test_within_tolerance_in_half_precision(registry, name, dtype):
    import torch

    cases = [small_case(dtype=getattr(torch, dtype), causal=True, mode="forward_backward")]
    check_implementation(registry.get(name), cases)


def test_flash_names_the_devices_it_supports(registry):
    reasons = registry.get("flash").not_supported_reasons(small_case(device="mps"))
    assert reasons == ["device=mps (supported: cpu, cuda)"]


def _peak_memory(implementation, case):
    outcome = toys.run_alone(implementation, case, Measure(correctness=None, latency=None, memory=True), 120,
                             None).outcome
    assert outcome.status == "ok", outcome
    return outcome.memory


def test_peak_memory_matches_the_arithmetic(registry):
    """naive holds the scores and the probabilities at once; flash only its output and tiles."""
    case = small_case(batch=1, heads=8, seq_len=2048, head_dim=64)
    scores_bytes = case.batch * case.heads * case.seq_len**2 * 4  # one N×N float32 matrix per head
    output_bytes = case.batch * case.heads * case.seq_len * case.head_dim * 4

    naive = _peak_memory(registry.get("naive"), case)
    expected = 2 * scores_bytes  # 256 MiB; the output and q·scale add 2 % on top
    assert expected <= naive.allocator_peak_bytes <= 1.05 * expected
    assert 0.9 * expected <= naive.rss_peak_bytes <= 1.2 * expected

    flash = _peak_memory(registry.get("flash"), case)
    assert output_bytes <= flash.allocator_peak_bytes <= 2 * output_bytes
    assert flash.rss_peak_bytes <= 4 * output_bytes


@pytest.mark.parametrize("name", ["naive", "flash", "performer", "sparse", "axial", "hybrid"])
def test_causal_outputs_never_depend_on_later_tokens(registry, name):
    """Changing keys and values from position 70 on leaves outputs before 70 as they were."""
    import torch

    from attnbench.measuring.inputs import make_inputs

    case = small_case(seq_len=128, causal=True, dtype=torch.float64)
    implementation = registry.get(name)
    if implementation.not_supported_reasons(case):
        pytest.skip(f"{name} does not run float64 here")
    options = {
        "performer": {"causal_chunk_size": 32},
        "sparse": {"window": 16, "global_tokens": 2, "backend": "blocked"},
        "hybrid": {"window": 16, "block_size": 16, "features": 32},
    }
    options = options.get(name, {})
    attention = implementation.prepare(case, {**implementation.default_options, **options})
    inputs = make_inputs(case, 0)
    later_k, later_v = inputs.k.clone(), inputs.v.clone()
    later_k[:, :, 70:] *= 3
    later_v[:, :, 70:] += 1
    before = attention(inputs.q, inputs.k, inputs.v)[:, :, :70]
    after = attention(inputs.q, later_k, later_v)[:, :, :70]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


def test_flex_is_exact_forward_and_says_torch_has_no_cpu_backward(registry):
    """FlexAttention, compiled: causal through the block mask built here, also when N is not a
    multiple of its 128-wide blocks, and with grouped-query heads."""
    import torch

    flex = registry.get("flex")
    cases = [small_case(seq_len=200, causal=True, kv_heads=2), small_case(seq_len=200, dtype=torch.bfloat16)]
    measurements = check_implementation(flex, cases)
    assert len(measurements) == 2
    assert all(measurement.correctness.judged_against == "exact" for measurement in measurements.values())
    backward = small_case(mode="forward_backward")
    assert flex.not_supported_reasons(backward) == ["FlexAttention has no backward on the CPU"]


@pytest.mark.parametrize("name", ["sdpa_mem_efficient", "sdpa_cudnn"])
def test_cuda_only_sdpa_backends_say_so_on_the_cpu(registry, name):
    assert registry.get(name).not_supported_reasons(small_case()) == ["device=cpu (supported: cuda)"]


def test_a_pinned_backend_refusing_the_real_call_makes_the_point_unsupported(registry):
    """The tiny call that asks torch cannot show every limit (one on N, say): a refusal at the
    real call is still torch's reason and an unsupported point, never an error or another kernel.
    Here the memory-efficient backend, which the CPU lacks, stands in for such a limit."""
    import torch
    from attnbench_plugins import sdpa

    import attnbench

    case = small_case()
    attention = registry.get("sdpa_mem_efficient").prepare(case, {})
    q = torch.randn(case.batch, case.heads, case.seq_len, case.head_dim)
    with pytest.raises(attnbench.NotSupported, match="No viable backend"):
        attention(q, q, q)
    assert sdpa._refusals(lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))) == ()
