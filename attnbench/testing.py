"""A testing kit for plugin authors: check an implementation on small cases, in-process.

    from attnbench.testing import check_implementation

    def test_my_attention():
        check_implementation(MyAttention())
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.errors import NotSupported
from attnbench.contract.implementation import Implementation, contract_violations, effective_options, plugin_reasons
from attnbench.measuring.figures import Measurement
from attnbench.measuring.in_process import measure_case
from attnbench.settings.suite import CorrectnessSettings, Measure

CORRECTNESS_ONLY = Measure(correctness=CorrectnessSettings(), latency=None, memory=False)


def small_case(**overrides: Any) -> Case:
    """A case small enough for a unit test; override any field."""
    fields = dict(batch=2, heads=4, kv_heads=4, seq_len=128, head_dim=32, dtype=torch.float32,
                  device="cpu", causal=False, mode="forward")
    fields.update(overrides)
    if "heads" in overrides and "kv_heads" not in overrides:
        fields["kv_heads"] = fields["heads"]
    return Case(**fields)


def small_cases() -> list[Case]:
    """Forward and training, causal or not, with and without grouped-query heads, on Gaussian
    inputs; two of them on structured inputs (every input distribution must be accepted); and
    the inference shapes, which only an implementation that declares them runs: chunked prefill
    (32 queries onto 128 keys) and decode steps (1 and 4 new tokens onto a cache of 128)."""
    base = small_case()
    gaussian = [
        dataclasses.replace(base, causal=causal, mode=mode, kv_heads=kv_heads)
        for causal, mode, kv_heads in itertools.product((False, True), ("forward", "forward_backward"), (4, 2))
    ]
    structured = [
        dataclasses.replace(base, inputs="structured"),
        dataclasses.replace(base, inputs="structured", causal=True, mode="forward_backward", kv_heads=2),
    ]
    inference = [
        dataclasses.replace(base, causal=True, q_len=32),
        dataclasses.replace(base, causal=True, mode="forward_backward", kv_heads=2, q_len=32),
        dataclasses.replace(base, causal=True, mode="decode", kv_heads=2),
        dataclasses.replace(base, mode="decode", q_len=4),
        dataclasses.replace(base, causal=True, mode="decode", q_len=4, inputs="structured"),
    ]
    return gaussian + structured + inference


def check_implementation(
    implementation: Implementation,
    cases: Iterable[Case] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[Case, Measurement]:
    """Assert the contract holds and each supported case measures ``ok`` (correct outputs and
    gradients, inputs left alone, usable FLOP and byte declarations where it declares them); returns the
    measurements. A failure names the case and the check. Unsupported cases are left out of the
    result (their reasons must be non-empty strings).
    """
    violations = contract_violations(implementation)
    assert not violations, f"{implementation!r} breaks the contract: {violations}"
    resolved = effective_options(implementation, options or {})
    measurements = {}
    for case in cases if cases is not None else small_cases():
        own = implementation.not_supported_reasons(case)
        assert isinstance(own, (list, tuple)) and all(isinstance(reason, str) and reason for reason in own), own
        reasons = plugin_reasons(implementation, case)
        if reasons:
            continue
        where = f"{implementation.name} on {case.describe()}"
        try:
            measurement = measure_case(implementation, case, resolved, CORRECTNESS_ONLY)
        except NotSupported:
            continue
        except Exception as error:  # noqa: BLE001 (the plugin's own failure, named with its case)
            raise AssertionError(f"{where}: prepare or the call raised {type(error).__name__}: {error} (the "
                                 "traceback above shows where; a case it cannot take needs a reason from "
                                 "not_supported_reasons or a declared capability)") from error
        assert measurement.status == "ok", f"{where}: {measurement.status}: {'; '.join(measurement.reasons)}"
        for prefix, declaration in (("flops() ", "FLOP"), ("step_bytes() ", "byte")):
            broken = [note for note in measurement.notes if note.startswith(prefix)]
            assert not broken, f"{where}: its {declaration} declaration: {broken[0]}"
        measurements[case] = measurement
    return measurements
