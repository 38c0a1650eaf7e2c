"""Loads implementations from the built-in plugins and the ``attnbench`` entry-point group."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pluggy

from attnbench.contract import hookspecs
from attnbench.contract.implementation import Implementation, contract_violations
from attnbench.contract.inputs import BUILTIN_SOURCES, InputSource, source_violations
from attnbench.support import process_state
from attnbench.support.containment import PluginFault, contained

# Set to any value to load only the built-ins (as pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD does).
DISABLE_AUTOLOAD_VARIABLE = "ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD"

# The one place the core names implementations: the built-in plugin modules (plugins/).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "attnbench_plugins.naive",
    "attnbench_plugins.sdpa",
    "attnbench_plugins.flex",
    "attnbench_plugins.performer",
    "attnbench_plugins.nystrom",
    "attnbench_plugins.xformers_attention",
    "attnbench_plugins.sparse",
    "attnbench_plugins.axial",
    "attnbench_plugins.hybrid",
    "attnbench_plugins.stress_inputs",
    "attnbench_plugins.model_inputs",
)


@dataclass(frozen=True)
class LoadProblem:
    """A plugin, or one implementation it offered, that could not be loaded."""

    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.reason}"


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin comes from, recorded with each run so that runs can be told apart by it."""

    distribution: str  # e.g. "attnbench" for the built-ins, the package name for a third party
    version: str


class Registry:
    """The implementations available to a run, by unique name, in registration order."""

    def __init__(self) -> None:
        self._implementations: dict[str, Implementation] = {}
        self.input_sources: dict[str, InputSource] = dict(BUILTIN_SOURCES)  # name -> source, built-ins first
        self._plugin_of: dict[str, str] = {}
        self.problems: list[LoadProblem] = []
        # Process-wide settings a plugin changed while loading (put back): reported, not fatal.
        self.settings_changed: list[LoadProblem] = []
        self.sources: dict[str, PluginSource] = {}
        # plugin -> how a worker loads it again: a module's name, or an entry point's value
        self.modules: dict[str, str] = {}
        self.entry_points: dict[str, str] = {}
        self._source_plugin_of: dict[str, str] = {name: "attnbench" for name in BUILTIN_SOURCES}
        self._current_plugin = "<python>"

    def add(self, implementation: Implementation | InputSource) -> None:
        """Register one implementation (or input source); a broken or duplicate one is recorded
        as a problem."""
        if isinstance(implementation, InputSource):
            self._add_source(implementation)
            return
        violations = contract_violations(implementation)
        if violations:
            label = getattr(implementation, "name", None) or type(implementation).__name__
            self._problem(f"implementation {label!r} breaks the contract: {'; '.join(violations)}")
            return
        name = implementation.name
        if name in self._implementations:
            self._problem(
                f"implementation name {name!r} is already registered by plugin "
                f"{self._plugin_of[name]!r}; this one was not added"
            )
            return
        self._implementations[name] = implementation
        self._plugin_of[name] = self._current_plugin

    def add_sent(self, implementation: Implementation) -> None:
        """An implementation the run's driver registered in Python and sent with the work (to a
        cluster's node): it runs under its name there, in place of any installed one of that name."""
        self._implementations[implementation.name] = implementation
        self._plugin_of[implementation.name] = "<python>"

    def _add_source(self, source: InputSource) -> None:
        violations = source_violations(source)
        if violations:
            label = getattr(source, "name", None)
            self._problem(f"input source {label!r} breaks the contract: {'; '.join(violations)}")
        elif source.name in self.input_sources:
            self._problem(f"input source name {source.name!r} is already registered; this one was not added")
        else:
            self.input_sources[source.name] = source
            self._source_plugin_of[source.name] = self._current_plugin

    def get(self, name: str) -> Implementation:
        return self._implementations[name]

    def names(self) -> list[str]:
        return list(self._implementations)

    def implementations(self) -> list[Implementation]:
        return list(self._implementations.values())

    def plugin_of(self, name: str) -> str:
        return self._plugin_of[name]

    def source_plugin_of(self, name: str) -> str:
        """The plugin that registered input source ``name`` ("attnbench" for the harness's own)."""
        return self._source_plugin_of[name]

    def source_of(self, name: str) -> PluginSource | None:
        """The distribution and version of the plugin that registered implementation ``name``."""
        return self.sources.get(self._plugin_of.get(name, ""))

    def __contains__(self, name: object) -> bool:
        return name in self._implementations

    def __len__(self) -> int:
        return len(self._implementations)

    @contextmanager
    def adding_for(self, plugin: str) -> Iterator[None]:
        """Attribute the ``add`` calls made inside this block (and their problems) to ``plugin``."""
        previous, self._current_plugin = self._current_plugin, plugin
        try:
            yield
        finally:
            self._current_plugin = previous

    def _problem(self, reason: str) -> None:
        self.problems.append(LoadProblem(self._current_plugin, reason))


def load_registry(
    builtins: tuple[str, ...] = BUILTIN_PLUGINS, *, entry_points: bool | None = None, modules: tuple[str, ...] = ()
) -> Registry:
    """Register built-ins, then third-party entry points, then ``modules`` (plugin modules named by
    Python code); a broken plugin never stops the rest. Plugin code runs in this process: the
    harness calls this only in a confined worker (attnbench.execution.local.catalog).

    Entry points are loaded unless ``entry_points`` is False or, when it is None, the
    environment variable ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD is set. Importing a plugin and its
    hook are contained (attnbench.support.containment): whatever they raise, even SystemExit, is a
    problem reported against that plugin; process-wide settings they change are put back.
    """
    if entry_points is None:
        entry_points = not os.environ.get(DISABLE_AUTOLOAD_VARIABLE)
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    settings = process_state.snapshot()
    builtin_source = PluginSource("attnbench", _version("attnbench"))

    for module_name in (*builtins, *modules):
        plugin_name = module_name.rpartition(".")[2] if module_name in builtins else module_name
        loaded = _register(manager, registry, plugin_name, functools.partial(importlib.import_module, module_name))
        if loaded:
            registry.sources[plugin_name] = builtin_source if module_name in builtins else PluginSource(
                "python module", "")
            registry.modules[plugin_name] = module_name
        _put_back(registry, plugin_name, settings, "importing it")
    if entry_points:
        for entry_point in _attnbench_entry_points():
            if _register(manager, registry, entry_point.name, entry_point.load):
                registry.sources[entry_point.name] = _source(entry_point)
                registry.entry_points[entry_point.name] = entry_point.value
            _put_back(registry, entry_point.name, settings, "importing it")

    _call_hooks(manager, registry, settings)
    return registry


def load_plugin(plugin: str, module: str = "", entry_point: str = "") -> Registry:
    """One plugin, loaded again where its code runs (a worker): its module (or the entry point's
    value, "module" or "module:attribute") imported and its hook called into a registry of its own."""
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    if entry_point:
        point = importlib.metadata.EntryPoint(plugin, entry_point, hookspecs.ENTRY_POINT_GROUP)
        load = point.load
    else:
        load = functools.partial(importlib.import_module, module)
    _register(manager, registry, plugin, load)
    _call_hooks(manager, registry, process_state.snapshot())
    return registry


def _call_hooks(manager: pluggy.PluginManager, registry: Registry, settings: process_state.Snapshot) -> None:
    hook = manager.hook.attnbench_register_implementations
    for hook_impl in hook.get_hookimpls():
        plugin_name = manager.get_name(hook_impl.plugin) or repr(hook_impl.plugin)
        arguments = {"registry": registry}
        with registry.adding_for(plugin_name):
            call = functools.partial(hook_impl.function, *(arguments[name] for name in hook_impl.argnames))
            outcome = contained(call, "attnbench_register_implementations")
        if isinstance(outcome, PluginFault):  # a plugin's bug must not stop the others
            registry.problems.append(LoadProblem(plugin_name, outcome.message))
        _put_back(registry, plugin_name, settings, "its registration hook")


def _put_back(registry: Registry, plugin_name: str, settings: process_state.Snapshot, what: str) -> None:
    changed = process_state.restore(settings)
    if changed:
        registry.settings_changed.append(
            LoadProblem(plugin_name, f"{what} changed process-wide settings ({'; '.join(changed)}); put back")
        )


def _register(manager: pluggy.PluginManager, registry: Registry, plugin_name: str, load) -> bool:
    plugin = contained(load, "import")
    if isinstance(plugin, PluginFault):
        reason = plugin.message if plugin.timed_out else plugin.summary
        registry.problems.append(LoadProblem(plugin_name, f"failed to import: {reason}"))
        return False
    if manager.is_registered(plugin) or plugin_name in dict(manager.list_name_plugin()):
        registry.problems.append(LoadProblem(plugin_name, "a plugin with this name is already loaded; skipped"))
        return False
    try:
        manager.register(plugin, name=plugin_name)
    except Exception as error:  # pluggy rejects hooks with unknown names or arguments
        registry.problems.append(LoadProblem(plugin_name, f"rejected by pluggy: {_describe(error)}"))
        return False
    if not manager.get_hookcallers(plugin):
        manager.unregister(plugin)
        registry.problems.append(
            LoadProblem(plugin_name, "defines no attnbench_register_implementations hook")
        )
        return False
    return True


def _source(entry_point: importlib.metadata.EntryPoint) -> PluginSource:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return PluginSource("unknown", "unknown")
    return PluginSource(dist.metadata["Name"] or "unknown", dist.version or "unknown")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _attnbench_entry_points() -> list[importlib.metadata.EntryPoint]:
    # The same distribution can be on sys.path twice (e.g. installed and editable): load once.
    unique: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        unique.setdefault((entry_point.name, entry_point.value), entry_point)
    return list(unique.values())


def _describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
