"""Input distributions: seeded, and the structured one has the structure it promises."""

from __future__ import annotations

import torch

from attnbench.measuring.inputs import make_inputs
from attnbench.testing import small_case


def test_inputs_are_seeded_and_shaped_for_grouped_heads():
    for inputs in ("gaussian", "structured"):
        case = small_case(heads=4, kv_heads=2, inputs=inputs, mode="forward_backward")
        first, again, other = make_inputs(case, 1), make_inputs(case, 1), make_inputs(case, 2)
        assert first.q.shape == (2, 4, 128, 32) and first.k.shape == (2, 2, 128, 32)
        assert torch.equal(first.q, again.q) and torch.equal(first.v, again.v)
        assert not torch.equal(first.q, other.q)
        assert first.grad_out is not None and first.q.requires_grad


def test_structured_attention_has_local_and_global_mass():
    seq_len, window = 4096, 256
    inputs = make_inputs(small_case(batch=1, heads=2, seq_len=seq_len, head_dim=64, inputs="structured"), 0)
    rows = torch.arange(0, seq_len, 16)
    weights = ((inputs.q[:, :, rows] @ inputs.k.transpose(-1, -2)) / 8).softmax(dim=-1)
    distance = (rows[:, None] - torch.arange(seq_len)[None]).abs()
    local = float((weights * (distance <= window)).sum(-1).mean())
    assert 0.4 < local < 0.7, local  # strong local mass, and plenty beyond the window
    near = float((weights * (distance <= 16)).sum(-1).mean())
    assert near > 0.2, near  # concentrated: 33 of 4096 keys hold over a fifth of it
    gaussian = make_inputs(small_case(batch=1, heads=2, seq_len=seq_len, head_dim=64), 0)
    spread = ((gaussian.q[:, :, rows] @ gaussian.k.transpose(-1, -2)) / 8).softmax(dim=-1)
    assert float((spread * (distance <= window)).sum(-1).mean()) < 0.15  # no locality there


def _attention_weights(inputs, case) -> torch.Tensor:
    k = inputs.k.repeat_interleave(case.heads // case.kv_heads, dim=1)
    scores = inputs.q @ k.transpose(-1, -2) / case.head_dim**0.5
    if case.causal:
        scores = scores.masked_fill(torch.ones(case.seq_len, case.seq_len, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


def test_stress_sources_build_the_pattern_they_name(registry):
    for causal in (False, True):
        for seq_len, head_dim in ((512, 64), (2048, 32)):
            shape = dict(batch=1, heads=4, kv_heads=2, seq_len=seq_len, head_dim=head_dim, causal=causal)
            later = slice(seq_len // 2, None)  # rows that see many keys, causal or not
            case = small_case(inputs="sink", **shape)
            sink = _attention_weights(make_inputs(case, 0, registry.input_sources["sink"]), case)[..., later, 0]
            assert 0.4 < float(sink.mean()) < 0.65, float(sink.mean())
            case = small_case(inputs="low_entropy", **shape)
            top = _attention_weights(make_inputs(case, 0, registry.input_sources["low_entropy"]), case)
            assert float(top[..., later, :].max(-1).values.mean()) > 0.75
            case = small_case(inputs="outliers", **shape)
            outliers = make_inputs(case, 0, registry.input_sources["outliers"])
            assert float(outliers.k[..., :2].mean()) > 3 and abs(float(outliers.k[..., 2:].mean())) < 0.1
            gaussian = small_case(**shape)
            spread = _attention_weights(make_inputs(case, 0, registry.input_sources["outliers"]), case)
            assert float(spread.max(-1).values.mean()) > 3 * float(
                _attention_weights(make_inputs(gaussian, 0), gaussian).max(-1).values.mean())
