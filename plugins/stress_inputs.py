"""Synthetic stress sources: each builds one pattern trained models show, in isolation, at
every length, so an approximation's error on it says which pattern it fails.

- ``sink``: an attention sink on the first token. Every query gives about half of its
  attention mass (0.5-0.6) to key 0 (as causal language models' first token draws up to half of it).
  A sliding window without global tokens loses that mass; a global token keeps it.
- ``low_entropy``: one dominant key per query (at a random position, earlier than the query
  when causal), holding about 0.8-0.95 of the mass: attention as a lookup. Smoothing methods
  (random features, landmarks) blur it; a window finds it only when it is near.
- ``outliers``: two channels of q and k that are large (mean 4, standard deviation 2, against
  1 elsewhere), as the outlier features of large models. The logits spread 2-3 times as widely
  as on Gaussian inputs, mostly along those channels, and the large norms inflate the variance
  of positive random features.

q, k, v are float32 and seeded like the built-in sources; v is N(0, 1) throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attnbench

SINK_QUERY_WEIGHT = 2.0  # the queries' shared component along the sink's direction
DOMINANT_MARGIN = 4.0  # the dominant key's logit is ln(N) + this
OUTLIER_CHANNELS = 2
OUTLIER_MEAN, OUTLIER_STD = 4.0, 2.0


def _normal(case: attnbench.Case, heads: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((case.batch, heads, case.seq_len, case.head_dim), generator=generator)


def _per_query_head(kv: torch.Tensor, case: attnbench.Case) -> torch.Tensor:
    return kv.repeat_interleave(case.heads // case.kv_heads, dim=1)


class SinkInputs(attnbench.InputSource):
    name = "sink"
    description = "an attention sink: every query gives about half its attention mass to the first key"

    def draw(self, case: attnbench.Case, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        dim, length = case.head_dim, case.seq_len
        direction = F.normalize(torch.randn((case.batch, case.kv_heads, 1, dim), generator=generator), dim=-1)
        shared = _per_query_head(direction, case)
        q = _normal(case, case.heads, generator)
        q = q - (q * shared).sum(-1, keepdim=True) * shared + SINK_QUERY_WEIGHT * shared
        k, v = _normal(case, case.kv_heads, generator), _normal(case, case.kv_heads, generator)
        # Other logits have variance |q|²/d; key 0's logit is set so that e^logit equals the
        # expected sum of the others' (half the mass at every length).
        variance = (dim - 1 + SINK_QUERY_WEIGHT**2) / dim
        logit = math.log(max(length - 1, 1)) + variance / 2
        k[:, :, 0] = (logit * math.sqrt(dim) / SINK_QUERY_WEIGHT) * direction[:, :, 0]
        return q, k, v


class LowEntropyInputs(attnbench.InputSource):
    name = "low_entropy"
    description = "one dominant key per query (about 0.8-0.95 of its attention mass)"

    def draw(self, case: attnbench.Case, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        length, dim = case.seq_len, case.head_dim
        k, v = _normal(case, case.kv_heads, generator), _normal(case, case.kv_heads, generator)
        positions = torch.arange(length)
        if case.causal:  # a key the query can see: 0..i
            chosen = (torch.rand((case.batch, case.heads, length), generator=generator) * (positions + 1)).long()
        else:
            chosen = torch.randint(length, (case.batch, case.heads, length), generator=generator)
        keys = torch.gather(_per_query_head(k, case), 2, chosen[..., None].expand(-1, -1, -1, dim))
        margin = math.log(length) + DOMINANT_MARGIN  # q·k_j/√d for the chosen key j
        q = margin * math.sqrt(dim) * keys / keys.pow(2).sum(-1, keepdim=True)
        return q, k, v


class OutlierInputs(attnbench.InputSource):
    name = "outliers"
    description = "two large channels in q and k (mean 4, std 2), as large models' outlier features"

    def draw(self, case: attnbench.Case, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        q, k, v = (_normal(case, heads, generator) for heads in (case.heads, case.kv_heads, case.kv_heads))
        channels = min(OUTLIER_CHANNELS, case.head_dim)
        for tensor in (q, k):
            tensor[..., :channels] = OUTLIER_MEAN + OUTLIER_STD * tensor[..., :channels]
        return q, k, v


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    for source in (SinkInputs(), LowEntropyInputs(), OutlierInputs()):
        registry.add(source)
