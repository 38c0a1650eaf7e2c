"""Expands a suite's sweep into cases, in a deterministic order."""

from __future__ import annotations

import dataclasses
import itertools

from attnbench.contract.case import DTYPES, Case
from attnbench.settings.suite import Sweep


def expand(sweep: Sweep) -> list[Case]:
    """Every combination of the axes; seq_len is innermost and ascending.

    Ascending seq_len within each group of the other axes lets the runner predict, from the
    smaller points just measured, whether a larger one would exceed the limits.
    """
    cases = []
    for device, dtype, mode, inputs, causal, batch, heads, head_dim in itertools.product(
        sweep.device, sweep.dtype, sweep.mode, sweep.inputs, sweep.causal, sweep.batch, sweep.heads, sweep.head_dim
    ):
        for kv_heads in sweep.kv_heads or (heads,):
            for seq_len in sorted(sweep.seq_len):
                cases.append(
                    Case(
                        batch=batch,
                        heads=heads,
                        kv_heads=kv_heads,
                        seq_len=seq_len,
                        head_dim=head_dim,
                        dtype=DTYPES[dtype],
                        device=device,
                        causal=causal,
                        mode=mode,
                        inputs=inputs,
                    )
                )
    return cases


def group_key(case: Case) -> Case:
    """The case with seq_len blanked: the points of one scaling curve share it."""
    return dataclasses.replace(case, seq_len=0)


def describe_group(group: Case) -> str:
    """The fixed axes of a scaling curve, e.g. 'B=1 H=8 D=64 float32 cpu causal forward'."""
    return group.describe().replace(f"N={group.seq_len} ", "")
