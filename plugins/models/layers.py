"""Driving a model's ``layer_steps``: each layer's q, k, v to an attention the driver chooses, its
output back, until the last hidden states (the models' own forward pass, and issue 33's model pass)."""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

Steps = Generator[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]
# (layer index, q, k, v) -> the layer's attention output
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_layers(steps: Steps, attention: Attention) -> torch.Tensor:
    """The hidden states after the last layer, each layer's attention computed by ``attention``."""
    q, k, v = next(steps)
    index = 0
    while True:
        try:
            q, k, v = steps.send(attention(index, q, k, v))
        except StopIteration as end:
            return end.value
        index += 1


def capturing(steps: Steps, attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              wanted: set[int]) -> tuple[dict[int, tuple[torch.Tensor, ...]], torch.Tensor]:
    """One window's pass (a batch of one) with ``attention`` in every layer: q, k, v of the
    ``wanted`` layers, each (heads, N, D), and the last hidden states (N, hidden)."""
    captured = {}

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if index in wanted:
            captured[index] = (q[0].contiguous(), k[0].contiguous(), v[0].contiguous())
        return attention(q, k, v)

    hidden = run_layers(steps, attend)
    return captured, hidden[0]
