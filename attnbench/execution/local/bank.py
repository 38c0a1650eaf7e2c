"""A case's input sets and references, made once for every implementation of the case.

The sets (attnbench.measuring.correctness: the primary set, the set the timed calls alternate
with, one fresh set per round) are drawn once and kept as files: the first two in a folder
workers may read, the fresh ones in the harness's private folder, which workers cannot read (a
worker is handed its round's fresh set only after its timed calls). Exact attention of each set
at the case's rows is computed here, in the harness, once, when the first point needs it.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attnbench.contract.case import Case
from attnbench.contract.inputs import Inputs
from attnbench.execution.local.worker import read_inputs, write_inputs
from attnbench.measuring.correctness import PRIMARY, ROTATION, CaseReferences, case_references, fresh_set, set_names
from attnbench.measuring.tensor_files import NAMES, TensorFile
from attnbench.settings.suite import CorrectnessSettings

# A fresh set drawn from a source of k distinct inputs repeats one of the two timed sets with
# probability 2/k per seed: 2/3 for the fewest that can work (three text windows). With this many
# new seeds a repeat is left over with probability (2/3)^64 ≈ 5e-12 a set; with 16 it was about 1
# case in 80 at 8 rounds, and the whole case failed.
REDRAWS = 64
# (case, seeds) -> each set's description, as written by write_inputs into the given folder
Drawer = Callable[[Case, Mapping[str, int], Path], tuple[dict[str, dict[str, Any]], list[str]]]


class CaseBank:
    """One case's input sets (as files) and, once asked for, its references."""

    def __init__(self, case: Case, seed: int, rounds: int, shared: Path, private: Path, draw: Drawer) -> None:
        self.case = case
        self.seeds = {name: seed if name == PRIMARY else secrets.randbits(63) for name in set_names(rounds)}
        self.shared, self.private = shared, private
        for folder in (shared, private):
            folder.mkdir(parents=True)
        described, self.notes = draw(case, self.seeds, private)
        self.described = {name: _checked(case, name, described.get(name)) for name in self.seeds}
        self._redraw_repeats(draw, private)
        for name in (PRIMARY, ROTATION):  # what every worker of the case reads, in the folder it may read
            self.described[name] = _moved(self.described[name], shared)
        self.references: CaseReferences | None = None

    def _redraw_repeats(self, draw: Drawer, folder: Path) -> None:
        """No set repeats a timed one: a source with a few distinct inputs (a model's text windows)
        can give one again for a new seed, and a fresh set equal to a timed one checks nothing.
        A repeated set is drawn again with a new seed (beside the primary, which a decode set's
        cache comes from)."""
        for _ in range(REDRAWS):
            repeats = _repeated(self.described)
            if not repeats:
                return
            seeds = {PRIMARY: self.seeds[PRIMARY], **{name: secrets.randbits(63) for name in repeats}}
            redrawn, _ = draw(self.case, seeds, folder)
            self.seeds.update(seeds)
            self.described.update({name: _checked(self.case, name, redrawn.get(name)) for name in repeats})
        raise ValueError(f"the input source gave set(s) {', '.join(repeats)} the values of a timed set again for "
                         f"{REDRAWS} new seeds: its checks need three sets that differ (does the source have "
                         "three distinct inputs? e.g. texts: 3 or more)")

    def worker_sets(self) -> list[dict[str, Any]]:
        """The sets a point's worker gets at its start, in the order of its input sets."""
        return [self.described[PRIMARY], self.described[ROTATION]]

    def inputs(self, name: str) -> Inputs:
        return read_inputs(self.described[name], self.case)

    def fresh(self, round_index: int) -> Inputs:
        return self.inputs(fresh_set(round_index))

    def references_for(self, settings: CorrectnessSettings) -> CaseReferences:
        """Exact attention of every set at the case's rows (computed at the first call)."""
        if self.references is None:
            by_seed = {seed: name for name, seed in self.seeds.items()}
            self.references = case_references(self.case, settings, self.seeds,
                                              lambda seed: self.inputs(by_seed[seed]))
        return self.references

    def close(self) -> None:
        for folder in (self.shared, self.private):
            shutil.rmtree(folder, ignore_errors=True)


def _repeated(described: Mapping[str, dict[str, Any]]) -> list[str]:
    """The sets that repeat a timed set: the rotation equal to the primary, a fresh set equal to
    either (compared by their files' sha256). Fresh sets may repeat each other: each is checked in
    a round of its own, against the timed calls of that round."""
    digests = {name: _digest(files) for name, files in described.items()}
    timed = {digests[PRIMARY]}
    repeats = [ROTATION] if digests[ROTATION] in timed else []
    timed.add(digests[ROTATION])
    return repeats + [name for name in described if name not in (PRIMARY, ROTATION) and digests[name] in timed]


def _digest(files: Mapping[str, Any]) -> bytes:
    digest = hashlib.sha256()
    for tensor in ("q", "k", "v"):
        digest.update((Path(files["folder"]) / files["tensors"][tensor]["name"]).read_bytes())
    return digest.digest()


def _checked(case: Case, name: str, described: object) -> dict[str, Any]:
    """A drawn set's description, checked against the shapes and dtype the case calls for (a
    plugin's input source wrote it)."""
    if not isinstance(described, dict) or not isinstance(described.get("tensors"), dict):
        raise ValueError(f"the input source gave no input set {name!r}")
    expected = {"q": (case.batch, case.heads, case.query_len, case.head_dim),
                "k": (case.batch, case.kv_heads, case.key_len, case.head_dim),
                "v": (case.batch, case.kv_heads, case.key_len, case.head_dim)}
    if case.backward:
        expected["grad_out"] = expected["q"]
    tensors = {tensor: TensorFile.from_json(described["tensors"].get(tensor)) for tensor in expected}
    for tensor, shape in expected.items():
        if tensors[tensor].shape != shape or tensors[tensor].dtype != NAMES[case.dtype]:
            raise ValueError(f"the input source's {tensor} of set {name!r} is {tensors[tensor].dtype} "
                             f"{tensors[tensor].shape} (expected {NAMES[case.dtype]} {shape})")
    return {"folder": str(described["folder"]), "tensors": {tensor: file.to_json() for tensor, file in tensors.items()}}


def _moved(described: dict[str, Any], folder: Path) -> dict[str, Any]:
    source = Path(described["folder"])
    for file in described["tensors"].values():
        (source / file["name"]).rename(folder / file["name"])
    return {**described, "folder": str(folder)}


def drawn_here(source_draw: Callable[[Case, int, Inputs | None], Inputs]) -> Drawer:
    """A Drawer for the harness's own input sources: drawn in this process."""

    def draw(case: Case, seeds: Mapping[str, int], folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
        described, primary = {}, None
        for name, seed in seeds.items():
            inputs = source_draw(case, seed, primary)
            primary = primary or inputs
            described[name] = write_inputs(folder, name, inputs)
        return described, []

    return draw
