"""NVML sampling around the timed calls, behind a fake pynvml (no GPU here): what is read, how a
throttled point is found and flagged, and that rows and environment.json keep it."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from attnbench.measuring import gpu_state
from attnbench.measuring.figures import Latency
from attnbench.measuring.gpu_state import GpuSample, throttling
from attnbench.storage import flags
from attnbench.storage.environment import gpu_details
from attnbench.storage.results import Row, read_rows, write_rows
from attnbench.testing import small_case


class NVMLError(Exception):
    pass


def fake_nvml(reasons: list[int], violations: list[int], uuid: str = "GPU-1234") -> types.ModuleType:
    """A pynvml whose throttle reasons and power-cap violation time step through the given values,
    one per sample."""
    nvml = types.ModuleType("pynvml")
    state = {"reads": 0}

    def reason(handle):
        value = reasons[min(state["reads"], len(reasons) - 1)]
        state["reads"] += 1
        return value

    def violation(handle, policy):  # read after the reasons of the same sample
        if policy != 0:
            raise NVMLError("not supported")
        return types.SimpleNamespace(violationTime=violations[min(state["reads"] - 1, len(violations) - 1)])

    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"handle{index}"
    nvml.nvmlDeviceGetUUID = lambda handle: {"handle0": b"GPU-other", "handle1": uuid.encode()}[handle]
    nvml.nvmlDeviceGetClockInfo = lambda handle, clock: {1: 1980, 2: 2619}[clock]
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 61
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 512_000
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda handle: 700_000
    nvml.nvmlDeviceGetCurrentClocksEventReasons = reason
    nvml.nvmlDeviceGetViolationStatus = violation
    nvml.nvmlSystemGetDriverVersion = lambda: "570.86.15"
    return nvml


@pytest.fixture
def one_gpu(monkeypatch):
    """torch sees one CUDA device, whose UUID NVML lists second."""
    properties = types.SimpleNamespace(name="Fake H100", uuid="1234", major=9, minor=0, total_memory=80 * 2**30,
                                       multi_processor_count=132, L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _timed(monkeypatch, nvml: types.ModuleType) -> Latency:
    """A round's two samples, as the worker takes them around its timed calls
    (attnbench.measuring.call_server.CallServer.gpu_sample; tests/test_round.py: that they are kept)."""
    from attnbench.measuring.call_server import CallServer, shared_in_memory
    from attnbench.testing import small_case

    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    case = small_case(device="cuda:0")
    server = CallServer(None, case, {}, lambda: [], shared_in_memory(case))  # type: ignore[arg-type]
    samples = [server.gpu_sample() for _ in range(2)]
    time.sleep(0.001)
    return Latency((1e-3,), (1,), 0.0, "t", gpu_samples=tuple(samples) if all(samples) else ())


def test_a_point_is_sampled_before_and_after_its_timed_calls(monkeypatch, one_gpu):
    latency = _timed(monkeypatch, fake_nvml(reasons=[0x1, 0x0], violations=[5, 5]))
    assert len(latency.gpu_samples) == 2
    before, after = latency.gpu_samples
    assert (after.sm_clock_mhz, after.memory_clock_mhz, after.temperature_c, after.power_w) == (1980, 2619, 61, 512.0)
    assert before.slowdown_reasons == ()  # idle is not a slowdown
    assert after.violation_ns == {"power cap": 5}  # the thermal policy is not supported here: left out
    assert latency.throttling == []


@pytest.mark.parametrize(("reasons", "violations", "expected"), [
    ([0x0, 0x4], [0, 0], ["software power cap"]),  # seen at the end
    ([0x0, 0x0], [0, 3_000_000], ["held at its power cap for 3 ms"]),  # between the samples only
    ([0x40, 0x20 | 0x40], [0, 0], ["hardware thermal slowdown", "software thermal slowdown"]),
])
def test_a_throttled_point_is_flagged(monkeypatch, one_gpu, reasons, violations, expected):
    latency = _timed(monkeypatch, fake_nvml(reasons, violations))
    assert latency.throttling == expected
    row = _row(latency)
    found = [flag for flag in flags.flags_of(row, exact=True, yardstick={}) if flag.kind == "throttled"]
    assert len(found) == 1 and found[0].message == f"GPU throttled while timed: {'; '.join(expected)}"


def test_rounds_keep_their_own_pairs_and_a_later_rounds_throttle_counts():
    quiet = GpuSample(1980, 2619, 60, 500.0, (), {"power cap": 0})
    held = GpuSample(1755, 2619, 80, 700.0, (), {"power cap": 9_000_000})
    first = Latency((1e-3,), (1,), 0.0, "t", gpu_samples=(quiet, quiet))
    second = Latency((1e-3,), (1,), 0.0, "t", gpu_samples=(held, held))
    assert Latency.merge([first, second]).throttling == []  # each pair held steady: no growth within a round
    third = Latency((1e-3,), (1,), 0.0, "t", gpu_samples=(quiet, held))
    assert Latency.merge([first, third]).throttling == ["held at its power cap for 9 ms"]
    assert throttling(()) == []


def test_without_nvml_or_a_gpu_nothing_is_sampled(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert gpu_state.sampler(torch.device("cuda:0")) is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([0], [0]))
    assert gpu_state.sampler(torch.device("cpu")) is None


def test_a_failing_nvml_init_samples_nothing(monkeypatch, one_gpu):
    nvml = fake_nvml([0], [0])

    def no_driver():
        raise NVMLError("driver not loaded")

    nvml.nvmlInit = no_driver
    assert _timed(monkeypatch, nvml).gpu_samples == ()


def test_environment_names_the_gpu_its_driver_and_versions(monkeypatch, one_gpu):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([0], [0]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    details = gpu_details()["cuda:0"]
    assert details["name"] == "Fake H100" and details["compute_capability"] == "9.0"
    assert details["uuid"] == "GPU-1234"  # NVML's, matched to torch's device by UUID
    assert details["driver"] == "570.86.15" and details["power_limit_w"] == "700"
    assert details["multiprocessors"] == "132" and details["l2_cache_bytes"] == str(50 * 2**20)
    assert {"cuda", "cudnn", "memory_bytes"} <= details.keys()


def test_gpu_samples_survive_rows_jsonl(tmp_path):
    sample = GpuSample(1755, 2619, 80, 700.0, ("software power cap",), {"power cap": 9})
    path = tmp_path / "rows.jsonl"
    write_rows(path, [_row(Latency((1e-3,), (1,), 0.0, "t", gpu_samples=(sample, sample)))])
    assert read_rows(path)[0].latency.gpu_samples == (sample, sample)


def _row(latency: Latency) -> Row:
    return Row(run_id="r", implementation="x", case=small_case(), status="ok", latency=latency)
