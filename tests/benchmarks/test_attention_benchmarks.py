"""pytest-benchmark: every registered implementation that supports the case, at a few seq_lens.

In the normal test run each benchmark runs its call once, untimed (tests/conftest.py turns
benchmarking off), so a broken one fails fast. Timed, and compared with a saved baseline:

    .venv/bin/python -m pytest tests/benchmarks --benchmark-only --benchmark-autosave
    .venv/bin/python -m pytest tests/benchmarks --benchmark-only --benchmark-compare \
        --benchmark-compare-fail=median:50%

(the threshold is chosen from measured noise: see README, "Tracking performance across commits").
Each benchmark's extra_info carries attnbench's own figures for the point: its relative error
against float64 exact attention and its peak memory.
"""

from __future__ import annotations

import pytest
import torch

from attnbench.contract.errors import NotSupported
from attnbench.measuring.allocator import steady_cpu_allocator
from attnbench.tracking import point, point_figures, prepared_call, registry

SEQ_LENS = (256, 1024)
MODES = ("forward", "forward_backward")
OPTIONS = {"sparse": {"backend": "blocked"}}  # no compilation inside a timed test session
# Variants, as a suite's option sweep names them: series of their own.
VARIANTS = ("nystrom[landmarks=64]", "performer[features=64]")


@pytest.fixture(scope="module", autouse=True)
def steady_process():
    """As attnbench's workers measure: one thread (on a small shared machine two threads wait on
    each other's interruptions: benchmarks/stability.py), and freed memory kept for reuse
    (without it naive at N=1024 measured 29.4 ms in one session and 15.8 ms in the next)."""
    steady_cpu_allocator()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", [*registry().names(), *VARIANTS])
def test_attention(benchmark, name: str, seq_len: int, mode: str) -> None:
    case = point(seq_len, heads=4, mode=mode)
    options = OPTIONS.get(name)
    try:
        figures = point_figures(name, case, options)
        call = prepared_call(name, case, options)
    except NotSupported as reasons:
        pytest.skip(str(reasons))
    benchmark.group = f"{mode} N={seq_len}"
    benchmark.extra_info.update(relative_error=figures.error, peak_memory_bytes=figures.peak_bytes,
                                status=figures.status, threads=torch.get_num_threads())
    benchmark(call)
    assert figures.status == "ok", f"{name} is out of its tolerance at {case.describe()}"
