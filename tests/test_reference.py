"""The float64 reference: blockwise equals dense, gradients equal autograd, rows are sampled fairly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnbench.measuring.reference as reference
from attnbench.measuring.reference import sample_rows, softmax_attention, softmax_attention_grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_blockwise_forward_and_gradients_match_dense_autograd(monkeypatch, causal, kv_heads):
    monkeypatch.setattr(reference, "KEY_BLOCK", 7)  # several blocks, the last one partial
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq_len, head_dim = 2, 4, 23, 8
    q = torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
    dq, dk, dv = torch.autograd.grad(dense, leaves, grad_out)

    every_row = torch.arange(seq_len)
    forward = softmax_attention(q, k, v, every_row, causal)
    grads = softmax_attention_grads(q, k, v, grad_out, every_row, causal, forward)
    torch.testing.assert_close(forward.out, dense.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads.dq, dq, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads.dk, dk, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads.dv, dv, rtol=0, atol=1e-12)

    some_rows = sample_rows(seq_len, 6, seed=1)
    forward = softmax_attention(q, k, v, some_rows, causal)
    grads = softmax_attention_grads(q, k, v, grad_out, some_rows, causal, forward)
    torch.testing.assert_close(forward.out, dense.detach()[:, :, some_rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads.dq, dq[:, :, some_rows], rtol=0, atol=1e-12)
    assert grads.dk is None and grads.dv is None  # incomplete without every query row


def test_sample_rows_are_sorted_unique_seeded_and_include_both_ends():
    rows = sample_rows(10_000, 50, seed=3)
    assert len(rows) == 50 and rows[0] == 0 and rows[-1] == 9_999
    assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 50
    assert torch.equal(rows, sample_rows(10_000, 50, seed=3))
    assert not torch.equal(rows, sample_rows(10_000, 50, seed=4))
    assert torch.equal(sample_rows(40, 50, seed=3), torch.arange(40))
