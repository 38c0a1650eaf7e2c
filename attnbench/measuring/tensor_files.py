"""Tensors passed between the harness and a worker as raw files, described by plain data.

No pickle crosses from a worker to the harness: a worker writes each tensor's bytes to a file in
its scratch folder and sends a description (``TensorFile``: name, dtype, shape) in its JSON
reply; the harness reads the file back only after checking that it is a regular file of exactly
the size the description implies, with a dtype and shape it expected. Inputs go the other way
the same way, so the harness never needs a worker to unpickle anything it made.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: Mapping[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FILE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")


class TensorFileError(ValueError):
    """A described tensor that cannot be read as described (a worker's broken or hostile reply)."""


@dataclass(frozen=True)
class TensorFile:
    """One tensor's file in a folder: ``name`` (a plain file name), its dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: object) -> TensorFile:
        """Checked: a worker's description is data to validate, not to trust."""
        if not isinstance(data, Mapping):
            raise TensorFileError(f"a tensor description is a {type(data).__name__}")
        name, dtype, shape = data.get("name"), data.get("dtype"), data.get("shape")
        if not (isinstance(name, str) and 0 < len(name) <= 64 and set(name) <= FILE_NAME_CHARS
                and not name.startswith(".")):
            raise TensorFileError(f"tensor file name {str(name)[:80]!r} is not a plain file name")
        if dtype not in DTYPES:
            raise TensorFileError(f"tensor dtype {str(dtype)[:40]!r} (allowed: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape)):
            raise TensorFileError(f"tensor shape {str(shape)[:80]} is not a list of sizes")
        return cls(name, dtype, tuple(shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def write_tensor(folder: Path, name: str, tensor: torch.Tensor) -> TensorFile:
    """``tensor``'s values (moved to the CPU) into ``folder/name``."""
    values = tensor.detach().to("cpu").contiguous()
    path = folder / name
    with open(path, "wb") as file:
        if values.numel():
            file.write(memoryview(values.reshape(-1).view(torch.uint8).numpy()))
    return TensorFile(name, NAMES[values.dtype], tuple(values.shape))


def read_tensor(folder: Path, described: TensorFile, limit_bytes: int) -> torch.Tensor:
    """The tensor ``described`` in ``folder``, on the CPU; a TensorFileError when the file is not a
    regular file of the described size (a link, a FIFO, a device: never followed or waited on) or
    the size is over ``limit_bytes``."""
    expected = described.nbytes
    if expected > limit_bytes:
        raise TensorFileError(f"{described.name}: {expected} bytes described, over the {limit_bytes} expected")
    try:
        descriptor = os.open(folder / described.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise TensorFileError(f"{described.name}: cannot be opened ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_size != expected:
            raise TensorFileError(f"{described.name}: not a regular file of {expected} bytes")
        data = bytearray(expected)
        view, done = memoryview(data), 0
        while done < expected:
            count = os.readv(descriptor, [view[done:]])
            if count <= 0:
                raise TensorFileError(f"{described.name}: shorter than described")
            done += count
    finally:
        os.close(descriptor)
    if not expected:
        return torch.empty(described.shape, dtype=DTYPES[described.dtype])
    return torch.frombuffer(data, dtype=DTYPES[described.dtype]).reshape(described.shape)


# --- a few tensors in one file both sides hold, for the call on fresh inputs ---------------------
#
# The harness writes the fresh values into the file just before it asks for the call, and reads
# the output from it as soon as the answer comes: the worker cannot see the values before the
# call it is timed on, nor put off computing the output until after. The worker maps the file (its
# tensors are the file's pages); the harness only reads and writes it (pread, pwrite), never maps
# it, so a worker that shrinks the file costs the harness a short read, not a crash.

ALIGNMENT = 64


def shared_layout(files: list[TensorFile]) -> tuple[dict[str, int], int]:
    """Each tensor's offset in the file, and the file's size."""
    offsets, size = {}, 0
    for file in files:
        offsets[file.name] = size
        size += -(-file.nbytes // ALIGNMENT) * ALIGNMENT
    return offsets, size


def map_shared(path: Path, files: list[TensorFile]) -> dict[str, torch.Tensor]:
    """The worker's side: the file's tensors, sharing its pages."""
    offsets, size = shared_layout(files)
    base = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    return {file.name: base[offsets[file.name]: offsets[file.name] + file.nbytes].view(DTYPES[file.dtype])
            .view(file.shape) for file in files}


class SharedFile:
    """The harness's side: a file of tensors it creates, writes and reads by offset."""

    def __init__(self, path: Path, files: list[TensorFile]) -> None:
        self.path, self.files = path, {file.name: file for file in files}
        self.offsets, size = shared_layout(files)
        self.descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.pwrite(self.descriptor, bytes(size), 0)  # its pages exist before either side touches them

    def described(self) -> dict[str, object]:
        return {"path": str(self.path), "tensors": [file.to_json() for file in self.files.values()]}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file = self.files[name]
        values = tensor.detach().to("cpu", DTYPES[file.dtype]).contiguous()
        if tuple(values.shape) != file.shape:
            raise ValueError(f"{name}: {tuple(values.shape)} written where {file.shape} was laid out")
        os.pwrite(self.descriptor, memoryview(values.reshape(-1).view(torch.uint8).numpy()), self.offsets[name])

    def read(self, name: str) -> torch.Tensor:
        """A copy of the tensor as the file holds it now; a TensorFileError when it is cut short."""
        file = self.files[name]
        data = os.pread(self.descriptor, file.nbytes, self.offsets[name])
        if len(data) != file.nbytes:
            raise TensorFileError(f"{self.path.name}: {name} cut short ({len(data)} of {file.nbytes} bytes)")
        if not file.nbytes:
            return torch.empty(file.shape, dtype=DTYPES[file.dtype])
        return torch.frombuffer(bytearray(data), dtype=DTYPES[file.dtype]).reshape(file.shape)

    def close(self) -> None:
        os.close(self.descriptor)
