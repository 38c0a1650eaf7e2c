"""Process-wide settings that change how fast (or how exactly) every later call runs.

A plugin that calls ``torch.set_num_threads(1)`` at import, or switches TF32 on in ``prepare``,
changes the conditions of everything measured after it in that process. The harness takes a
snapshot before plugin code runs, compares after it, and puts back what changed; a change made
inside the timed call cannot be put back in time, so that point is refused (attnbench.execution.local.worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Environment variables that threading libraries and allocators read (also recorded with a run).
TIMING_VARIABLES = (
    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS", "MKL_DYNAMIC", "KMP_AFFINITY", "KMP_BLOCKTIME", "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
    "LD_PRELOAD",
)


@dataclass(frozen=True)
class Setting:
    name: str
    read: Callable[[], Any]
    write: Callable[[Any], None] | None  # None: can be read, not put back (reported only)


def _environment_setting(variable: str) -> Setting:
    def write(value: str | None) -> None:
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value

    return Setting(f"${variable}", lambda: os.environ.get(variable), write)


def _attribute(owner: Any, name: str, label: str) -> Setting:
    return Setting(label, lambda: getattr(owner, name), lambda value: setattr(owner, name, value))


SETTINGS: tuple[Setting, ...] = (
    Setting("torch threads", torch.get_num_threads, torch.set_num_threads),
    Setting("torch interop threads", torch.get_num_interop_threads, None),  # fixed once work has started
    Setting("float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    Setting("default dtype", torch.get_default_dtype, torch.set_default_dtype),
    Setting("default device", lambda: str(torch.get_default_device()), torch.set_default_device),
    Setting("grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    Setting("anomaly detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    Setting(
        "deterministic algorithms",
        lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1]),
    ),
    _attribute(torch.backends.mkldnn, "enabled", "mkldnn enabled"),
    _attribute(torch.backends.cuda.matmul, "allow_tf32", "CUDA matmul TF32"),
    _attribute(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", "CUDA fp16 reduced reduction"),
    _attribute(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", "CUDA bf16 reduced reduction"),
    _attribute(torch.backends.cudnn, "allow_tf32", "cuDNN TF32"),
    _attribute(torch.backends.cudnn, "benchmark", "cuDNN benchmark"),
    _attribute(torch.backends.cudnn, "deterministic", "cuDNN deterministic"),
    _attribute(torch.backends.cudnn, "enabled", "cuDNN enabled"),
    Setting("SDPA flash backend", torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    Setting("SDPA memory-efficient backend", torch.backends.cuda.mem_efficient_sdp_enabled,
            torch.backends.cuda.enable_mem_efficient_sdp),
    Setting("SDPA math backend", torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    Setting("SDPA cuDNN backend", torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    *(_environment_setting(variable) for variable in TIMING_VARIABLES),
)

Snapshot = dict[str, Any]


def snapshot() -> Snapshot:
    return {setting.name: setting.read() for setting in SETTINGS}


def changes(before: Snapshot, after: Snapshot | None = None) -> list[str]:
    """'torch threads 2 -> 1' for each setting that differs (``after``: now)."""
    after = snapshot() if after is None else after
    return [f"{name} {before[name]!r} -> {after[name]!r}" for name in before if after.get(name) != before[name]]


def restore(before: Snapshot) -> list[str]:
    """Put back every setting that differs from ``before``; returns what had changed (and any
    that could not be put back, marked so)."""
    described = []
    now = snapshot()
    for setting in SETTINGS:
        if now[setting.name] == before[setting.name]:
            continue
        text = f"{setting.name} {before[setting.name]!r} -> {now[setting.name]!r}"
        if setting.write is None:
            described.append(f"{text} (cannot be put back)")
            continue
        try:
            setting.write(before[setting.name])
        except Exception as error:  # noqa: BLE001 (e.g. a CUDA setting on a build without CUDA)
            described.append(f"{text} (putting it back failed: {type(error).__name__})")
        else:
            described.append(text)
    return described
