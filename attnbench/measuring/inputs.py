"""Seeded attention inputs: every implementation sees the same tensors for a case.

The values come from the case's input source (attnbench.contract.inputs); here they are drawn
from the seed, given an upstream gradient in training mode, cast and moved to the device.
"""

from __future__ import annotations

import torch

from attnbench.contract.case import Case
from attnbench.contract.errors import NotSupported
from attnbench.contract.inputs import BUILTIN_SOURCES, Inputs, InputSource, source_reasons


def make_inputs(case: Case, seed: int, source: InputSource | None = None) -> Inputs:
    """Drawn in float32 on the CPU (values independent of the device's generator), then cast.

    ``source``: the case's input source (default: the built-in one of that name); a case it
    cannot give raises NotSupported with its reasons (the point is ``unsupported``). The float64
    reference is computed from the cast values, so rounding the inputs to a low-precision dtype
    is not counted as the implementation's error.
    """
    source = source if source is not None else BUILTIN_SOURCES[case.inputs]
    reasons = source_reasons(source, case)
    if reasons:
        raise NotSupported("; ".join(reasons))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = source.draw(case, generator)
    grad_out = torch.randn((case.batch, case.heads, case.seq_len, case.head_dim), generator=generator) \
        if case.backward else None
    # Contiguous, as activations are: fused kernels refuse a strided last dimension.
    q, k, v = (t.to(device=case.device, dtype=case.dtype).contiguous() for t in (q, k, v))
    if grad_out is not None:
        grad_out = grad_out.to(device=case.device, dtype=case.dtype)
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return Inputs(q, k, v, grad_out)
