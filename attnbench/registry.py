"""Loads implementations from the built-in plugins and the ``attnbench`` entry-point group."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pluggy

from attnbench import hookspecs
from attnbench.implementation import Implementation, contract_violations

# Set to any value to load only the built-ins (as pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD does).
DISABLE_AUTOLOAD_VARIABLE = "ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD"

# The one place the core names implementations: the built-in plugin modules (plugins/).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "attnbench_plugins.naive",
    "attnbench_plugins.flash",
    "attnbench_plugins.performer",
    "attnbench_plugins.nystrom",
    "attnbench_plugins.xformers_attention",
    "attnbench_plugins.sparse",
    "attnbench_plugins.axial",
    "attnbench_plugins.hybrid",
)


@dataclass(frozen=True)
class LoadProblem:
    """A plugin, or one implementation it offered, that could not be loaded."""

    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.reason}"


class Registry:
    """The implementations available to a run, by unique name, in registration order."""

    def __init__(self) -> None:
        self._implementations: dict[str, Implementation] = {}
        self._plugin_of: dict[str, str] = {}
        self.problems: list[LoadProblem] = []
        self._current_plugin = "<python>"

    def add(self, implementation: Implementation) -> None:
        """Register one implementation; a broken or duplicate one is recorded as a problem."""
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

    def get(self, name: str) -> Implementation:
        return self._implementations[name]

    def names(self) -> list[str]:
        return list(self._implementations)

    def implementations(self) -> list[Implementation]:
        return list(self._implementations.values())

    def plugin_of(self, name: str) -> str:
        return self._plugin_of[name]

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
    builtins: tuple[str, ...] = BUILTIN_PLUGINS, *, entry_points: bool | None = None
) -> Registry:
    """Register built-ins, then third-party entry points; a broken plugin never stops the rest.

    Entry points are loaded unless ``entry_points`` is False or, when it is None, the
    environment variable ATTNBENCH_DISABLE_PLUGIN_AUTOLOAD is set.
    """
    if entry_points is None:
        entry_points = not os.environ.get(DISABLE_AUTOLOAD_VARIABLE)
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)

    for module_name in builtins:
        plugin_name = module_name.rpartition(".")[2]
        _register(manager, registry, plugin_name, lambda module_name=module_name: importlib.import_module(module_name))
    if entry_points:
        for entry_point in _attnbench_entry_points():
            _register(manager, registry, entry_point.name, entry_point.load)

    hook = manager.hook.attnbench_register_implementations
    for hook_impl in hook.get_hookimpls():
        plugin_name = manager.get_name(hook_impl.plugin) or repr(hook_impl.plugin)
        arguments = {"registry": registry}
        with registry.adding_for(plugin_name):
            try:
                hook_impl.function(*(arguments[name] for name in hook_impl.argnames))
            except Exception as error:  # a plugin's bug must not stop the others
                registry.problems.append(
                    LoadProblem(plugin_name, f"attnbench_register_implementations raised {_describe(error)}")
                )
    return registry


def _register(manager: pluggy.PluginManager, registry: Registry, plugin_name: str, load) -> None:
    try:
        plugin = load()
    except Exception as error:
        registry.problems.append(LoadProblem(plugin_name, f"failed to import: {_describe(error)}"))
        return
    if manager.is_registered(plugin) or plugin_name in dict(manager.list_name_plugin()):
        registry.problems.append(LoadProblem(plugin_name, "a plugin with this name is already loaded; skipped"))
        return
    try:
        manager.register(plugin, name=plugin_name)
    except Exception as error:  # pluggy rejects hooks with unknown names or arguments
        registry.problems.append(LoadProblem(plugin_name, f"rejected by pluggy: {_describe(error)}"))
        return
    if not manager.get_hookcallers(plugin):
        manager.unregister(plugin)
        registry.problems.append(
            LoadProblem(plugin_name, "defines no attnbench_register_implementations hook")
        )


def _attnbench_entry_points() -> list[importlib.metadata.EntryPoint]:
    # The same distribution can be on sys.path twice (e.g. installed and editable): load once.
    unique: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        unique.setdefault((entry_point.name, entry_point.value), entry_point)
    return list(unique.values())


def _describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
