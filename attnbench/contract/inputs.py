"""Input sources: where a case's q, k, v come from (the suite's ``inputs`` axis).

Sources are registered like implementations (``registry.add(source)``); the first two:

- ``gaussian``: q, k, v i.i.d. N(0, 1). Attention logits q·k/√d have standard deviation 1:
  attention is spread thin over many keys, with no structure to exploit.
- ``structured``: strong local and some global attention mass, as trained language models show.
  q and k share a smooth positional code, so each query's largest logits (about 5) fall on
  keys within a few dozen positions; on top, every query shares one direction that keys carry
  with a weight varying smoothly along the sequence (a field with standard deviation 1 in
  logits, correlated over N/16 positions), so some regions draw attention from everywhere.
  The local mass stays fixed while the global field's grows with N: inside a ±256 window lie
  86% of the attention mass at N=1024, 54% at 4096, 24% at 16384 (tests/test_inputs.py).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnbench.contract.case import Case

SOURCE_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]{0,31}$")

# Notes of an input source on a row start with this (reports gather them in one place).
SOURCE_NOTE_PREFIX = "inputs: "
CACHE_VARIABLE = "ATTNBENCH_CACHE"

LOCAL_LOGIT = 5.0  # a query's logit on its own position
GLOBAL_LOGIT = 1.0  # the standard deviation, in logits, of the keys' shared global field
LOCAL_LENGTH = 32  # positions over which the positional code stays similar
REGIONS = 16  # the global field varies over N / REGIONS positions


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor  # (B, KV, N, D)
    v: torch.Tensor  # (B, KV, N, D)
    grad_out: torch.Tensor | None  # (B, H, N, D), the upstream gradient in training mode


class InputSource:
    """Base class of an input source. Subclass it, set the name and implement ``draw``.

    ``parameters``: what the source needs besides the case (a model, a layer), with defaults;
    ``draw`` reads the values in effect from ``self.parameters``.
    The harness draws the upstream gradient, casts to the case's dtype and moves to its device.
    """

    name: str = ""
    description: str = ""
    parameters: Mapping[str, Any] = {}  # name -> default; a suite sets them under source_options

    def configured(self, values: Mapping[str, Any]) -> InputSource:
        """This source with ``values`` laid over its default parameters (itself when none)."""
        if not values:
            return self
        source = copy.copy(self)
        source.parameters = {**self.parameters, **values}
        return source

    def draw(self, case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, N, D) and k, v (B, KV, N, D), float32 on the CPU, drawn from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement draw()")

    def not_supported_reasons(self, case: Case) -> list[str]:
        """Why this source cannot give the case's inputs (a shape its model does not have, a
        length beyond its context, a missing package); empty when it can. The point is then
        ``unsupported`` with these reasons."""
        return []

    def notes(self) -> list[str]:
        """What this process's draws did that a reader of the results should know (a capture
        and its cost, a cache read); kept with the point's row."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def input_cache_root(chosen: str = "") -> Path:
    """Where input sources keep what they capture: ``chosen`` (a suite's ``cache`` parameter) when
    given, else ``$ATTNBENCH_CACHE``, else ``$XDG_CACHE_HOME/attnbench``, else ``~/.cache/attnbench``.
    A source draws in a worker that may write only beneath ``input_cache_root(...) / source.name``."""
    if chosen:
        return Path(chosen).expanduser()
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnbench"


def source_reasons(source: InputSource, case: Case) -> list[str]:
    """The source's ``not_supported_reasons``, checked to be a list of non-empty strings."""
    reasons = source.not_supported_reasons(case)
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(reason, str) and reason for reason in reasons):
        raise TypeError(f"input source {source.name!r}: not_supported_reasons returned {reasons!r:.200} "
                        "(expected a list of non-empty strings)")
    return [f"input source {source.name}: {reason}" for reason in reasons]


def source_violations(obj: object) -> list[str]:
    """What is wrong with ``obj`` as an input source; empty when it fulfils the contract."""
    problems = []
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not SOURCE_NAME_PATTERN.match(name):
        problems.append(f"name={name!r} (allowed: lowercase letters, digits, '_' or '-', at most 32)")
    if not isinstance(getattr(obj, "parameters", None), Mapping):
        problems.append("parameters must be a mapping from parameter names to defaults")
    if type(obj).draw is InputSource.draw:
        problems.append("draw(case, generator) is not implemented")
    return problems


class GaussianInputs(InputSource):
    name = "gaussian"
    description = "q, k, v i.i.d. N(0, 1)"

    def draw(self, case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = _normal(case, case.heads, generator)
        k = _normal(case, case.kv_heads, generator)
        v = _normal(case, case.kv_heads, generator)
        return q, k, v


class StructuredInputs(InputSource):
    name = "structured"
    description = "strong local and some global attention mass, as trained language models show"

    def draw(self, case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _structured(case, generator)


BUILTIN_SOURCES: Mapping[str, InputSource] = {source.name: source for source in (GaussianInputs(), StructuredInputs())}


def _normal(case: Case, heads: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((case.batch, heads, case.seq_len, case.head_dim), generator=generator)


def _structured(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kv_heads, seq_len, dim = case.batch, case.kv_heads, case.seq_len, case.head_dim
    root = dim**0.25  # q·k/√d = a·b·(x·y) for q = a·d^¼·x and k = b·d^¼·y
    position = _smooth((batch * kv_heads * dim, seq_len), LOCAL_LENGTH, generator)
    position = F.normalize(position.view(batch, kv_heads, dim, seq_len).transpose(-1, -2), dim=-1)  # (B, KV, N, D)
    field = _smooth((batch * kv_heads, seq_len), max(1, seq_len // REGIONS), generator)
    field = (field / field.std(dim=-1, keepdim=True)).view(batch, kv_heads, seq_len, 1)  # std 1 along N
    shared = F.normalize(torch.randn((batch, kv_heads, 1, dim), generator=generator), dim=-1)
    local, glob = math.sqrt(LOCAL_LOGIT), math.sqrt(GLOBAL_LOGIT)
    q = root * (local * position + glob * shared)
    k = root * (local * position + glob * field * shared)
    q = q.repeat_interleave(case.heads // kv_heads, dim=1)  # the query heads of a group share its code
    v = torch.randn((batch, kv_heads, seq_len, dim), generator=generator)
    return q, k, v


def _smooth(shape: tuple[int, int], length: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, N) white noise smoothed along N by a Gaussian of width ``length``."""
    noise = torch.randn((shape[0], 1, shape[1]), generator=generator)
    offsets = torch.arange(-3 * length, 3 * length + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / length) ** 2).view(1, 1, -1)
    return F.conv1d(noise, kernel, padding=kernel.shape[-1] // 2).view(shape)
