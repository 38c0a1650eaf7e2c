"""What the built-in approximations compute in: float32 for float16 and bfloat16 inputs, whose
range their exponentials (performer, hybrid) would leave and in which the pseudo-inverse
iteration (nystrom) is not stable; any other dtype as it is."""

from __future__ import annotations

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """compute_dtype_for the tensor's dtype."""
    return compute_dtype_for(x.dtype)
