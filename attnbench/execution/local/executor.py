"""The local executor: each unit of work in its own confined, forked worker on this machine, one at
a time, in the order submitted (points measured side by side must not share the machine).

For a point's round it keeps, per case, the case's input sets and references (``CaseBank``), a
scratch folder per worker (removed after it) and per series a compile cache that lasts the run;
it starts the worker and drives the round from here (attnbench.measuring.round). Plugin code runs
only in workers: a worker loads the plugin that registered the implementation a unit names (the
catalog says how) or, for one registered by Python code in this process, receives it pickled; an
input source a plugin registered draws in a worker of its own; an implementation's own reference
is computed in a worker of its own that never times anything.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.inputs import BUILTIN_SOURCES, CACHE_VARIABLE, input_cache_root
from attnbench.contract.catalog import Catalog, as_catalog
from attnbench.contract.registry import Registry
from attnbench.execution.executor import Finished, PointRound, StartedCallback, WorkUnit, YardstickRound
from attnbench.execution.local.bank import CaseBank, drawn_here
from attnbench.execution.local import memory_group
from attnbench.execution.local.isolation import RoundFailed, WorkerProcess
from attnbench.execution.local.point_worker import IsolatedWorker
from attnbench.execution.local.worker import WorkerSpec
from attnbench.measuring import outcome
from attnbench.measuring.correctness import Verifier, verifier_for
from attnbench.measuring.inputs import draw_set
from attnbench.measuring.outcome import Outcome, Yardstick
from attnbench.measuring.round import Declarations, RoundPlan, measure_round
from attnbench.measuring.tensor_files import TensorFile, TensorFileError, read_tensor
from attnbench.settings.suite import Limits
from attnbench.storage.environment import Environment, capture_environment
from attnbench.storage.ledger import ledger_key_store
from attnbench.support.confinement import expected_protections, set_dumpable
from attnbench.support.containment import PLUGIN_CALL_TIMEOUT_S, PluginFault, contained


class LocalExecutor:
    def __init__(self, catalog: Catalog | Registry, started: StartedCallback | None = None) -> None:
        self.catalog = as_catalog(catalog)
        self.started = started or (lambda unit: None)
        self.pending: deque[WorkUnit] = deque()
        self._root: tempfile.TemporaryDirectory[str] | None = None
        self._bank: tuple[tuple[Any, ...], CaseBank | RoundFailed] | None = None
        self._workers = 0
        set_dumpable(False)  # a worker (where Landlock is missing) cannot read or ptrace this process

    def submit(self, unit: WorkUnit) -> None:
        self.pending.append(unit)

    def finished(self) -> Iterator[Finished]:
        while self.pending:
            unit = self.pending.popleft()
            self.started(unit)
            yield self._run(unit)

    def cancel(self) -> None:
        self.pending.clear()

    def close(self) -> None:
        """Removes every file the run's workers and input sets left here."""
        self.cancel()
        self._drop_bank()
        if self._root is not None:
            self._root.cleanup()
            self._root = None

    def memory_cap_bytes(self, limits: Limits, device: str) -> int | None:
        return memory_cap_bytes(limits, device)

    def memory_cap_held(self, limits: Limits, device: str) -> str:
        return memory_group.enforcement(memory_cap_bytes(limits, device), device)

    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        return capture_environment(threads=threads, plugins=plugins, protections=expected_protections(
            self.hidden_folders()).to_json())

    # --- running a unit -------------------------------------------------------------------

    def _run(self, unit: WorkUnit) -> Finished:
        if isinstance(unit, YardstickRound):
            return self._yardstick(unit)
        ref = unit.implementation
        if ref.name not in self.catalog or self.catalog.plugin_of(ref.name) != ref.plugin:
            return Finished(unit, outcome.not_here(ref.name, ref.plugin), 0.0)
        try:
            job = self._job(ref.name, ref.plugin, "implementation")
            bank = self._case_bank(unit)
            make_verifier = self._verifier_maker(unit, job, bank)  # (before the point's worker starts)
        except RoundFailed as failed:
            return Finished(unit, failed.failure, 0.0)
        spec = self._spec("point", job, unit.threads, writable=(self._series_cache(unit.series),))
        process = worker = None
        result: Outcome | None = None  # (none when a stop ends the round)
        cap = memory_cap_bytes(unit.limits, unit.case.device)
        group = memory_group.memory_group(cap) if unit.case.device_type == "cpu" else None
        try:
            process = WorkerProcess(spec, unit.limits.timeout_s)
            if group is not None:
                group.admit(process.pid)  # (before the case is sent: the worker waits for it)
            cache = unit.measure.latency.cache if unit.measure.latency else "warm"
            worker = IsolatedWorker(process, unit.case, unit.options, bank.worker_sets(),
                                    _worker_cap(cap, group is not None), cache,
                                    measures_memory=bool(unit.measure.memory))
            plan = RoundPlan(unit.case, unit.measure, self.catalog.get(ref.name).exact, unit.round_index,
                             unit.threads, unit.verifier, make_verifier, bank.fresh,
                             notes=list(bank.notes))
            with _one_thread():
                result = measure_round(worker, plan)
        except RoundFailed as failed:
            result = failed.failure
        except Exception as error:  # noqa: BLE001 (the worker's data broke the harness's checks: its row, no other)
            result = outcome.harness_failed(error)
        finally:
            ended = process.end() if process is not None else None
            if worker is not None:
                worker.close()
            shutil.rmtree(spec.scratch, ignore_errors=True)
            if group is not None and isinstance(result, outcome.Failure) and group.ended_by_kernel():
                result = outcome.over_memory_cap(memory_group.enforcement(cap, unit.case.device))
            elif isinstance(result, outcome.Failure) and result.status == "oom":
                result = outcome.with_memory_cap(result, memory_group.enforcement(cap, unit.case.device))
            if group is not None:
                group.remove()
        assert result is not None
        return Finished(unit, result, ended.wall_time_s if ended else 0.0, ended.log_tail if ended else "",
                        ended.notes if ended else ())

    def _yardstick(self, unit: YardstickRound) -> Finished:
        spec = self._spec("yardstick", Job(), unit.threads)
        process = None
        try:
            process = WorkerProcess(spec, unit.timeout_s)
            reply = process.request({"device": unit.device, "dtype": unit.dtype_name, "seconds": unit.run_time_s})
            rates = [reply.get(key) for key in ("flops", "copy_bytes_per_s")]
            if not all(isinstance(rate, (int, float)) and rate > 0 for rate in rates):
                raise RoundFailed(outcome.unreadable_result(ValueError(f"yardstick rates {rates!r}")))
            result: Outcome = Yardstick(float(rates[0]), float(rates[1]))
        except RoundFailed as failed:
            result = failed.failure
        finally:
            ended = process.end() if process is not None else None
            shutil.rmtree(spec.scratch, ignore_errors=True)
        return Finished(unit, result, ended.wall_time_s if ended else 0.0, ended.log_tail if ended else "",
                        ended.notes if ended else ())

    def _job(self, name: str, plugin: str, what: str, parameters: Mapping[str, Any] | None = None) -> Job:
        """How a worker gets ``name``: the object pickled, for one registered by Python code in this
        process (a plugin's ``__getstate__`` runs contained); else its plugin, which it loads itself."""
        found = self.catalog.python_object(name)
        if found is not None:
            if parameters is not None:
                found = found.configured(parameters)  # type: ignore[union-attr]
            payload = contained(lambda: pickle.dumps(found), f"pickling the {what} for a worker", PLUGIN_CALL_TIMEOUT_S)
            if isinstance(payload, PluginFault):
                raise RoundFailed(outcome.unsendable(payload.message, payload.detail))
            return Job(payload=payload)
        info = self.catalog.plugins.get(plugin)
        if info is None:
            raise RoundFailed(outcome.not_here(name, plugin))
        return Job(plugin=info.to_json(), name=name, parameters=dict(parameters or {}))

    # --- the case's inputs and references -------------------------------------------------

    def _case_bank(self, unit: PointRound) -> CaseBank:
        """The bank of the unit's case (made when its first point arrives; one case at a time)."""
        key = (unit.case, unit.seed, tuple(sorted(unit.source_options.items())), unit.rounds)
        if self._bank is not None and self._bank[0] == key:
            bank = self._bank[1]
            if isinstance(bank, RoundFailed):
                raise bank
            return bank
        self._drop_bank()
        root = self._scratch_root()
        self._workers += 1
        try:
            bank: CaseBank | RoundFailed = CaseBank(unit.case, unit.seed, unit.rounds, root / f"inputs-{self._workers}",
                                                    root / "private" / f"inputs-{self._workers}", self._drawer(unit))
        except RoundFailed as failed:
            bank = failed
        except (ValueError, TensorFileError) as error:
            bank = RoundFailed(outcome.unreadable_result(error))
        except Exception as error:  # noqa: BLE001 (the harness's own draw of the case: NotSupported, a bad shape)
            bank = RoundFailed(outcome.from_exception(error))
        self._bank = (key, bank)
        if isinstance(bank, RoundFailed):
            raise bank
        return bank

    def _drop_bank(self) -> None:
        if self._bank is not None and isinstance(self._bank[1], CaseBank):
            self._bank[1].close()
        self._bank = None

    def _drawer(self, unit: PointRound):
        name = unit.case.inputs
        registered = self.catalog.input_sources.get(name)
        if registered is None:
            raise RoundFailed(outcome.no_such_source(name))
        if name in BUILTIN_SOURCES:  # the harness's own code: drawn here
            source = BUILTIN_SOURCES[name].configured(unit.source_options)
            return drawn_here(lambda case, seed, primary: draw_set(case, seed, source, primary))
        job = self._job(name, registered.plugin, "input source", unit.source_options)
        cache = input_cache_root(str(unit.source_options.get("cache", ""))) / name  # the user's choice only
        return lambda case, seeds, folder: self._draw_in_worker(job, cache, case, seeds, folder, unit)

    def _draw_in_worker(self, job: Job, cache: Path, case: Case, seeds: Mapping[str, int], folder: Path,
                        unit: PointRound) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """A plugin's input source draws in a confined worker of its own, which may write only its
        scratch folder and the source's own folder of the input cache; the files then move to ``folder``."""
        cache.mkdir(parents=True, exist_ok=True)
        spec = self._spec("draw", job, unit.threads, writable=(cache,))
        process = None
        try:
            process = WorkerProcess(spec, unit.limits.timeout_s)
            reply = process.request({"case": case.to_json(), "seeds": dict(seeds)})
            sets = reply.get("sets")
            if not isinstance(sets, dict):
                raise RoundFailed(outcome.unreadable_result(ValueError("the input source's draw gave no sets")))
            moved = {}
            for name, described in sets.items():
                tensors = described.get("tensors") if isinstance(described, dict) else None
                if not isinstance(tensors, dict):
                    continue
                for file in tensors.values():
                    name_of = TensorFile.from_json(file).name
                    os.replace(spec.scratch / name_of, folder / name_of)
                moved[name] = {"folder": str(folder), "tensors": tensors}
            notes = [note for note in reply.get("notes", []) if isinstance(note, str)]
            return moved, notes
        finally:
            if process is not None:
                process.end()
            shutil.rmtree(spec.scratch, ignore_errors=True)

    def _verifier_maker(self, unit: PointRound, job: Job, bank: CaseBank):
        """Round 1's verifier, from the case's references and, for an approximation with a reference
        of its own, those, computed now: before the point's worker starts, so no process that
        learns the rows ever runs beside one that is timed."""
        correctness = unit.measure.correctness
        if correctness is None or unit.verifier is not None:
            return None
        info = self.catalog.get(unit.implementation.name)
        references = bank.references_for(correctness)
        own = self._own_references(unit, job, bank) if info.own_reference and not info.exact else None

        def make(declared: Declarations) -> tuple[Verifier, list[str]]:
            verifier, notes = verifier_for(references, own, info.exact, declared.tolerance, unit.case.dtype)
            return verifier, [*references.notes, *notes]

        return make

    def _own_references(self, unit: PointRound, job: Job, bank: CaseBank) -> dict[str, Any]:
        """The implementation's own reference of every set, from a worker that times nothing and
        keeps nothing, and that has ended (with all it started) before the timed worker starts."""
        references = bank.references
        assert references is not None
        spec = self._spec("reference", job, unit.threads, hide_private=False)
        process = None
        try:
            process = WorkerProcess(spec, unit.limits.timeout_s)
            reply = process.request({"case": unit.case.to_json(), "options": dict(unit.options),
                                     "sets": dict(bank.described), "rows": references.rows.tolist()})
            found = reply.get("references")
            if not isinstance(found, dict):
                raise RoundFailed(outcome.unreadable_result(ValueError("no references")))
            return {name: _own_reference(spec.scratch, found.get(name), unit.case, len(references.rows))
                    for name in bank.seeds}
        except TensorFileError as error:
            raise RoundFailed(outcome.unreadable_result(error)) from None
        finally:
            if process is not None:
                process.end()
            shutil.rmtree(spec.scratch, ignore_errors=True)

    # --- folders --------------------------------------------------------------------------

    def _spec(self, kind: str, job: Job, threads: int, writable: tuple[Path, ...] = (),
              hide_private: bool = True) -> WorkerSpec:
        root = self._scratch_root()
        self._workers += 1
        scratch = root / f"worker-{self._workers}"
        scratch.mkdir()
        hidden = self.hidden_folders() if hide_private else self.hidden_folders()[1:]
        compiled = (writable or (scratch,))[0]
        environment = {"TORCHINDUCTOR_CACHE_DIR": str(compiled / "inductor"), "TRITON_CACHE_DIR": str(compiled / "triton"),
                       CACHE_VARIABLE: str(input_cache_root())}
        return WorkerSpec(kind, scratch, threads, writable, hidden, job.plugin, job.name, job.parameters, job.payload,
                          environment)

    def hidden_folders(self) -> tuple[Path, ...]:
        """What no worker may read: the harness's private input sets (first), the ledger's keys."""
        return (self._scratch_root() / "private", *ledger_key_folders())

    def _series_cache(self, series: str) -> Path:
        folder = self._scratch_root() / "series" / re.sub(r"[^a-z0-9_.=-]", "_", series.lower())[:80]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _scratch_root(self) -> Path:
        if self._root is None:
            self._root = tempfile.TemporaryDirectory(prefix="attnbench-")
            (Path(self._root.name) / "private").mkdir(mode=0o700)
        return Path(self._root.name)


def _own_reference(scratch: Path, found: object, case: Case, rows: int) -> dict[str, Any] | None:
    """One set's own reference as the reference worker wrote it, checked against what the case and
    the rows call for: float64, the output and dq at the rows, dk and dv at every key."""
    if found is None:
        return None
    if not isinstance(found, dict):
        raise RoundFailed(outcome.unreadable_result(ValueError("an own reference that is not a mapping")))
    expected = {"out": (case.batch, case.heads, rows, case.head_dim), "dq": (case.batch, case.heads, rows, case.head_dim),
                "dk": (case.batch, case.kv_heads, case.key_len, case.head_dim),
                "dv": (case.batch, case.kv_heads, case.key_len, case.head_dim)}
    tensors = {}
    for name, described in found.items():
        if name not in expected:
            continue
        file = TensorFile.from_json(described)
        if file.shape != expected[name] or file.dtype != "float64":
            raise RoundFailed(outcome.Failure("error", (f"its own reference gave {name} as {file.dtype} {file.shape} "
                                                        f"(expected float64 {expected[name]}: the rows it was given)",)))
        tensors[name] = read_tensor(scratch, file, file.nbytes)
    if "out" not in tensors:
        raise RoundFailed(outcome.Failure("error", ("its own reference gave no output",)))
    return tensors


@dataclass(frozen=True)
class Job:
    """What a worker runs (attnbench.execution.local.worker.WorkerSpec): a plugin's registration
    it loads itself by name, or a pickled object; nothing for a yardstick."""

    plugin: dict[str, str] | None = None
    name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None


def ledger_key_folders() -> tuple[Path, ...]:
    """The ledger's key store (attnbench.storage.ledger), made now if no run has made it yet: a
    folder must exist to be hidden."""
    store = ledger_key_store()
    try:
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:  # where it cannot be made, no key can be kept there either
        return ()
    return (store,)


def memory_cap_bytes(limits: Limits, device: str) -> int | None:
    """The suite's cap, or half of physical RAM on the CPU; on a GPU its own memory is the cap."""
    if limits.memory_gb is not None:
        return int(limits.memory_gb * 2**30)
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return None


def _worker_cap(cap: int | None, in_group: bool) -> dict[str, int] | None:
    """What the worker limits itself to: its address space (RLIMIT_DATA), with room to spare where a
    memory cgroup holds the cap itself, and on a GPU the cap."""
    if cap is None:
        return None
    return {"bytes": cap, "address_space_bytes": memory_group.ADDRESS_SPACE_FACTOR * cap if in_group else cap}


@contextmanager
def _one_thread() -> Iterator[None]:
    """The harness's own tensor work during a round (checking outputs at a few rows, a fresh set)
    is small: on one thread it never waits to wake a pool of threads while the worker holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
