"""performer: FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

The softmax kernel exp(q·k/√d) is estimated with positive random features (Lemma 1),

    φ(x) = exp(ω·x̃ − |x̃|²/2),  x̃ = x / d^¼,  ω₁…ωₘ ~ N(0, I_d),

drawn as orthogonal blocks (section 2.4), so that attention becomes linear in N (eq. 4):

    out = φ(Q) (φ(K)ᵀ [V, 1])   (the last column is the denominator).

As in the authors' reference code, each exponential is stabilised by subtracting a maximum
of ω·x̃ (per query row; for keys, one per batch and head) and a small ``epsilon`` is added to
every feature. The epsilon floors the denominator; where the estimator's variance is large
(large |q|·|k|) it also pulls the output towards the mean of v. Because of the epsilon, the
key stabiliser is not a pure no-op, so it is defined with care: for causal attention, query
i's features are those stabilised by the maximum over keys j <= i only, so no output depends
on a later key (one maximum over all keys, as in the reference code, leaks the future).

The sums over keys run chunk by chunk (``chunk_size`` rows; causal: ``causal_chunk_size``, which
also sizes the masked products inside each chunk), with the key maximum kept as a
running maximum and earlier sums rescaled when it grows, as FlashAttention does for softmax:
the (N × m) feature matrices are never materialised, memory is O(N·d + chunk·m), and each
chunk's work stays in cache. Causal attention adds, per chunk, the masked (chunk × chunk)
products inside the chunk to the prefix state of the earlier chunks; nothing loops over
positions. Features are computed in float32 for float16 and bfloat16 inputs, whose range the
exponentials would otherwise overflow or underflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from attnbench_plugins.precision import compute_dtype, compute_dtype_for

import attnbench
from attnbench import AttentionFn, Case
from attnbench.contract.work import random_features, timed_call

LOG2_E = 1.0 / math.log(2.0)  # e^x = 2^(x·log₂e): exp2 runs at about twice exp's rate on CPUs
REFERENCE_KEY_BLOCK = 4096  # keys per block of the float64 reference: its (rows × block × m) weights stay small


class PerformerAttention(attnbench.Implementation):
    name = "performer"
    description = "FAVOR+ positive orthogonal random features: softmax attention in linear time"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "1"  # a step updates sums of fixed size, whatever n
    decode_memory_complexity = "1"  # the key sums: m × (D + 1) per kv head
    # Rows per chunk: large enough that the chunk's products run near the matmul kernels' rate,
    # small enough that its (rows × m) features stay in cache; causal chunks also hold the
    # masked (c × c) products, whose cost grows with c.
    default_options = {"features": 256, "seed": 0, "orthogonal": True, "epsilon": 1e-4, "chunk_size": 256,
                       "causal_chunk_size": 128}

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        problems = {}
        for key in ("features", "chunk_size", "causal_chunk_size"):
            if options[key] < 1:
                problems[key] = f"must be at least 1, got {options[key]}"
        if options["epsilon"] < 0:
            problems["epsilon"] = f"must be at least 0, got {options['epsilon']}"
        return problems

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        favor, causal = _favor(case, options), case.causal

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            grouped_q, k, v = _grouped(q, k, v, case)
            return _ungrouped(favor.attention(grouped_q, k, v, causal), q)

        return attention

    def prepare_decode(self, case: Case, options: Mapping[str, Any], k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> attnbench.DecodeStep:
        """The state is the key sums over the cache (the recurrent form of FAVOR+); a step adds its
        tokens' features to a copy of it, so it costs the same whatever the cache's length."""
        favor, causal = _favor(case, options), case.causal
        k_cache, v_cache = _keys_values(k_cache, v_cache)
        state = favor.key_sums(k_cache, v_cache)
        del k_cache, v_cache  # the cache itself is not kept

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            grouped_q, k, v = _grouped(q, k, v, case)
            return _ungrouped(favor.attention(grouped_q, k, v, causal, earlier=state), q)

        return step

    def step_bytes(self, case: Case, options: Mapping[str, Any]) -> attnbench.ByteCount:
        """The key sums read (float32, (m + 1) × (D + 1) per kv head), the projection, the new
        tokens and the output: nothing grows with the cache."""
        b, h, kv, q, d, m = case.batch, case.heads, case.kv_heads, case.query_len, case.head_dim, options["features"]
        size = case.dtype.itemsize
        return attnbench.ByteCount(4.0 * (b * kv * (m + 1) * (d + 1) + d * m) + size * 2.0 * b * q * d * (h + kv),
                                   f"(B·KV·(m+1)·(D+1) + D·m) × 4 + 2·B·q·D·(H+KV) × {size} bytes, m={m}")

    def flops(self, case: Case, options: Mapping[str, Any]) -> attnbench.FlopCount:
        """φ(Q), φ(K), φ(K)ᵀ[V, 1] and φ(Q)·(that): 4·B·(H+KV)·N·m·D; causal adds each chunk's
        masked (c × c) products, 2·B·H·N·c·(m+D)."""
        return timed_call(case, *random_features(case, options["features"], options["causal_chunk_size"]))

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case, options: Mapping[str, Any],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The same estimator written out in float64: the weights φ(qᵢ)·φ(kⱼ) with φ = e + ε, each
        query's keys stabilised by the maximum up to it, summed over blocks of keys (per kv head,
        so a long cache never needs an (N × m) tensor per query head). The maxima are constants
        here too (detached), so the gradients are comparable."""
        projection = _scaled_projection(case, options).to(q.dtype)
        eps, half_norm_scale, features = options["epsilon"], 0.5 * case.head_dim**-0.5, projection.shape[1]
        batch, heads, _, dim = q.shape
        kv_heads = case.kv_heads
        positions = rows + (k.shape[-2] - q.shape[-2])  # the queries are the last positions
        queries = q[:, :, rows].reshape(batch, kv_heads, heads // kv_heads, len(rows), dim)  # (B, KV, G, S, D)
        q_logits = queries @ projection
        eq = torch.exp(q_logits - q_logits.detach().amax(dim=-1, keepdim=True)
                       - queries.square().sum(dim=-1, keepdim=True) * half_norm_scale)  # (B, KV, G, S, m)
        blocks = list(zip(k.split(REFERENCE_KEY_BLOCK, dim=2), v.split(REFERENCE_KEY_BLOCK, dim=2), strict=True))
        key_max = torch.cat([(block @ projection).detach().amax(dim=-1) for block, _ in blocks], dim=-1)  # (B, KV, N)
        top = key_max.amax(dim=-1, keepdim=True)
        own = key_max.cummax(dim=-1).values[:, :, positions] if case.causal else top  # each query's stabiliser
        rescale = torch.exp(top - own)[:, :, None, :, None]  # from the global maximum to the query's own
        query_part = eps * eq.sum(dim=-1, keepdim=True) + features * eps * eps
        numerator, denominator, start = 0.0, 0.0, 0
        for block_k, block_v in blocks:
            ek = torch.exp(block_k @ projection - block_k.square().sum(dim=-1, keepdim=True) * half_norm_scale
                           - top.unsqueeze(-1)).unsqueeze(2)  # (B, KV, 1, b, m)
            weights = (eq @ ek.transpose(-1, -2) + eps * ek.sum(dim=-1).unsqueeze(-2)) * rescale + query_part
            if case.causal:
                later = torch.arange(start, start + block_k.shape[-2]) > positions.unsqueeze(-1)
                weights = weights.masked_fill(later, 0.0)
            numerator = numerator + weights @ block_v.unsqueeze(2)
            denominator = denominator + weights.sum(dim=-1, keepdim=True)
            start += block_k.shape[-2]
        return (numerator / denominator).reshape(batch, heads, len(rows), dim)


def _favor(case: Case, options: Mapping[str, Any]) -> FavorPlus:
    projection = _scaled_projection(case, options).to(device=case.device, dtype=compute_dtype_for(case.dtype))  # (D, m)
    chunk = options["causal_chunk_size" if case.causal else "chunk_size"]
    return FavorPlus(projection * LOG2_E, 0.5 * case.head_dim**-0.5, options["epsilon"], chunk)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case) -> tuple[torch.Tensor, ...]:
    """In the compute dtype, grouped-query shaped: q (B, KV, G, S, D), so each kv head's sums serve
    its G query heads; k and v (B, KV, 1, N, D). Features are computed in float32 for float16
    and bfloat16, whose range the exponentials would leave."""
    batch, heads, rows, head_dim = q.shape
    q = q.to(compute_dtype(q)).view(batch, case.kv_heads, heads // case.kv_heads, rows, head_dim)
    return (q, *_keys_values(k, v))


def _keys_values(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, KV, 1, N, D) each, in the compute dtype."""
    return k.to(compute_dtype(k)).unsqueeze(2), v.to(compute_dtype(v)).unsqueeze(2)


def scaled_square_norms(x: torch.Tensor, scale: float) -> torch.Tensor:
    """|x|² · scale per row (…, N, 1), as a norm: no (N × D) temporary of squares."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square().mul_(scale)


def _ungrouped(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.reshape(like.shape).to(like.dtype)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: numerator and denominator summed at once."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _scaled_projection(case: Case, options: Mapping[str, Any]) -> torch.Tensor:
    """(D, m) random projection with x̃ = x / d^¼ folded in: one (m × d) scaling, not (N × d) per call."""
    generator = torch.Generator().manual_seed(options["seed"])
    omega = random_projection(options["features"], case.head_dim, options["orthogonal"], generator)
    return (omega * case.head_dim**-0.25).T.contiguous()


class FavorPlus:
    """FAVOR+ with a fixed projection. Shapes: q (B, KV, G, N, D); k and v (B, KV, 1, N, D).

    Arranged so that the (rows × m) features cost one product, one subtraction and one
    exponential each: the projection carries a factor log₂e, so features are powers of 2 (exp2
    runs at about twice exp's rate on CPUs) and stabilisers are in base-2 units; the factor
    e^(−|x̃|²/2) of each row enters the exponent with the row's stabiliser.
    """

    def __init__(self, projection: torch.Tensor, half_norm_scale: float, epsilon: float, chunk: int) -> None:
        self.projection = projection  # (D, m), already scaled by d^-¼ and log₂e
        self.norm_scale = half_norm_scale * LOG2_E  # |x̃|²/2 in base-2 units = |x|² · norm_scale
        self.epsilon = epsilon
        self.chunk = chunk

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, earlier: KeySums | None = None
    ) -> torch.Tensor:
        """The queries are the last of the keys' positions; ``earlier``: the sums over keys
        before all of these (a decode step's state), or None."""
        prefix = k.shape[-2] - q.shape[-2]
        if prefix:  # chunked prefill: the earlier keys enter as sums, the chunk as itself
            sizes = [prefix, q.shape[-2]]
            (k_before, k), (v_before, v) = k.split(sizes, dim=-2), v.split(sizes, dim=-2)
            earlier = self.key_sums(k_before, v_before, earlier)
        return self._causal(q, k, v, earlier) if causal else self._non_causal(q, k, v, earlier)

    # Chunks come from split(), never from slicing in the loop: the backward of a slice fills a
    # gradient as large as the whole input, which made training quadratic in the chunk count.

    def key_sums(self, k: torch.Tensor, v: torch.Tensor, earlier: KeySums | None = None) -> KeySums:
        """The sums over these keys, added to ``earlier`` (a new KeySums: ``earlier`` is unchanged)."""
        keys = earlier if earlier is not None else KeySums.empty(v, self.projection.shape[1])
        for chunk_k, chunk_v, norms in zip(*self._chunks(k, v, self._half_norms(k)), strict=True):
            logits = chunk_k @ self.projection
            keys = keys.rescaled_to(torch.maximum(keys.stabiliser, logits.detach().amax(dim=(-2, -1), keepdim=True)))
            keys = keys.plus(logits.sub_(keys.stabiliser + norms).exp2_(), with_ones(chunk_v))
        return keys

    def _non_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, earlier: KeySums | None) -> torch.Tensor:
        keys = self.key_sums(k, v, earlier)
        # Σⱼ φ(qᵢ)·φ(kⱼ) [vⱼ, 1] with φ = e + ε is e_q(i)·(products + ε·values) + (ε·weighted + m·ε²·values):
        # the ε terms fold into the product's right side and one row added to every query's sums.
        eps, features = self.epsilon, self.projection.shape[1]
        products = keys.products.transpose(-1, -2) + eps * keys.values  # (B, KV, 1, m, D+1)
        constant = eps * keys.weighted() + (features * eps * eps) * keys.values
        outputs = []
        for chunk_q, norms in zip(*self._chunks(q, self._half_norms(q)), strict=True):
            sums = torch.matmul(self._query_features(chunk_q, norms), products).add_(constant)
            outputs.append(sums[..., :-1] / sums[..., -1:])
        return torch.cat(outputs, dim=-2)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, earlier: KeySums | None) -> torch.Tensor:
        keys = earlier if earlier is not None else KeySums.empty(v, self.projection.shape[1])
        eps, features = self.epsilon, self.projection.shape[1]
        outputs = []
        chunks = self._chunks(q, self._half_norms(q), k, self._half_norms(k), v)
        for chunk_q, query_norms, chunk_k, key_norms, chunk_v in zip(*chunks, strict=True):
            chunk_v1 = with_ones(chunk_v)
            logits = chunk_k @ self.projection
            # The maximum over keys up to each position (B, KV, 1, C, 1): query i's own stabiliser.
            upto = torch.cummax(logits.detach().amax(dim=-1, keepdim=True), dim=-2).values
            upto = torch.maximum(upto, keys.stabiliser)
            keys = keys.rescaled_to(upto[..., -1:, :])
            ek = logits.sub_(keys.stabiliser + key_norms).exp2_()  # (B, KV, 1, C, m)
            eq = self._query_features(chunk_q, query_norms)  # (B, KV, G, C, m)
            # Within the chunk: Σ_{j <= i} (e_q(i) + ε)·e_k(j) [v_j, 1].
            pairs = eq @ ek.transpose(-1, -2)
            if eps:
                pairs.add_(eps * ek.sum(dim=-1).unsqueeze(-2))
            within = pairs.tril_() @ chunk_v1
            # The earlier chunks, and the ε·(e_q + ε) terms of every key up to i. The sums holding
            # e_k are relative to the chunk's stabiliser; 2^(M_i − M_chunk) <= 1 brings the rest,
            # which holds no e_k, to query i's own (it scales numerator and denominator alike).
            read = eq @ keys.with_feature_sums()  # its last column: Σ e_q(i)
            own_scale = torch.exp2(upto - keys.stabiliser)
            free = own_scale * (eps * read[..., -1:] + features * eps * eps)
            values = keys.values + chunk_v1.cumsum(dim=-2)
            sums = within.add_(read[..., :-1]).add_(eps * keys.weighted()).add_(free * values)
            outputs.append(sums[..., :-1] / sums[..., -1:])
            keys = keys.plus(ek, chunk_v1)
        return torch.cat(outputs, dim=-2)

    def _chunks(self, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        return [t.split(self.chunk, dim=-2) for t in tensors]

    def _half_norms(self, x: torch.Tensor) -> torch.Tensor:
        """|x̃|²/2 per row, in base-2 units (…, N, 1): the features' factor e^(−|x̃|²/2) as an exponent."""
        return scaled_square_norms(x, self.norm_scale)

    def _query_features(self, q: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """e_q (…, C, m), stabilised by each row's maximum."""
        logits = q @ self.projection
        # Stabilisers are constants of the estimate: they take no gradient, and computing them
        # on a detached view lets the exponential work in place.
        return logits.sub_(logits.detach().amax(dim=-1, keepdim=True) + norms).exp2_()


@dataclass(frozen=True)
class KeySums:
    """Sums over the keys seen so far; those holding e_k are relative to 2^stabiliser."""

    stabiliser: torch.Tensor  # (B, KV, 1, 1, 1): running maximum of ω·k̃·log₂e
    # Σⱼ [vⱼ, 1]ᵀ e_k(j) (B, KV, 1, D+1, m): value-major, so that a chunk's sum is the product
    # [v, 1]ᵀ·e, which runs faster on CPUs than e_kᵀ·[v, 1] does.
    products: torch.Tensor
    values: torch.Tensor  # Σⱼ [vⱼ, 1]  (B, KV, 1, 1, D+1), untouched by the stabiliser

    @classmethod
    def empty(cls, v: torch.Tensor, features: int) -> KeySums:
        batch_shape, width = v.shape[:-2], v.shape[-1] + 1
        options = dict(dtype=v.dtype, device=v.device)
        return cls(
            stabiliser=torch.full((*batch_shape, 1, 1), float("-inf"), **options),
            products=torch.zeros(*batch_shape, width, features, **options),
            values=torch.zeros(*batch_shape, 1, width, **options),
        )

    def weighted(self) -> torch.Tensor:
        """Σⱼ (Σ e_k(j)) [vⱼ, 1] (B, KV, 1, 1, D+1): the products summed over the features."""
        return self.products.sum(dim=-1).unsqueeze(-2)

    def with_feature_sums(self) -> torch.Tensor:
        """[products, 1] (B, KV, 1, m, D+2), a transposed view: a product with e_q then also gives Σ e_q."""
        return torch.cat([self.products, torch.ones_like(self.products[..., :1, :])], dim=-2).transpose(-1, -2)

    def rescaled_to(self, stabiliser: torch.Tensor) -> KeySums:
        scale = torch.exp2(self.stabiliser - stabiliser)  # <= 1; 0 while the sums are empty
        return KeySums(stabiliser, self.products * scale, self.values)

    def plus(self, ek: torch.Tensor, v1: torch.Tensor) -> KeySums:
        """Adds keys with features ``ek`` (relative to this stabiliser) and values ``v1``."""
        return KeySums(self.stabiliser, torch.matmul(v1.transpose(-1, -2), ek).add_(self.products),
                       self.values + v1.sum(dim=-2, keepdim=True))


def random_projection(features: int, dim: int, orthogonal: bool, generator: torch.Generator) -> torch.Tensor:
    """(features × dim) rows ωᵢ ~ N(0, I); orthogonal within each block of ``dim`` rows (section 2.4)."""
    gaussian = torch.randn(features, dim, generator=generator)
    if not orthogonal:
        return gaussian
    blocks = []
    for _ in range(math.ceil(features / dim)):
        orthonormal, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(orthonormal.T)
    directions = torch.cat(blocks)[:features]
    # Row lengths from the norms of Gaussian vectors (chi with d degrees of freedom): each row
    # is still marginally N(0, I), while rows within a block stay orthogonal.
    return directions * gaussian.norm(dim=1, keepdim=True)


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(PerformerAttention())
