"""One point of a sweep: the shapes, dtype, device, masking and mode of an attention call."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# forward: one pass over q_len queries and seq_len keys (q_len < seq_len: chunked prefill);
# forward_backward: a training step; decode: one step of q_len new tokens onto a cache of seq_len.
Mode = Literal["forward", "forward_backward", "decode"]
MODES: tuple[Mode, ...] = ("forward", "forward_backward", "decode")
DECODE_DEFAULT_Q_LEN = 1  # one new token per step, as generation makes them

DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICES_ALLOWED = "cpu, cuda, cuda:N, mps"


AxisKind = Literal["count", "dtype", "device", "flag", "mode", "source"]


@dataclass(frozen=True)
class Axis:
    """How one field of Case is swept: the suite's ``sweep.<field>`` lists its values.

    The fields of Case are the sweep's axes, and everything that lists axes (the suite's sweep,
    the grid, the table's columns, descriptions, curves) reads them from here.
    """

    kind: AxisKind  # how the suite's values are checked (attnbench.settings.loader)
    default: tuple[Any, ...] | None  # the sweep's values when the suite gives none
    nesting: int  # the grid's loop order: a larger number is an inner loop
    describe: Callable[[Case], str]  # this axis in Case.describe(); "" leaves it out
    label: str = ""  # the short name of its values, e.g. "N"
    title: str = ""  # what its values are, for a plot's axis
    unit: str = ""
    same_as: str | None = None  # with no values given: one value, that of this other axis
    curve: bool = False  # the x axis of scaling curves: innermost, ascending


def _axis(**settings: Any) -> Any:
    return field(metadata={"axis": Axis(**settings)})


@dataclass(frozen=True)
class Case:
    """q is (batch, heads, query_len, head_dim); k and v are (batch, kv_heads, key_len, head_dim).

    ``q_len`` None: every position is a query (query_len = seq_len). Otherwise the queries are
    the last q_len positions, and a causal mask is aligned bottom-right (query i sees keys up to
    key_len − query_len + i), as FlashAttention ≥ 2.1 and SDPA's ``causal_lower_right`` align it.
    In ``decode`` mode, seq_len is the cache's length and a step appends q_len tokens to it
    (key_len = seq_len + q_len); q_len defaults to 1 there.

    Each field is an axis of the sweep (``Axis``): adding one here adds it to suites, the grid,
    the table and descriptions.
    """

    batch: int = _axis(kind="count", default=(1,), nesting=5, label="B", describe=lambda c: f"B={c.batch}")
    heads: int = _axis(kind="count", default=(8,), nesting=6, label="H", describe=lambda c: f"H={c.heads}")
    kv_heads: int = _axis(kind="count", default=None, nesting=8, same_as="heads",
                          describe=lambda c: f"kv_heads={c.kv_heads}" if c.kv_heads != c.heads else "")
    seq_len: int = _axis(kind="count", default=(1024,), nesting=9, label="N", curve=True,
                         title="sequence length N", unit="tokens",
                         describe=lambda c: f"N={c.seq_len}")
    q_len: int | None = field(default=None, kw_only=True, metadata={"axis": Axis(
        kind="count", default=(None,), nesting=8, label="q", title="query tokens",
        describe=lambda c: f"q={c.q_len}" if c.q_len is not None else "")})
    head_dim: int = _axis(kind="count", default=(64,), nesting=7, label="D", describe=lambda c: f"D={c.head_dim}")
    dtype: torch.dtype = _axis(kind="dtype", default=("float32",), nesting=1, describe=lambda c: c.dtype_name)
    device: str = _axis(kind="device", default=("cpu",), nesting=0, describe=lambda c: c.device)
    causal: bool = _axis(kind="flag", default=(False,), nesting=4, describe=lambda c: "causal" if c.causal else "")
    mode: Mode = _axis(kind="mode", default=("forward",), nesting=2, describe=lambda c: c.mode)
    inputs: str = field(default="gaussian", metadata={"axis": Axis(
        kind="source", default=("gaussian",), nesting=3,
        describe=lambda c: f"inputs={c.inputs}" if c.inputs != "gaussian" else "")})

    def __post_init__(self) -> None:
        # One spelling per shape: a square pass has q_len None, a decode step a number.
        if self.mode == "decode" and self.q_len is None:
            object.__setattr__(self, "q_len", DECODE_DEFAULT_Q_LEN)
        elif self.mode != "decode" and self.q_len == self.seq_len:
            object.__setattr__(self, "q_len", None)

    @property
    def decode(self) -> bool:
        return self.mode == "decode"

    @property
    def query_len(self) -> int:
        """Query rows of the call (and of its output)."""
        return self.seq_len if self.q_len is None else self.q_len

    @property
    def key_len(self) -> int:
        """Keys and values the queries attend over: a decode step's new tokens included."""
        return self.seq_len + self.query_len if self.decode else self.seq_len

    @property
    def chunked(self) -> bool:
        """Fewer queries than keys outside decode: chunked prefill."""
        return not self.decode and self.query_len < self.seq_len

    @property
    def shape_problem(self) -> str:
        """Why these axes make no call ("" when they do): more queries than keys."""
        if not self.decode and self.query_len > self.seq_len:
            return f"q_len={self.q_len} > seq_len={self.seq_len} (queries are the last q_len of seq_len positions)"
        return ""

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
        """e.g. 'B=1 H=8 N=1024 D=64 float32 cpu causal forward'."""
        return " ".join(part for part in (axis.describe(self) for axis in AXES.values()) if part)

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["dtype"] = self.dtype_name
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Case:
        return cls(**{**fields, "dtype": DTYPES[fields["dtype"]]})


# The sweep's axes, in Case's field order: name -> Axis.
AXES: dict[str, Axis] = {item.name: item.metadata["axis"] for item in dataclasses.fields(Case)}
CURVE_AXIS: str = next(name for name, axis in AXES.items() if axis.curve)
CURVE_LABEL: str = AXES[CURVE_AXIS].label


def curve_x(case: Case) -> int:
    """The case's position on its scaling curve (its value of the curve axis)."""
    return getattr(case, CURVE_AXIS)


def group_key(case: Case) -> Case:
    """The case with the curve axis blanked: the points of one scaling curve share it."""
    return dataclasses.replace(case, **{CURVE_AXIS: 0})


def describe_group(group: Case) -> str:
    """The fixed axes of a scaling curve, e.g. 'B=1 H=8 D=64 float32 cpu causal forward'."""
    return " ".join(part for name, axis in AXES.items() if name != CURVE_AXIS and (part := axis.describe(group)))


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
