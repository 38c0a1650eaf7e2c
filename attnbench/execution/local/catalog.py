"""The catalog of installed plugins, loaded in a confined worker: no plugin code in the harness.

``load_catalog`` starts a worker (attnbench.execution.local.worker, kind "catalog") that imports
the built-in plugins and the ``attnbench`` entry points, runs their registration hooks and sends
back what they registered as data (attnbench.contract.catalog). The worker stays up while the
harness still needs answers only plugin code can give (``invalid_options`` while a suite is
loaded, ``not_supported_reasons`` for ``attnbench list``); the harness ends it with ``close``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from attnbench.contract.case import Case
from attnbench.contract.catalog import Catalog, CatalogError, ImplementationInfo, PluginInfo, SourceInfo
from attnbench.contract.errors import UserError
from attnbench.contract.registry import BUILTIN_PLUGINS, LoadProblem
from attnbench.execution.local.isolation import RoundFailed, WorkerProcess
from attnbench.execution.local.wire import WireError, texts
from attnbench.execution.local.worker import WorkerSpec
from attnbench.storage.ledger import ledger_key_store
from attnbench.support.containment import PLUGIN_CALL_TIMEOUT_S, PluginFault

# Importing every plugin and running its hook: each is contained in the worker at
# PLUGIN_CALL_TIMEOUT_S; a hang that cannot be interrupted there (in C code) ends the catalog.
LOAD_TIMEOUT_S = 4 * PLUGIN_CALL_TIMEOUT_S


class ProcessCatalog(Catalog):
    """A Catalog whose plugin code lives in a confined worker process."""

    def __init__(self, process: WorkerProcess, scratch: Path, data: Mapping[str, Any]) -> None:
        self.process, self.scratch = process, scratch
        try:
            super().__init__(
                {info.name: info for info in (ImplementationInfo.from_json(item) for item in data["implementations"])},
                {info.name: info for info in (SourceInfo.from_json(item) for item in data["sources"])},
                {info.name: info for info in (PluginInfo.from_json(item) for item in data["plugins"])},
                _problems(data.get("problems")), _problems(data.get("settings_changed")),
            )
        except (CatalogError, KeyError, TypeError) as error:
            self.close()
            raise UserError(f"the plugins' catalog could not be read ({error})") from None

    def invalid_options(self, name: str, options: Mapping[str, Any]) -> dict[str, str] | PluginFault:
        reply = self._ask({"command": "invalid_options", "name": name, "options": dict(options)})
        if "fault" in reply:
            return PluginFault("invalid_options", str(reply["fault"])[:300])
        problems = reply.get("problems")
        if not isinstance(problems, dict) or not all(isinstance(value, str) for value in problems.values()):
            return PluginFault("invalid_options", "an answer that is not a mapping of problems")
        return {str(key): value for key, value in problems.items()}

    def support(self, name: str, cases: list[Case], timeout_s: float) -> list[list[str] | PluginFault]:
        reply = self._ask({"command": "support", "name": name, "cases": [case.to_json() for case in cases],
                           "timeout_s": timeout_s})
        answers = reply.get("answers")
        if not isinstance(answers, list) or len(answers) != len(cases):
            return [PluginFault("not_supported_reasons", "no answer")] * len(cases)
        found: list[list[str] | PluginFault] = []
        for answer in answers:
            if isinstance(answer, dict) and "fault" in answer:
                found.append(PluginFault("not_supported_reasons", str(answer["fault"])[:300],
                                         timed_out=bool(answer.get("timed_out"))))
            else:
                try:
                    found.append(texts({"reasons": answer}, "reasons"))
                except WireError:
                    found.append(PluginFault("not_supported_reasons", "an answer that is not a list of reasons"))
        return found

    def close(self) -> None:
        if self.process is not None:
            self.process.end()
            self.process = None  # type: ignore[assignment]
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.process is None:
            raise UserError("the plugins' catalog was already closed")
        self.process.deadline = time.monotonic() + 2 * PLUGIN_CALL_TIMEOUT_S  # each answer is contained there
        try:
            return self.process.request(message)
        except RoundFailed as failed:
            raise UserError(f"the plugins' catalog stopped answering ({'; '.join(failed.failure.reasons)})") from None


def load_catalog(entry_points: bool | None = None, modules: Sequence[str] = ()) -> ProcessCatalog:
    """The installed plugins as data: the built-ins, the entry points (unless ``entry_points`` is
    False, or None and ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD is set), and ``modules`` (plugin modules
    named by Python code, e.g. a test's), each registered in a confined worker."""
    scratch = Path(tempfile.mkdtemp(prefix="attnbench-catalog-"))
    store = ledger_key_store()
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = WorkerSpec("catalog", scratch, torch.get_num_threads(), hidden=(store,))
    process = None
    try:
        process = WorkerProcess(spec, LOAD_TIMEOUT_S)
        reply = process.request({"builtins": list(BUILTIN_PLUGINS), "entry_points": entry_points,
                                 "modules": list(modules)})
    except RoundFailed as failed:
        if process is not None:
            process.end()
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserError(f"the plugins could not be loaded: {'; '.join(failed.failure.reasons)} (set "
                        "ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD=1 to load only the built-ins)") from None
    return ProcessCatalog(process, scratch, reply.get("catalog") or {})


def _problems(data: object) -> list[LoadProblem]:
    if not isinstance(data, list):
        return []
    return [LoadProblem(str(item[0])[:80], str(item[1])[:1000]) for item in data
            if isinstance(item, list) and len(item) == 2]

