"""What a run ran on: versions, CPU, threads, the settings that move timings, devices, commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from attnbench.measuring.allocator import worker_allocator_policy
from attnbench.measuring.gpu_state import device_facts
from attnbench.support.process_state import TIMING_VARIABLES

PACKAGES = ("attnbench", "torch", "pluggy", "numpy", "pyyaml", "xformers")


@dataclass(frozen=True)
class Environment:
    started_at: str  # UTC, ISO 8601
    command: str
    python: str
    platform: str
    hostname: str
    packages: dict[str, str]
    cpu_model: str
    cpu_count: int | None
    cpus_usable: int
    torch_threads: int  # what the measurements ran with
    torch_interop_threads: int
    torch_parallel: str  # torch's own account: OpenMP/MKL versions and thread counts
    timing_variables: dict[str, str]
    devices: dict[str, str] = field(default_factory=dict)  # e.g. "cuda:0" -> name and capability
    # "cuda:0" -> name, uuid, compute capability, memory, SMs, L2, and the driver, CUDA and cuDNN
    # versions: what a GPU result is tied to
    gpus: dict[str, dict[str, str]] = field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None
    # "device/dtype" -> FLOP/s: the best of the measurements taken in workers during the run
    # (matmul_flops_samples), so that a busy moment cannot lower the yardstick.
    matmul_flops: dict[str, float] = field(default_factory=dict)
    matmul_flops_samples: dict[str, list[float]] = field(default_factory=dict)
    # "device/dtype" -> bytes read and written per second by a large copy, kept the same way
    copy_bytes_per_s: dict[str, float] = field(default_factory=dict)
    copy_bytes_per_s_samples: dict[str, list[float]] = field(default_factory=dict)
    load_average: tuple[float, float, float] | None = None  # 1, 5, 15 minutes, when the run started
    cpu_frequency: str = ""  # current MHz range over the CPUs and the scaling governor, where Linux tells
    worker_allocator: str = ""  # what each worker does to malloc (attnbench.measuring.allocator)
    # plugin -> its distribution, version and the implementations it registered
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    # input source -> its description and the parameters in effect (a model's layers, ...)
    input_sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # On a cluster: each slot's machine (attnbench.execution.placement.Slot) as it described
    # itself there: an Environment's fields. Empty when the run used only this machine.
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    niceness: int | None = None  # the scheduling priority the workers inherit (Ray's workers default to 15)
    # What confines the workers that run plugin code here (attnbench.support.confinement.Protections),
    # as this machine's kernel offers it; empty in runs made before workers were confined.
    protections: dict[str, Any] = field(default_factory=dict)

    def busy_warning(self) -> str | None:
        """A sentence when other work was running on the CPUs as the run started."""
        if self.load_average is None or self.cpus_usable <= 0:
            return None
        if self.load_average[0] > 0.5 * self.cpus_usable:
            return (f"the machine is busy (load average {self.load_average[0]:.1f} over the last minute on "
                    f"{self.cpus_usable} usable CPUs): timings will be noisy")
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Environment:
        """Fields this version does not know (a newer writer) are left out rather than refused."""
        known = {name: value for name, value in data.items() if name in cls.__dataclass_fields__}
        if "load_average" in known and known["load_average"] is not None:
            known["load_average"] = tuple(known["load_average"])
        return cls(**known)


def capture_environment(threads: int | None = None, plugins: dict[str, dict[str, Any]] | None = None,
                        protections: dict[str, Any] | None = None) -> Environment:
    """``threads``: the count the workers use; ``plugins``: where the run's implementations come
    from; ``protections``: what confines the workers here."""
    commit, dirty = code_version()
    return Environment(
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        python=sys.version.split()[0],
        platform=platform.platform(),
        hostname=platform.node(),
        packages=_package_versions(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        torch_threads=threads or torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        torch_parallel=torch.__config__.parallel_info(),
        timing_variables={name: os.environ[name] for name in TIMING_VARIABLES if name in os.environ},
        devices=_devices(),
        gpus=gpu_details(),
        git_commit=commit,
        git_dirty=dirty,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        cpu_frequency=_cpu_frequency(),
        worker_allocator=worker_allocator_policy(),
        plugins=plugins or {},
        niceness=os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None,
        protections=protections or {},
    )


def code_version() -> tuple[str | None, bool | None]:
    """The commit of attnbench's own source when it runs from a checkout, else of the directory
    the run was started in; and whether there are uncommitted changes."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    return (commit, dirty) if commit is not None else git_state(Path.cwd())


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the repository holding ``directory``, if any."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["torch.version.cuda"] = str(torch.version.cuda)
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_frequency() -> str:
    """E.g. '2445-2445 MHz, governor performance'; empty where the system does not say."""
    try:
        speeds = [float(line.partition(":")[2]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        speeds = []
    governor_file = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    governor = governor_file.read_text().strip() if governor_file.exists() else ""
    parts = [f"{min(speeds):.0f}-{max(speeds):.0f} MHz"] if speeds else []
    if governor:
        parts.append(f"governor {governor}")
    return ", ".join(parts)


def _devices() -> dict[str, str]:
    devices = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices[f"cuda:{index}"] = (
                f"{properties.name}, compute capability {properties.major}.{properties.minor}, "
                f"{properties.total_memory / 2**30:.1f} GiB"
            )
    if torch.backends.mps.is_available():
        devices["mps"] = "Apple Metal Performance Shaders"
    return devices


def gpu_details() -> dict[str, dict[str, str]]:
    """Each visible CUDA GPU as torch and NVML (where installed) describe it."""
    if not torch.cuda.is_available():
        return {}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    details = {}
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        details[f"cuda:{index}"] = {
            "name": properties.name,
            "uuid": str(getattr(properties, "uuid", "")),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_bytes": str(properties.total_memory),
            "multiprocessors": str(properties.multi_processor_count),
            "l2_cache_bytes": str(getattr(properties, "L2_cache_size", "")),
            "cuda": str(torch.version.cuda),
            "cudnn": str(cudnn),
            **device_facts(torch.device("cuda", index)),
        }
    return details
