"""Suite files: YAML, loaded safely and validated into a typed, immutable Suite.

Every mistake becomes one UserError line: ``<file>: <field path>: <problem> (allowed: ...)``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from attnbench.contract.case import AXES, DEVICE_PATTERN, DEVICES_ALLOWED, DTYPES, MODES, AxisKind
from attnbench.contract.errors import UserError, did_you_mean
from attnbench.contract.implementation import invalid_option_values, option_problem, setting_problem
from attnbench.contract.registry import Registry
from attnbench.settings.suite import CACHE_STATES, CorrectnessSettings, LatencySettings, Limits, Measure, Suite, Sweep
from attnbench.support.containment import contained

T = TypeVar("T")

SUITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
# Both ends of the sequence are always among the rows checked.
MIN_CORRECTNESS_ROWS = 2

TOP_LEVEL_FIELDS = (
    "name", "description", "implementations", "options", "source_options", "sweep", "measure", "limits", "seed",
    "output",
)
MEASURE_FIELDS = tuple(Measure.__dataclass_fields__)
MEASUREMENTS = ("correctness", "latency", "memory")  # the short form lists these
LIMIT_FIELDS = tuple(Limits.__dataclass_fields__)


def load_suite(path: str | Path, registry: Registry) -> Suite:
    """Read and validate a suite file; raise UserError with one clear line on any mistake."""
    path = Path(path)
    document = _read_yaml(path)
    check = _Checker(str(path))
    top = check.mapping(document, "", TOP_LEVEL_FIELDS)

    name = path.stem
    if "name" in top:
        name = check.text(top["name"], "name")
        if not SUITE_NAME_PATTERN.match(name):
            check.fail("name", f"{name!r} is not a usable folder name (allowed: letters, digits, '_', '.', '-')")
    implementations = _implementations(check, top.get("implementations", "all"), registry)
    return Suite(
        path=path,
        name=name,
        description=check.text(top["description"], "description") if "description" in top else "",
        implementations=implementations,
        options=_options(check, top.get("options", {}), registry),
        source_options=_source_options(check, top.get("source_options", {}), registry),
        sweep=_sweep(check, top.get("sweep", {}), tuple(registry.input_sources)),
        measure=_measure(check, top.get("measure", {})),
        limits=_limits(check, top.get("limits", {})),
        seed=check.integer(top["seed"], "seed", minimum=0, maximum=MAX_SEED) if "seed" in top else 0,
        output=Path(check.text(top["output"], "output")) if "output" in top else Path("results"),
    )


# --- the pieces of a suite ------------------------------------------------------------------


def _implementations(check: _Checker, node: Any, registry: Registry) -> tuple[str, ...]:
    if node == "all":
        return tuple(registry.names())
    if not isinstance(node, list) or not node:
        check.fail("implementations", f"expected 'all' or a non-empty list of names, got {_show(node)}")
    names: list[str] = []
    for index, item in enumerate(node):
        item_path = f"implementations[{index}]"
        name = check.text(item, item_path)
        if name not in registry:
            check.fail(item_path, _unknown_implementation(name, registry))
        if name in names:
            check.fail(item_path, f"{name!r} is listed twice")
        names.append(name)
    return tuple(names)


def _options(check: _Checker, node: Any, registry: Registry) -> dict[str, dict[str, Any]]:
    unknown = lambda key: _unknown_implementation(key, registry)  # noqa: E731
    options = check.mapping(node, "options", registry.names(), unknown=unknown)
    result: dict[str, dict[str, Any]] = {}
    for name, given in options.items():
        given = check.mapping(given, f"options.{name}", None)
        implementation = registry.get(name)
        for key, value in given.items():
            problem = option_problem(implementation, key, value)
            if problem:
                check.fail(f"options.{name}.{key}", problem)
        # The plugin's own check runs contained: if it fails, the run reports it against that
        # plugin (error rows for its points) rather than refusing the suite.
        merged = {**implementation.default_options, **given}
        problems = contained(functools.partial(invalid_option_values, implementation, merged),
                             f"invalid_options of {name}")
        for key, problem in problems.items() if isinstance(problems, dict) else ():
            check.fail(f"options.{name}.{key}", problem)
        result[name] = dict(given)
    return result


def _source_options(check: _Checker, node: Any, registry: Registry) -> dict[str, dict[str, Any]]:
    sources = registry.input_sources
    options = check.mapping(node, "source_options", tuple(sources))
    result: dict[str, dict[str, Any]] = {}
    for name, given in options.items():
        given = check.mapping(given, f"source_options.{name}", None)
        for key, value in given.items():
            problem = setting_problem(sources[name].parameters, f"parameter of input source {name}", key, value)
            if problem:
                check.fail(f"source_options.{name}.{key}", problem)
        result[name] = dict(given)
    return result


def _sweep(check: _Checker, node: Any, sources: Sequence[str]) -> Sweep:
    fields = check.mapping(node, "sweep", tuple(AXES))
    items: dict[AxisKind, Callable[[Any, str], Any]] = {
        "count": lambda value, path: check.integer(value, path, minimum=1),
        "dtype": lambda value, path: check.choice(value, path, tuple(DTYPES), "dtype"),
        "device": check.device,
        "flag": check.boolean,
        "mode": lambda value, path: check.choice(value, path, MODES, "mode"),
        "source": lambda value, path: check.choice(value, path, sources, "input distribution"),
    }
    values = {name: check.axis(fields[name], f"sweep.{name}", items[AXES[name].kind])
              for name in AXES if name in fields}
    values |= {name: tuple(sorted(values[name])) for name in values if AXES[name].curve}
    sweep = Sweep(**values)
    for index, kv in enumerate(sweep.kv_heads or ()):
        for h in sweep.heads:
            if h % kv:
                check.fail(f"sweep.kv_heads[{index}]", f"{kv} does not divide heads={h} (kv_heads must divide heads)")
    return sweep


def _measure(check: _Checker, node: Any) -> Measure:
    if isinstance(node, list):  # the short form: the measurements wanted, with default settings
        wanted = [check.choice(item, f"measure[{i}]", MEASUREMENTS, "measurement") for i, item in enumerate(node)]
        node = {name: name in wanted for name in MEASUREMENTS}
    fields = check.mapping(node, "measure", MEASURE_FIELDS)

    def settings(name: str, default: T) -> T | None:
        value = fields.get(name, True)
        if isinstance(value, bool):
            return default if value else None
        allowed = tuple(type(default).__dataclass_fields__)
        if not isinstance(value, dict):
            expected = f"expected true, false or a mapping of settings ({', '.join(allowed)})"
            check.fail(f"measure.{name}", f"{expected}, got {_show(value)}")
        given = check.mapping(value, f"measure.{name}", allowed)
        minimum = {"rows": MIN_CORRECTNESS_ROWS} if name == "correctness" else {}
        parsed = {key: _setting(check, f"measure.{name}.{key}", value, getattr(default, key), minimum.get(key, 1))
                  for key, value in given.items()}
        return type(default)(**parsed)

    latency = settings("latency", LatencySettings())
    if latency is not None and latency.max_run_time_s < latency.min_run_time_s:
        check.fail(
            "measure.latency.max_run_time_s",
            f"{latency.max_run_time_s} is below min_run_time_s={latency.min_run_time_s}",
        )
    return Measure(
        correctness=settings("correctness", CorrectnessSettings()),
        latency=latency,
        memory=check.boolean(fields["memory"], "measure.memory") if "memory" in fields else True,
        threads=check.integer(fields["threads"], "measure.threads", minimum=1) if "threads" in fields else None,
    )


def _setting(check: _Checker, path: str, value: Any, default: Any, minimum: int) -> Any:
    """One measurement setting, checked against the kind of its default."""
    if path == "measure.latency.cache":
        return check.choice(value, path, CACHE_STATES, "cache state")
    if isinstance(default, int):
        return check.integer(value, path, minimum=minimum)
    return check.number(value, path)


def _limits(check: _Checker, node: Any) -> Limits:
    fields = check.mapping(node, "limits", LIMIT_FIELDS)
    defaults = Limits()

    def limit(key: str, nullable: bool) -> float | None:
        value = fields.get(key, getattr(defaults, key))
        if value is None and nullable:
            return None
        return check.number(value, f"limits.{key}")

    return Limits(
        timeout_s=limit("timeout_s", nullable=False),
        memory_gb=limit("memory_gb", nullable=True),
        budget_s=limit("budget_s", nullable=True),
    )


def _unknown_implementation(name: str, registry: Registry) -> str:
    message = f"unknown implementation {name!r} (registered: {', '.join(registry.names()) or 'none'})"
    failed = [problem for problem in registry.problems if problem.plugin == name]
    if failed:
        message += f"; plugin {name!r} failed to load: {failed[0].reason}"
    return message + did_you_mean(name, registry.names())


# --- reading YAML ----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """safe_load that also refuses duplicate keys, which YAML would silently overwrite."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # e.g. "[]: 1", a list as a key (found by the fuzz test)
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} cannot be a field name", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such suite file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a suite file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read ({error})") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {_describe_yaml_error(error)}") from None
    if document is None:
        raise UserError(f"{path}: the file is empty (a suite is a YAML mapping of fields: name, sweep, ...)")
    return document


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
    problem = getattr(error, "problem", None) or str(error)
    tag = re.search(r"tag '(?:tag:yaml.org,2002:)?([^']*)'", problem)
    if tag and "constructor" in problem:
        return (
            f"{where}: YAML tag '!!{tag.group(1)}' is not allowed "
            "(suites are plain data: mappings, lists, strings, numbers, booleans; tags are never executed)"
        )
    return f"invalid YAML at {where}: {problem}"


# --- checking values -------------------------------------------------------------------------


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> NoReturn:
        text = f"{self.file}: {path + ': ' if path else ''}{message}"
        # Names and values from the file may hold line breaks; the error stays one line.
        raise UserError(text.replace("\r", "\\r").replace("\n", "\\n"))

    def mapping(
        self,
        node: Any,
        path: str,
        allowed: Sequence[str] | None,
        unknown: Callable[[str], str] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(node, dict):
            what = "a mapping" if path else "a mapping of fields at the top level"
            self.fail(path, f"expected {what}, got {_show(node)}")
        for key in node:
            # A name with a line break or other unprintable character is quoted: one line, always.
            name = key if isinstance(key, str) and key.isprintable() else repr(key)
            key_path = f"{path}.{name}" if path else name
            if not isinstance(key, str):
                self.fail(key_path, f"field names must be strings, got {_show(key)}")
            if allowed is not None and key not in allowed:
                if unknown is not None:
                    self.fail(key_path, unknown(key))
                self.fail(key_path, f"unknown field (allowed: {', '.join(allowed)}){did_you_mean(key, allowed)}")
        return node

    def axis(self, node: Any, path: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        if not isinstance(node, list):
            return (item(node, path),)
        if not node:
            self.fail(path, "the list is empty (give at least one value)")
        values = [item(value, f"{path}[{index}]") for index, value in enumerate(node)]
        for index, value in enumerate(values):
            if value in values[:index]:
                self.fail(f"{path}[{index}]", f"{_show(node[index])} is listed twice")
        return tuple(values)

    def integer(self, node: Any, path: str, minimum: int, maximum: int | None = None) -> int:
        if not isinstance(node, int) or isinstance(node, bool):
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(path, f"expected {kind}, got {_show(node)}")
        if node < minimum:
            self.fail(path, f"must be at least {minimum}, got {node}")
        if maximum is not None and node > maximum:
            self.fail(path, f"must be at most {maximum} (2^64 - 1), got {node}" if maximum == MAX_SEED
                      else f"must be at most {maximum}, got {node}")
        return node

    def number(self, node: Any, path: str) -> float:
        if not isinstance(node, (int, float)) or isinstance(node, bool):
            self.fail(path, f"expected a positive number, got {_show(node)}")
        if not node > 0 or node == float("inf"):
            self.fail(path, f"must be a positive finite number, got {node}")
        return float(node)

    def boolean(self, node: Any, path: str) -> bool:
        if not isinstance(node, bool):
            self.fail(path, f"expected true or false, got {_show(node)}")
        return node

    def text(self, node: Any, path: str) -> str:
        if not isinstance(node, str):
            self.fail(path, f"expected a string, got {_show(node)}")
        return node

    def choice(self, node: Any, path: str, choices: Iterable[str], what: str) -> str:
        choices = tuple(choices)
        if not isinstance(node, str) or node not in choices:
            allowed = ", ".join(choices)
            self.fail(path, f"unknown {what} {_show(node)} (allowed: {allowed}){did_you_mean(node, choices)}")
        return node

    def device(self, node: Any, path: str) -> str:
        if not isinstance(node, str) or not DEVICE_PATTERN.match(node):
            self.fail(path, f"unknown device {_show(node)} (allowed: {DEVICES_ALLOWED})")
        return node


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)
