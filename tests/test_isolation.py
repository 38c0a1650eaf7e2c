"""Each case runs in its own worker process: a crash, hang or runaway allocation ends as a row."""

from __future__ import annotations

import pytest
import toys

from attnbench.measuring.figures import Measurement
from attnbench.measuring.outcome import Failure
from attnbench.testing import CORRECTNESS_ONLY, small_case


def _run(behaviour, timeout_s: float = 60):
    return toys.run_alone(toys.Toy("toy", behaviour), small_case(), CORRECTNESS_ONLY, timeout_s)


def test_a_good_case_returns_its_measurement():
    result = _run(toys.exact_attention)
    assert isinstance(result.outcome, Measurement) and result.outcome.status == "ok"
    assert result.wall_time_s > 0


@pytest.mark.parametrize(
    "behaviour, status, words",
    [
        (toys.segfaults, "crashed", "worker killed by SIGSEGV"),
        (toys.raises, "error", "ValueError: this implementation is broken on purpose"),
        (toys.allocates_too_much, "oom", "can't allocate memory"),
    ],
)
def test_failures_become_outcomes(behaviour, status, words):
    result = _run(behaviour)
    assert isinstance(result.outcome, Failure)
    assert result.outcome.status == status
    assert words in result.outcome.reasons[0]


def test_an_error_keeps_its_traceback():
    result = _run(toys.raises)
    assert "Traceback" in result.outcome.detail and "def raises" not in result.outcome.detail
    assert "toys.py" in result.outcome.detail


def test_a_hang_is_killed_at_the_timeout():
    result = _run(toys.hangs, timeout_s=3)
    assert result.outcome.status == "timeout", result.outcome
    assert "no result within the case timeout of 3 s" in result.outcome.reasons[0]
    assert result.wall_time_s < 30


def test_an_implementation_that_cannot_reach_a_worker_is_an_error_row():
    result = _run(lambda q, k, v: q)  # a lambda cannot be pickled
    assert result.outcome.status == "error"
    assert "cannot be sent to a worker process" in result.outcome.reasons[0]
