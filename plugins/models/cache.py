"""A verified on-disk cache of captured q, k, v: nothing read from it is trusted unchecked.

Each entry is one safetensors file (no pickle: loading it runs no code) whose metadata holds
the key it was written for and the sha256 of its tensors' bytes. A file that cannot be read,
was written for another key, or whose bytes do not match its digest is treated as absent: the
caller captures again and overwrites it. Writes go to a temporary file renamed into place, so a
run killed mid-write leaves no half file under the entry's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch



def entry_path(folder: Path, key: Mapping[str, object]) -> Path:
    """Where the entry for ``key`` lives in ``folder`` (named by a digest of the key)."""
    name = hashlib.sha256(_key_text(key).encode()).hexdigest()[:24]
    return folder / f"{name}.safetensors"


def read_entry(path: Path, key: Mapping[str, object]) -> dict[str, torch.Tensor] | None:
    """The tensors stored for ``key``, or None when the file is missing, unreadable, foreign or
    corrupt (then it is removed)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - any failure to read means: capture again
        _remove(path)
        return None
    if metadata.get("key") != _key_text(key) or metadata.get("sha256") != _digest(tensors):
        _remove(path)
        return None
    return tensors


def write_entry(path: Path, key: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> int:
    """Store ``tensors`` for ``key``; returns the file's size in bytes."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"key": _key_text(key), "sha256": _digest(tensors)})
        os.replace(temporary, path)
    finally:
        _remove(Path(temporary))
    return path.stat().st_size


def _key_text(key: Mapping[str, object]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
