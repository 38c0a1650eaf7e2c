"""The registry as data: what the harness knows of each implementation and input source, without
their code.

Plugins are imported, and their registration hooks run, only in a confined process
(attnbench.execution.local.catalog); what comes back is a ``Catalog``: plain, checked data
(``ImplementationInfo``, ``SourceInfo``, ``PluginInfo``) with the same attribute names the
Implementation has, so the harness's readers of declarations (the skip predictor, the run
folder's declarations, ``attnbench list``) never touch plugin code. What only plugin code can
answer (``invalid_options``, ``not_supported_reasons`` for ``list``) is asked of that process.

A ``LocalCatalog`` wraps a Registry of objects built in this process (the Python API, the tests):
their code is already in the caller's process, by the caller's choice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from attnbench.contract.capabilities import FEATURES, declared_limits
from attnbench.contract.case import DTYPE_NAMES, Case
from attnbench.contract.errors import UserError
from attnbench.contract.implementation import (
    Implementation,
    complexity_exponent,
    finite,
    invalid_option_values,
    option_problem,
    plugin_reasons,
)
from attnbench.contract.inputs import InputSource
from attnbench.contract.registry import LoadProblem, PluginSource, Registry
from attnbench.support.containment import PluginFault, contained
from attnbench.support.text import one_line

PYTHON_PLUGIN = "<python>"  # implementations registered by Python code in the caller's process


class CatalogError(ValueError):
    """Catalog data that does not describe what it claims to (from a process running plugin code)."""


@dataclass(frozen=True)
class ImplementationInfo:
    """An implementation's declarations as data (attnbench.Implementation's attribute names)."""

    name: str
    plugin: str
    description: str
    exact: bool
    time_complexity: str
    memory_complexity: str
    default_options: Mapping[str, Any] = field(default_factory=dict)
    devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None  # dtype names ("float32"); None: any
    supports_causal: bool = True
    supports_backward: bool = True
    supports_grouped_query: bool = True
    supports_chunked_prefill: bool = False
    supports_decode: bool = False
    decode_time_complexity: str | None = None
    decode_memory_complexity: str | None = None
    unsupported_because: Mapping[str, str] = field(default_factory=dict)
    declares: tuple[str, ...] = ()  # what the capabilities rule out, in words (attnbench list)
    own_reference: bool = False  # it defines reference(): an approximation is judged against it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ImplementationInfo:
        if not isinstance(data, dict):
            raise CatalogError("an implementation that is not an object")
        info = cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        info = _tupled(info, ("devices", "dtypes", "declares"))
        problems = _info_problems(info)
        if problems:
            raise CatalogError(f"implementation {str(info.name)[:40]!r}: {'; '.join(problems)}")
        return info


@dataclass(frozen=True)
class SourceInfo:
    name: str
    plugin: str
    description: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SourceInfo:
        if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in ("name", "plugin")):
            raise CatalogError("an input source that is not described")
        parameters = data.get("parameters", {})
        if not isinstance(parameters, dict):
            raise CatalogError(f"input source {data['name'][:40]!r}: parameters are not a mapping")
        return cls(one_line(data["name"], 40), one_line(data["plugin"], 80),
                   one_line(data.get("description", ""), 300), parameters)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from and how a worker loads it again: a module to import (a built-in,
    or a module named on the Python API), or an entry point of the ``attnbench`` group."""

    name: str
    distribution: str
    version: str
    module: str = ""  # the module to import...
    entry_point: str = ""  # ...or the entry point's value, "module" or "module:attribute"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> PluginInfo:
        if not isinstance(data, dict) or not all(isinstance(data.get(key, ""), str) for key in cls.__dataclass_fields__):
            raise CatalogError("a plugin that is not described")
        return cls(**{key: one_line(data.get(key, ""), 300) for key in cls.__dataclass_fields__})


class Catalog:
    """The implementations and input sources of a run, as data; ``invalid_options`` and
    ``not_supported_reasons`` are answered by whatever holds their code (see the subclasses)."""

    def __init__(self, implementations: Mapping[str, ImplementationInfo], sources: Mapping[str, SourceInfo],
                 plugins: Mapping[str, PluginInfo], problems: list[LoadProblem],
                 settings_changed: list[LoadProblem]) -> None:
        self.implementations = dict(implementations)
        self.input_sources = dict(sources)
        self.plugins = dict(plugins)
        self.problems = problems
        self.settings_changed = settings_changed
        self.objects: dict[str, Implementation | InputSource] = {}  # registered by Python code here

    def names(self) -> list[str]:
        return list(self.implementations)

    def get(self, name: str) -> ImplementationInfo:
        return self.implementations[name]

    def __contains__(self, name: object) -> bool:
        return name in self.implementations

    def __len__(self) -> int:
        return len(self.implementations)

    def plugin_of(self, name: str) -> str:
        return self.implementations[name].plugin

    def source_of(self, name: str) -> PluginSource | None:
        plugin = self.plugins.get(self.plugin_of(name))
        return PluginSource(plugin.distribution, plugin.version) if plugin else None

    def python_object(self, name: str) -> Implementation | InputSource | None:
        """An implementation or input source registered by Python code in this process, to be sent
        to its worker as it is; None for a plugin's (a worker loads the plugin itself)."""
        return self.objects.get(name)

    def add_python(self, registry: Registry) -> None:
        """Implementations and input sources registered by Python code (the Ray driver ships
        them to its nodes): they run as sent, in place of any of the same name."""
        for implementation in registry.implementations():
            self.implementations[implementation.name] = describe(implementation, PYTHON_PLUGIN)
            self.objects[implementation.name] = implementation

    def invalid_options(self, name: str, options: Mapping[str, Any]) -> dict[str, str] | PluginFault:
        """The implementation's own verdict on ``options`` (its defaults with the suite's laid over)."""
        raise NotImplementedError

    def support(self, name: str, cases: list[Case], timeout_s: float) -> list[list[str] | PluginFault]:
        """Why the implementation refuses each case (its capabilities and its own reasons)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of whatever answers for the plugins."""

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalCatalog(Catalog):
    """A Registry of objects in this process, as a Catalog; its plugin calls are contained here.
    An object whose plugin a worker can load again (a module, an entry point) is loaded there, as
    in a run from the command line; any other is sent to its worker as it is."""

    def __init__(self, registry: Registry) -> None:
        implementations = {impl.name: describe(impl, registry.plugin_of(impl.name))
                           for impl in registry.implementations()}
        sources = {name: describe_source(source, registry.source_plugin_of(name))
                   for name, source in registry.input_sources.items()}
        super().__init__(implementations, sources, plugins_of(registry), list(registry.problems),
                         list(registry.settings_changed))
        self.registry = registry
        loadable = {name for name, plugin in self.plugins.items() if plugin.module or plugin.entry_point}
        self.objects = {**{impl.name: impl for impl in registry.implementations()
                           if registry.plugin_of(impl.name) not in loadable},
                        **{name: source for name, source in registry.input_sources.items()
                           if registry.source_plugin_of(name) not in loadable | {"attnbench"}}}

    def invalid_options(self, name: str, options: Mapping[str, Any]) -> dict[str, str] | PluginFault:
        return contained(lambda: invalid_option_values(self.registry.get(name), options), "invalid_options")

    def support(self, name: str, cases: list[Case], timeout_s: float) -> list[list[str] | PluginFault]:
        implementation = self.registry.get(name)
        return [contained(lambda case=case: plugin_reasons(implementation, case), "not_supported_reasons", timeout_s)
                for case in cases]


def resolved_options(catalog: Catalog, name: str, given: Mapping[str, Any]) -> dict[str, Any] | PluginFault:
    """The implementation's defaults with ``given`` laid over them; a bad option is a UserError,
    and a plugin whose own check fails, a PluginFault (its points become error rows)."""
    implementation = catalog.get(name)
    for key, value in given.items():
        problem = option_problem(implementation, key, value)  # type: ignore[arg-type]
        if problem:
            raise UserError(f"options.{name}.{key}: {problem}")
    options = {**implementation.default_options, **given}
    problems = catalog.invalid_options(name, options)
    if isinstance(problems, PluginFault):
        return problems
    for key, problem in problems.items():
        raise UserError(f"options.{name}.{key}: {one_line(problem)}")
    return options


def as_catalog(registered: Catalog | Registry) -> Catalog:
    """What the harness works from: a Catalog as it is, a Registry of objects (the Python API) as
    a LocalCatalog."""
    return registered if isinstance(registered, Catalog) else LocalCatalog(registered)


def plugins_of(registry: Registry) -> dict[str, PluginInfo]:
    """Each plugin that registered something, where it comes from and how a worker loads it."""
    return {name: PluginInfo(name, source.distribution, source.version, module=registry.modules.get(name, ""),
                             entry_point=registry.entry_points.get(name, ""))
            for name, source in registry.sources.items()}


def catalog_data(registry: Registry) -> dict[str, Any]:
    """A registry as the catalog worker sends it; what is not plain data is a problem of its plugin."""
    implementations, sources = [], []
    problems = [[problem.plugin, problem.reason] for problem in registry.problems]
    for implementation in registry.implementations():
        plugin = registry.plugin_of(implementation.name)
        try:
            implementations.append(describe(implementation, plugin).to_json())
        except (TypeError, ValueError) as error:
            problems.append([plugin, f"implementation {implementation.name!r}: its declarations are not plain data "
                                     f"({one_line(str(error), 200)})"])
    for name, source in registry.input_sources.items():
        plugin = registry.source_plugin_of(name)
        try:
            sources.append(describe_source(source, plugin).to_json())
        except (TypeError, ValueError) as error:
            problems.append([plugin, f"input source {name!r}: its parameters are not plain data "
                                     f"({one_line(str(error), 200)})"])
    return {"implementations": implementations, "sources": sources,
            "plugins": [plugin.to_json() for plugin in plugins_of(registry).values()], "problems": problems,
            "settings_changed": [[problem.plugin, problem.reason] for problem in registry.settings_changed]}


def describe(implementation: Implementation, plugin: str) -> ImplementationInfo:
    """An implementation's declarations as data (its contract already checked by the registry)."""
    dtypes = implementation.dtypes
    info = ImplementationInfo(
        name=implementation.name, plugin=plugin, description=one_line(implementation.description, 300),
        exact=implementation.exact, time_complexity=implementation.time_complexity,
        memory_complexity=implementation.memory_complexity, default_options=dict(implementation.default_options),
        devices=tuple(implementation.devices) if implementation.devices is not None else None,
        dtypes=tuple(DTYPE_NAMES.get(dtype, str(dtype)) for dtype in dtypes) if dtypes is not None else None,
        **{feature.attribute: getattr(implementation, feature.attribute, feature.default) for feature in FEATURES},
        decode_time_complexity=implementation.decode_time_complexity,
        decode_memory_complexity=implementation.decode_memory_complexity,
        unsupported_because=dict(implementation.unsupported_because or {}),
        declares=tuple(declared_limits(implementation)),
        own_reference=type(implementation).reference is not Implementation.reference,
    )
    json.dumps(info.to_json(), allow_nan=False)  # plain data, or a ValueError/TypeError naming why not
    return info


def describe_source(source: InputSource, plugin: str) -> SourceInfo:
    info = SourceInfo(source.name, plugin, one_line(source.description, 300), dict(source.parameters))
    json.dumps(info.to_json(), allow_nan=False)
    return info


def _tupled(info: ImplementationInfo, names: tuple[str, ...]) -> ImplementationInfo:
    values = {name: tuple(getattr(info, name)) if isinstance(getattr(info, name), list) else getattr(info, name)
              for name in names}
    return ImplementationInfo(**{**asdict(info), **values})


def _info_problems(info: ImplementationInfo) -> list[str]:
    problems = []
    for name in ("name", "plugin", "description", "time_complexity", "memory_complexity"):
        if not isinstance(getattr(info, name), str):
            problems.append(f"{name} is not a string")
    if problems:
        return problems
    for name in ("time_complexity", "memory_complexity", *(("decode_time_complexity", "decode_memory_complexity")
                                                          if info.supports_decode else ())):
        try:
            complexity_exponent(getattr(info, name))
        except (ValueError, TypeError):
            problems.append(f"{name}={str(getattr(info, name))[:40]!r}")
    if not all(isinstance(value, bool) for value in (info.exact, info.own_reference,
                                                     *(getattr(info, f.attribute) for f in FEATURES))):
        problems.append("a capability that is not true or false")
    if not isinstance(info.default_options, dict) or not all(isinstance(key, str) for key in info.default_options):
        problems.append("default_options is not a mapping of names")
    for name in ("devices", "dtypes", "declares"):
        value = getattr(info, name)
        if value is not None and not (isinstance(value, tuple) and all(isinstance(item, str) for item in value)):
            problems.append(f"{name} is not a list of names")
    if not finite(info.default_options):
        problems.append("default_options holds a value that is not finite")
    return problems

