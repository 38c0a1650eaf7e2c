"""The prose the models read: CPython's own English documentation (``pydoc_data.topics``),
on every machine with Python and nothing to download. Its length differs between Python
versions, so the cache keys carry a digest of the tokens read, not the version."""

from __future__ import annotations

import functools
import hashlib

import torch


@functools.cache
def corpus() -> str:
    """Every topic of the reference documentation, in the order of their names."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def token_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()


def window(tokens: torch.Tensor, index: int, length: int) -> torch.Tensor | None:
    """The ``index``-th stretch of ``length`` tokens, or None when the text is too short for it."""
    start = index * length
    if start + length > len(tokens):
        return None
    return tokens[start:start + length]
