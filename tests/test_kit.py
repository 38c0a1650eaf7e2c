"""The plugin kit names the case and the check a plugin failed, whatever the failure."""

from __future__ import annotations

import pytest
import torch
from toys import Toy, exact_attention, returns_query

from attnbench.testing import check_implementation, small_case


def ignores_grouped_query(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)  # fails when k, v have fewer heads


class DeclaresNonsense(Toy):
    exact = False

    def flops(self, case, options):
        return "lots"


@pytest.mark.parametrize("implementation, cases, message", [
    (Toy("grouped", ignores_grouped_query), None,
     "grouped on B=2 H=4 kv_heads=2 N=128 D=32 float32 cpu forward: prepare or the call raised RuntimeError"),
    (Toy("copier", returns_query), [small_case()], "copier on B=2 H=4 N=128 D=32 float32 cpu forward: incorrect: "),
    (DeclaresNonsense("boaster", exact_attention), [small_case()],
     "boaster on B=2 H=4 N=128 D=32 float32 cpu forward: its FLOP declaration: flops() returned 'lots'"),
])
def test_a_failure_names_the_case_and_the_check(implementation, cases, message):
    with pytest.raises(AssertionError) as failure:
        check_implementation(implementation, cases)
    assert str(failure.value).startswith(message)
