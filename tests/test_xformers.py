"""xformers: optional, explained when it cannot run, and correct plumbing where it can.

This machine's xformers has no CPU operator, so the layout and mask plumbing is checked
against a stand-in for ``xformers.ops`` that computes in plain torch with xformers' layout.
"""

from __future__ import annotations

import sys
import types

import attnbench_plugins.xformers_attention as plugin
import pytest
import torch
import torch.nn.functional as F

from attnbench.testing import check_implementation, small_case, small_cases


@pytest.fixture
def fresh_load():
    plugin._load_xformers.cache_clear()
    plugin._refusals.cache_clear()
    yield
    plugin._load_xformers.cache_clear()
    plugin._refusals.cache_clear()


def test_on_a_cpu_the_reasons_are_xformers_own(registry, fresh_load):
    pytest.importorskip("xformers.ops", reason="xformers is not installed here (the test extra installs it)")
    reasons = registry.get("xformers").not_supported_reasons(small_case())
    assert any(reason.startswith("device=cpu (supported: {'cuda'})") for reason in reasons), reasons


def test_without_xformers_the_reason_says_how_to_install_it(registry, fresh_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers...` fail
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    reasons = registry.get("xformers").not_supported_reasons(small_case())
    assert len(reasons) == 1
    assert reasons[0].startswith("xformers is not installed (pip install 'attnbench[xformers]'")


class _LowerTriangularMask:
    pass


class _LowerTriangularFromBottomRightMask:
    pass


def _stand_in_memory_efficient_attention(q, k, v, attn_bias=None):
    """xformers' contract: (B, N, H, D), or (B, N, KV, G, D) with k, v broadcast over G."""
    if q.dim() == 5:
        assert k.stride(3) == 0 and v.stride(3) == 0, "keys and values are broadcast over the group"
    to_bhnd = (lambda t: t.flatten(2, 3).transpose(1, 2)) if q.dim() == 5 else (lambda t: t.transpose(1, 2))
    causal = isinstance(attn_bias, _LowerTriangularMask)
    # In float64: the plumbing is under test, not float32 rounding (SDPA's own float32 dq has been
    # seen 6% over the default tolerance on a fresh draw of structured inputs).
    q64, k64, v64 = (to_bhnd(t).double() for t in (q, k, v))
    mask = None
    if isinstance(attn_bias, _LowerTriangularFromBottomRightMask):
        queries, keys = q64.shape[-2], k64.shape[-2]
        mask = torch.ones(queries, keys, dtype=torch.bool).tril_(keys - queries)
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, is_causal=causal).to(q.dtype)
    out = out.transpose(1, 2)
    return out.unflatten(2, q.shape[2:4]) if q.dim() == 5 else out


def test_layouts_masks_and_groups_reach_xformers_as_it_expects(registry, fresh_load, monkeypatch):
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _stand_in_memory_efficient_attention
    ops.LowerTriangularMask = _LowerTriangularMask
    ops.fmha = types.SimpleNamespace(
        attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=_LowerTriangularFromBottomRightMask))
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    measurements = check_implementation(registry.get("xformers"))
    assert len(measurements) == len(small_cases())  # every one supported


def test_the_refusal_message_becomes_reasons_naming_the_operators():
    message = (
        "No operator found for `memory_efficient_attention_forward` with inputs:\n"
        "     query       : shape=(1, 16, 2, 64) (torch.float32)\n"
        "`cutlassF` is not supported because:\n"
        "    device=cpu (supported: {'cuda'})\n"
        "`fa2F` is not supported because:\n"
        "    device=cpu (supported: {'cuda'})\n"
        "    dtype=torch.float32 (supported: {torch.bfloat16, torch.float16})\n"
    )
    assert plugin._parse_refusal(message) == (
        "device=cpu (supported: {'cuda'}) [xformers cutlassF, fa2F]",
        "dtype=torch.float32 (supported: {torch.bfloat16, torch.float16}) [xformers fa2F]",
    )
