"""nystrom: Nyströmformer (Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", AAAI 2021).

The softmax matrix is approximated through m landmarks (eq. 14-15):

    softmax(Q Kᵀ/√d) V ≈ softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V,

where Q̃, K̃ are the means of m contiguous segments of Q and K (section 3.2; when m does not
divide N the segments differ in length by one, nothing is padded) and pinv is the paper's
iterative Moore–Penrose approximation (eq. 16, from Razavi et al., 2014).

The two (N × m) softmax products are attention calls in their own right: m landmark queries
over N keys, and N queries over m landmark keys whose values are pinv · (the first result).
Both go through torch's fused scaled_dot_product_attention, so neither (N × m) matrix is ever
stored, and the (m × m) products are ordered so that nothing costs N·m² (the last product is
applied to the (m × d) values first).

Precision: the two attention calls run in the input's dtype (float32 for float16 and bfloat16,
attnbench_plugins.precision); the landmarks, their (m × m) kernel and the pseudo-inverse iteration
in float64, whatever the input. The kernel is ill-conditioned (condition numbers of 1e5 to 1e8 on
Gaussian inputs; singular on smooth ones, where neighbouring landmarks nearly coincide), and once
the iteration has inverted its small singular values (30 iterations) it amplifies any rounding of
the kernel and of what it multiplies. In float32 the output then missed this very formula in
float64 by up to hundreds of times nystrom's tolerance, on every structured input up to N=2048
and on most Gaussian ones from N=1024: mostly the iteration's own rounding, and at large N the
rounding of the landmarks and the kernel as well. None of it depends on N: the landmarks cost
O(N·D), the rest O(m²·D + t·m³), in float64 at about half float32's rate on CPUs (far less on
consumer GPUs).
Out of reach even so: more iterations than MOST_ITERATIONS, past which the float32 attention
calls' rounding, amplified through the inverse, takes the output (or, sooner, the gradients, which
two float64 evaluations already disagree on) beyond the tolerance; such a point is unsupported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from attnbench_plugins.precision import compute_dtype_for, float64_device

import attnbench
from attnbench import AttentionFn, Case
from attnbench.contract.work import timed_call

# Positions × batch × heads × head_dim cast to float64 at a time for the landmarks (8 MiB): the
# float64 means never need a float64 copy of the whole of q or k.
LANDMARK_BLOCK_ELEMENTS = 2**20
# The most pseudo-inverse iterations nystrom takes, by whether gradients are taken (case.backward).
# Each further iteration inverts singular values of the landmark kernel about √3.25 times smaller,
# and the error the float32 attention calls leave grows about as much (measured: 1.6 times per
# iteration, in the output and in the gradients alike, the gradients' from a larger start).
# At these limits the worst of 200 inputs per source and shape stays within a quarter of the bound
# (0.02 of it for the output, 0.15 for structured inputs' gradients), as exact attention's does of
# the default tolerance; past them inputs miss it, structured ones first (singular kernels): the
# output at 45 iterations, the gradients at 25 (and at 30 one Gaussian input in 200;
# benchmarks/nystrom_seeds.py). A point past its limit is unsupported, not incorrect at random.
MOST_ITERATIONS = {False: 30, True: 14}


class NystromAttention(attnbench.Implementation):
    name = "nystrom"
    description = "Nyströmformer: segment-mean landmarks and an iterative pseudo-inverse, linear in N"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    supports_causal = False
    unsupported_because = {
        "causal": "landmarks average over future tokens",
        "chunked_prefill": "its landmarks average every position's query, and a chunk brings only its own",
        "decode": "its landmarks average every position's query, which a KV cache does not keep",
    }
    default_options = {"landmarks": 256, "pinv_iterations": 6}
    # Judged against its own float64 formula. What is left in float32, the two attention calls'
    # rounding, is amplified through the inverse: ~1e-6 of max |out| at the defaults, up to ~1e-5
    # with the inverse converged (30 iterations) at N=4096, a few hundredths of this bound at most
    # (benchmarks/nystrom_seeds.py); a bug is off by orders more. Past MOST_ITERATIONS it would not
    # hold, and prepare refuses the point.
    tolerances = {**attnbench.Implementation.tolerances, torch.float32: attnbench.Tolerance(atol=1e-5, rtol=1e-3)}

    def invalid_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        return {
            key: f"must be at least 1, got {options[key]}"
            for key in ("landmarks", "pinv_iterations")
            if options[key] < 1
        }

    def prepare(self, case: Case, options: Mapping[str, Any]) -> AttentionFn:
        landmarks = min(options["landmarks"], case.seq_len)
        iterations = options["pinv_iterations"]
        most = MOST_ITERATIONS[case.backward]
        if iterations > most:
            taken = "gradients" if case.backward else "the output"
            raise attnbench.NotSupported(
                f"pinv_iterations={iterations}: past {most}, float32 rounding amplified through the inverse takes "
                f"{taken} beyond nystrom's tolerance (supported: pinv_iterations <= {most} in {case.mode} mode)")
        segment_of = segment_index(case.seq_len, landmarks, case.device)
        segment_sizes = torch.bincount(segment_of, minlength=landmarks).unsqueeze(-1)  # (m, 1)
        groups = case.heads // case.kv_heads

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dtype = q.dtype
            compute = compute_dtype_for(dtype)
            # The landmarks and their kernel in float64 (the module's docstring says why).
            q_landmarks = segment_means(q, segment_of, segment_sizes)  # (B, H, m, D)
            k_landmarks = segment_means(k, segment_of, segment_sizes)  # (B, KV, m, D)
            k_landmarks = k_landmarks.repeat_interleave(groups, dim=1)  # (B, H, m, D): small
            kernel = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            q_landmarks, k_landmarks = q_landmarks.to(q.device, compute), k_landmarks.to(q.device, compute)
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
            # softmax(Q̃ Kᵀ/√d) V: landmark queries attend to every key (grouped-query aware).
            landmark_values = F.scaled_dot_product_attention(q_landmarks, k, v, enable_gqa=groups > 1)
            # pinv(kernel) @ ..., (B, H, m, D), iterated in float64.
            mixed = pinv_times(kernel, landmark_values.to(kernel.device, torch.float64), iterations)
            # softmax(Q K̃ᵀ/√d) · mixed: every query attends to the landmarks.
            out = F.scaled_dot_product_attention(q, k_landmarks, mixed.to(q.device, compute))
            return out.to(dtype)

        return attention

    def flops(self, case: Case, options: Mapping[str, Any]) -> attnbench.FlopCount:
        """m = min(landmarks, N), t iterations: the two attention calls through the landmarks
        (4·N·m·D each), the landmark kernel (2·m²·D), t − 1 pseudo-inverse steps of four (m × m)
        products and the last applied to the values (8·(t−1)·m³ + 2·m³ + 8·m²·D), per head; the
        kernel and the pseudo-inverse in float64."""
        m, t = min(options["landmarks"], case.seq_len), options["pinv_iterations"]
        b, h, n, d = case.batch, case.heads, case.seq_len, case.head_dim
        forward = b * h * (8.0 * n * m * d + 10.0 * m * m * d + (8.0 * t - 6) * m**3)
        return timed_call(case, forward, f"B·H·(8·N·m·D + 10·m²·D + (8t−6)·m³), m={m}, t={t}")

    def reference(self, q, k, v, case, options, rows):
        """The same formula in float64 with the (N × m) softmax matrices written out."""
        landmarks = min(options["landmarks"], case.seq_len)
        groups = case.heads // case.kv_heads
        segment_of = segment_index(case.seq_len, landmarks, q.device)
        sizes = torch.bincount(segment_of, minlength=landmarks).unsqueeze(-1)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = case.head_dim**-0.5
        q_landmarks, k_landmarks = segment_means(q, segment_of, sizes), segment_means(k, segment_of, sizes)
        queries_to_landmarks = torch.softmax(q[:, :, rows] @ k_landmarks.transpose(-1, -2) * scale, dim=-1)
        kernel = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2) * scale, dim=-1)
        landmarks_to_keys = torch.softmax(q_landmarks @ k.transpose(-1, -2) * scale, dim=-1)
        pinv = iterative_pinv(kernel, options["pinv_iterations"])
        return queries_to_landmarks @ (pinv @ (landmarks_to_keys @ v))


def segment_index(seq_len: int, landmarks: int, device: torch.device | str) -> torch.Tensor:
    """The landmark each position belongs to: m contiguous segments, lengths differing by at most one."""
    return torch.arange(seq_len, device=device) * landmarks // seq_len


def segment_means(x: torch.Tensor, segment_of: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(…, N, D) -> (…, m, D) in float64: the mean of each segment, exact to float64 whatever x's
    dtype, summed a block of positions at a time (no float64 copy of all of x is made)."""
    device = float64_device(x.device)
    landmarks, seq_len = sizes.shape[0], x.shape[-2]
    step = max(1, LANDMARK_BLOCK_ELEMENTS * seq_len // max(1, x.numel()))  # positions per block
    if seq_len % landmarks == 0:  # equal segments: sums over views of whole segments, no scatter
        size = seq_len // landmarks
        step = size * max(1, step // size)
        blocks = (x[..., start:start + step, :].to(device, torch.float64) for start in range(0, seq_len, step))
        sums = torch.cat([block.unflatten(-2, (-1, size)).sum(dim=-2) for block in blocks], dim=-2)
    else:
        sums = torch.zeros((*x.shape[:-2], landmarks, x.shape[-1]), dtype=torch.float64, device=device)
        for start in range(0, seq_len, step):
            block = slice(start, start + step)
            sums = sums.index_add(-2, segment_of[block].to(device), x[..., block, :].to(device, torch.float64))
    return sums / sizes.to(device, torch.float64)


def iterative_pinv(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse by eq. 16: Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))),
    from Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞), per matrix, which makes the iteration converge."""
    z = _initial_inverse(matrix)
    for _ in range(iterations):
        z = _pinv_step(matrix, z)
    return z


def pinv_times(matrix: torch.Tensor, values: torch.Tensor, iterations: int) -> torch.Tensor:
    """iterative_pinv(matrix, iterations) @ values, the last step applied to the (m × d) values
    instead of formed as an (m × m) matrix: 21 (m × m) products instead of 24 for 6 steps."""
    z = _initial_inverse(matrix)
    for _ in range(iterations - 1):
        z = _pinv_step(matrix, z)
    az = matrix @ z
    inner = _times_identity_minus(az, 7, values, values)
    inner = _times_identity_minus(az, 15, inner, values)
    return z @ _times_identity_minus(az, 13, inner, values, 0.25)


def _initial_inverse(matrix: torch.Tensor) -> torch.Tensor:
    absolute = matrix.abs()
    norms = absolute.sum(dim=-2).amax(dim=-1) * absolute.sum(dim=-1).amax(dim=-1)
    return matrix.transpose(-1, -2) / norms[..., None, None]


def _pinv_step(matrix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    az = matrix @ z
    t = _times_identity_minus(az, 7, az, az)
    t = _times_identity_minus(az, 15, t, az)
    return _times_identity_minus(z, 13, t, z, 0.25)


def _times_identity_minus(left: torch.Tensor, c: float, inner: torch.Tensor, identity_part: torch.Tensor,
                          factor: float = 1.0) -> torch.Tensor:
    """factor · (c · identity_part − left @ inner), which is factor · left @ (c·I − inner) when
    identity_part = left @ I: one fused product (baddbmm), no c·I matrix and no negated copy."""
    flat = (-1, *identity_part.shape[-2:])
    out = torch.baddbmm(identity_part.reshape(flat), left.reshape(-1, *left.shape[-2:]), inner.reshape(flat),
                        beta=c * factor, alpha=-factor)
    return out.view(identity_part.shape)


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(NystromAttention())
