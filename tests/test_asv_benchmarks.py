"""The asv benchmarks (benchmarks/attention.py): fixed parameters that cover the registry,
skips with the reason, and figures from attnbench's own measurement."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def attention():
    spec = importlib.util.spec_from_file_location("asv_attention", REPO / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fixed_parameter_list_names_every_builtin(attention, registry):
    # asv finds the parameters once and applies them to every commit: they must not come from
    # the registry of the commit being measured, so this list is written out, and must keep up.
    assert set(registry.names()) <= set(attention.IMPLEMENTATIONS)


def test_a_name_that_is_not_registered_is_skipped_in_setup(attention):
    with pytest.raises(NotImplementedError, match="nobody is not registered"):
        attention.Latency().setup("nobody", 256, "b1-h8-d64", "forward")


def test_a_point_an_implementation_cannot_run_is_skipped_with_its_reason(attention):
    with pytest.raises(NotImplementedError, match="causal"):
        attention.Latency().setup("nystrom", 256, "b1-h8-d64-causal", "forward")


def test_a_supported_point_is_timed_and_measured(attention):
    latency = attention.Latency()
    latency.setup("naive", 256, "b2-h4-d128", "forward_backward")
    latency.time_attention("naive", 256, "b2-h4-d128", "forward_backward")

    point = ("naive", 256, "b1-h8-d64", "forward")
    unsupported = ("nystrom", 256, "b1-h8-d64-causal", "forward")
    measured = attention.measure_figures([point, unsupported])
    figures = attention.Figures()
    figures.setup(measured, *point)
    # naive at N=256, 8 heads: the 8·256² float32 scores alone are 2 MiB.
    assert 2 <= figures.track_peak_memory(measured, *point) < 64
    assert figures.track_error(measured, *point) < 1e-5
    assert attention.Figures.track_peak_memory.unit == "MiB"
    with pytest.raises(NotImplementedError, match="causal"):
        figures.setup(measured, *unsupported)
