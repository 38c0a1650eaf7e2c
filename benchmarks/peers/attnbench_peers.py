"""Peers to measure against, registered as a third-party attnbench plugin.

Each wraps a widely used implementation as its users call it, at the settings our built-ins
use, so that one `attnbench run` measures both side by side. Nothing here reimplements them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

import attnbench
from attnbench import AttentionFn, Case

INSTALL = (
    "pip install --no-deps performer-pytorch nystrom-attention local-attention einops "
    "axial-positional-embedding hyper-connections torch-einops-utils"
)


def _missing(*modules: str) -> list[str]:
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    return [f"{', '.join(absent)} not installed ({INSTALL})"] if absent else []


def _same_heads(case: Case) -> list[str]:
    if case.kv_heads != case.heads:
        return [f"kv_heads={case.kv_heads} (supported: kv_heads = heads={case.heads})"]
    return []


class LucidrainsPerformer(attnbench.Implementation):
    name = "lucidrains_performer"
    description = "performer-pytorch's FastAttention (FAVOR+), as its users call it"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    default_options = {"features": 256, "seed": 0}

    def not_supported_reasons(self, case: Case) -> list[str]:
        return _missing("performer_pytorch", "einops") + _same_heads(case)

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        from performer_pytorch import FastAttention

        torch.manual_seed(options["seed"])  # it draws its projection from the global generator
        module = FastAttention(dim_heads=case.head_dim, nb_features=options["features"], causal=case.causal)
        return module.to(case.device)  # takes and returns (B, H, N, D)


class LucidrainsNystrom(attnbench.Implementation):
    name = "lucidrains_nystrom"
    description = "nystrom-attention's NystromAttention with its projections set to identity"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    default_options = {"landmarks": 256, "pinv_iterations": 6}

    def not_supported_reasons(self, case: Case) -> list[str]:
        causal = ["causal=True (supported: causal=False)"] if case.causal else []
        return _missing("nystrom_attention", "einops") + _same_heads(case) + causal

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        from nystrom_attention import NystromAttention

        heads, head_dim = case.heads, case.head_dim
        width = heads * head_dim
        # Its module projects x to q, k, v and back; with identities, x = [q | k | v] per token
        # and the attention core is what runs. residual=False: the depthwise conv is not attention.
        module = NystromAttention(
            dim=3 * width, dim_head=head_dim, heads=heads, num_landmarks=options["landmarks"],
            pinv_iterations=options["pinv_iterations"], residual=False,
        )
        module.to_qkv = torch.nn.Identity()
        module.to_out = torch.nn.Identity()
        module = module.to(case.device)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, _, seq_len, _ = q.shape
            # (B, H, N, D) ×3 -> (B, N, 3·H·D): a copy its interface requires, about 1-2 % of its time.
            x = torch.cat([t.transpose(1, 2).reshape(batch, seq_len, width) for t in (q, k, v)], dim=-1)
            return module(x).view(batch, seq_len, heads, head_dim).transpose(1, 2)

        return attention


class LucidrainsLocal(attnbench.Implementation):
    name = "lucidrains_local"
    description = "local-attention's LocalAttention: ±window exactly, no rotary embedding"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    default_options = {"window": 256}

    def not_supported_reasons(self, case: Case) -> list[str]:
        return _missing("local_attention", "einops") + _same_heads(case)

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        from local_attention import LocalAttention

        # Buckets of `window` keys, each query bucket looking one bucket back (and forward unless
        # causal), masked to exactly ±window: the pattern of our `sparse` without global tokens.
        module = LocalAttention(
            window_size=options["window"], causal=case.causal, look_backward=1,
            look_forward=0 if case.causal else 1, exact_windowsize=True, autopad=True, use_rotary_pos_emb=False,
        )
        return module.to(case.device)  # takes and returns (B, H, N, D)


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(LucidrainsPerformer())
    registry.add(LucidrainsNystrom())
    registry.add(LucidrainsLocal())
