"""The GPU's clocks, temperature, power and throttling, read with NVML (nvidia-ml-py) just before
and just after a point's timed calls: a GPU that slowed itself down (power cap, heat) while a point
was timed makes that point's latency not comparable with the others'.

Where ``pynvml`` is not installed, or the device is not a CUDA GPU, nothing is sampled.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

# NVML's clock-event reasons (nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*) that
# mean the GPU ran below the clocks it was asked for. Idle, application-clock settings, sync boost
# and display clocks are not slowdowns of the work.
SLOWDOWN_REASONS = {
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "power brake",
}
# nvmlDeviceGetViolationStatus's policies: cumulative nanoseconds the GPU spent held below its
# clocks, which catch a slowdown between two samples that neither sample saw.
VIOLATION_POLICIES = {"power cap": 0, "thermal limit": 1}


@dataclass(frozen=True)
class GpuSample:
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    slowdown_reasons: tuple[str, ...] = ()  # SLOWDOWN_REASONS active at the moment of the sample
    violation_ns: dict[str, int] | None = None  # per VIOLATION_POLICIES name, cumulative


def throttling(samples: Sequence[GpuSample]) -> list[str]:
    """What slowed the GPU down across ``samples`` (taken in before/after pairs): reasons seen
    in any sample, and violation time that grew within a pair."""
    found = [reason for sample in samples for reason in sample.slowdown_reasons]
    for before, after in zip(samples[::2], samples[1::2], strict=False):
        if before.violation_ns is None or after.violation_ns is None:
            continue
        for policy, start in before.violation_ns.items():
            held_ms = (after.violation_ns.get(policy, start) - start) / 1e6
            if held_ms > 0:
                found.append(f"held at its {policy} for {held_ms:.3g} ms")
    return list(dict.fromkeys(found))


def sampler(device: torch.device) -> Callable[[], GpuSample] | None:
    """A function reading the device's state now; None where NVML cannot read it."""
    if device.type != "cuda":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = _handle(nvml, device)
    except nvml.NVMLError:
        return None

    def sample() -> GpuSample:
        return GpuSample(
            sm_clock_mhz=_read(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
            memory_clock_mhz=_read(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
            temperature_c=_read(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            power_w=_milli(_read(nvml, nvml.nvmlDeviceGetPowerUsage, handle)),
            slowdown_reasons=_slowdown_reasons(nvml, handle),
            violation_ns=_violations(nvml, handle),
        )

    return sample


def device_facts(device: torch.device) -> dict[str, str]:
    """The NVIDIA driver version and the GPU's UUID and power limit as NVML gives them (empty
    without NVML)."""
    nvml = _nvml()
    if nvml is None or device.type != "cuda":
        return {}
    try:
        handle = _handle(nvml, device)
        facts = {"driver": _text(nvml.nvmlSystemGetDriverVersion()), "uuid": _text(nvml.nvmlDeviceGetUUID(handle))}
    except nvml.NVMLError:
        return {}
    limit = _milli(_read(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle))
    if limit is not None:
        facts["power_limit_w"] = f"{limit:g}"
    return facts


def _nvml() -> ModuleType | None:
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()  # counted by NVML: every init may stay open for the process's life
    except Exception:  # not installed, no driver, no permission: nothing to sample
        return None
    return nvml


def _handle(nvml: ModuleType, device: torch.device) -> Any:
    """NVML numbers GPUs by the bus, CUDA by CUDA_VISIBLE_DEVICES and speed: match them by UUID."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
    for position in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(position)
        if uuid and _text(nvml.nvmlDeviceGetUUID(handle)).removeprefix("GPU-") == uuid:
            return handle
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _slowdown_reasons(nvml: ModuleType, handle: Any) -> tuple[str, ...]:
    read = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
    mask = _read(nvml, read, handle)
    return tuple(reason for bit, reason in SLOWDOWN_REASONS.items() if mask and mask & bit)


def _violations(nvml: ModuleType, handle: Any) -> dict[str, int] | None:
    held = {}
    for name, policy in VIOLATION_POLICIES.items():
        status = _read(nvml, nvml.nvmlDeviceGetViolationStatus, handle, policy)
        if status is not None:
            held[name] = int(status.violationTime)
    return held or None


def _read(nvml: ModuleType, function: Callable[..., Any], *args: Any) -> Any:
    """One NVML reading; None where this GPU or driver does not support it."""
    try:
        return function(*args)
    except nvml.NVMLError:
        return None


def _milli(value: int | None) -> float | None:
    return value / 1e3 if value is not None else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
