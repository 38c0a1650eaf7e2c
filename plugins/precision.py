"""What the built-in approximations compute in: float32 for float16 and bfloat16 inputs, whose
range their exponentials (performer, hybrid) would leave; any other dtype as it is. Nyström's
landmarks, their kernel and its pseudo-inverse iteration run in float64 whatever the input
(``float64_device``: where), for the reason its module gives."""

from __future__ import annotations

import torch


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """compute_dtype_for the tensor's dtype."""
    return compute_dtype_for(x.dtype)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work on ``device``'s tensors runs: there, or on the CPU for a device that has
    no float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device
