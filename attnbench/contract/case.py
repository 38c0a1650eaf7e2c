"""One point of a sweep: the shapes, dtype, device, masking and mode of an attention call."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

Mode = Literal["forward", "forward_backward"]
MODES: tuple[Mode, ...] = ("forward", "forward_backward")

# Input distributions (attnbench.measuring.inputs): i.i.d. normal, or attention with local and global structure.
INPUTS: tuple[str, ...] = ("gaussian", "structured")

DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICES_ALLOWED = "cpu, cuda, cuda:N, mps"


@dataclass(frozen=True)
class Case:
    """Tensors are (batch, heads, seq_len, head_dim); k and v have ``kv_heads`` heads."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype
    device: str
    causal: bool
    mode: Mode
    inputs: str = "gaussian"

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def backward(self) -> bool:
        return self.mode == "forward_backward"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def describe(self) -> str:
        kv = f" kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        causal = " causal" if self.causal else ""
        inputs = f" inputs={self.inputs}" if self.inputs != "gaussian" else ""
        return (
            f"B={self.batch} H={self.heads}{kv} N={self.seq_len} D={self.head_dim} "
            f"{self.dtype_name} {self.device}{causal} {self.mode}{inputs}"
        )

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["dtype"] = self.dtype_name
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Case:
        return cls(**{**fields, "dtype": DTYPES[fields["dtype"]]})


def device_unavailable_reason(device: str) -> str | None:
    """Why this machine cannot run on ``device``, or None when it can."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return None
    if kind == "mps":
        if torch.backends.mps.is_available():
            return None
        return "device=mps is not available on this machine (torch.backends.mps.is_available() is False)"
    if not torch.cuda.is_available():
        return f"device={device} is not available on this machine (torch.cuda.is_available() is False)"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"device={device} does not exist (this machine has {count} CUDA device(s))"
    return None


def available_devices() -> list[str]:
    """The device kinds present here, for `attnbench list`."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices
