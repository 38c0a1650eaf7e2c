"""Suite files: YAML, loaded safely and validated into a typed, immutable Suite.

Every mistake becomes one UserError line: ``<file>: <field path>: <problem> (allowed: ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from attnbench.contract.case import AXES, DTYPES, MODES, AxisKind
from attnbench.contract.errors import did_you_mean
from attnbench.contract.catalog import Catalog, ImplementationInfo, as_catalog
from attnbench.contract.implementation import option_problem, setting_problem
from attnbench.contract.registry import Registry
from attnbench.settings.checking import MAX_SEED, Checker, read_yaml, show
from attnbench.settings.grid import expand
from attnbench.settings.suite import (
    CACHE_STATES,
    MAX_ERROR_BUDGETS,
    CorrectnessSettings,
    LatencySettings,
    Limits,
    Measure,
    OptionSweep,
    ReportSettings,
    Suite,
    Sweep,
)
from attnbench.settings.variants import expand_options
from attnbench.support.containment import PluginFault

T = TypeVar("T")

SUITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Both ends of the sequence are always among the rows checked.
MIN_CORRECTNESS_ROWS = 2

TOP_LEVEL_FIELDS = (
    "name", "description", "implementations", "options", "source_options", "sweep", "measure", "limits", "report",
    "seed", "output",
)
MEASURE_FIELDS = tuple(Measure.__dataclass_fields__)
MEASUREMENTS = ("correctness", "latency", "memory")  # the short form lists these
LIMIT_FIELDS = tuple(Limits.__dataclass_fields__)
MAX_VARIANTS = 64  # per implementation: each is a full series of the sweep


def load_suite(path: str | Path, registry: Catalog | Registry) -> Suite:
    """Read and validate a suite file against the implementations and input sources a catalog (or
    a Registry of objects) offers; raise UserError with one clear line on any mistake."""
    registry = as_catalog(registry)
    path = Path(path)
    document = read_yaml(path)
    check = Checker(str(path))
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
        sweeps=_sweeps(check, top.get("sweep", {}), tuple(registry.input_sources)),
        measure=_measure(check, top.get("measure", {})),
        limits=_limits(check, top.get("limits", {})),
        report=_report(check, top.get("report", {})),
        seed=check.integer(top["seed"], "seed", minimum=0, maximum=MAX_SEED) if "seed" in top else 0,
        output=Path(check.text(top["output"], "output")) if "output" in top else Path("results"),
    )


# --- the pieces of a suite ------------------------------------------------------------------


def _implementations(check: Checker, node: Any, registry: Catalog) -> tuple[str, ...]:
    if node == "all":
        return tuple(registry.names())
    if not isinstance(node, list) or not node:
        check.fail("implementations", f"expected 'all' or a non-empty list of names, got {show(node)}")
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


def _options(check: Checker, node: Any, registry: Catalog) -> dict[str, dict[str, Any]]:
    """Each implementation's options; a list of values (or ``{sweep: [...]}``) sweeps one."""
    unknown = lambda key: _unknown_implementation(key, registry)  # noqa: E731
    options = check.mapping(node, "options", registry.names(), unknown=unknown)
    result: dict[str, dict[str, Any]] = {}
    for name, given in options.items():
        given = check.mapping(given, f"options.{name}", None)
        implementation = registry.get(name)
        parsed = {key: _option(check, f"options.{name}.{key}", implementation, key, value)
                  for key, value in given.items()}
        found = expand_options(name, parsed)
        if len(found) > MAX_VARIANTS:
            check.fail(f"options.{name}", f"the swept values make {len(found)} variants (allowed: at most "
                                          f"{MAX_VARIANTS} per implementation)")
        for variant in found:
            # The plugin's own check runs contained: if it fails, the run reports it against that
            # plugin (error rows for its points) rather than refusing the suite.
            merged = {**implementation.default_options, **variant.options}
            problems = registry.invalid_options(name, merged)
            for key, problem in problems.items() if not isinstance(problems, PluginFault) else ():
                where = f" (in {variant.name})" if variant.name != name else ""
                check.fail(f"options.{name}.{key}", problem + where)
        result[name] = parsed
    return result


def _option(check: Checker, path: str, implementation: ImplementationInfo, key: str, value: Any) -> Any:
    """One option's value, or an OptionSweep of values: a list sweeps an option whose default is
    a single value; ``{sweep: [...]}`` sweeps any option (one whose values are lists, too)."""
    default = implementation.default_options.get(key)
    if isinstance(value, dict) and set(value) == {"sweep"}:
        values, path = value["sweep"], f"{path}.sweep"
    elif isinstance(value, list) and key in implementation.default_options \
            and not isinstance(default, (list, tuple)) and default is not None:
        values = value
    else:
        problem = option_problem(implementation, key, value)
        if problem:
            check.fail(path, problem)
        return value
    if not isinstance(values, list) or not values:
        check.fail(path, f"expected a non-empty list of values to sweep, got {show(values)}")
    for index, item in enumerate(values):
        problem = option_problem(implementation, key, item)
        if problem:
            check.fail(f"{path}[{index}]", problem)
        if item in values[:index]:
            check.fail(f"{path}[{index}]", f"{show(item)} is listed twice")
    return OptionSweep(tuple(values))


def _source_options(check: Checker, node: Any, registry: Catalog) -> dict[str, dict[str, Any]]:
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


def _sweeps(check: Checker, node: Any, sources: Sequence[str]) -> tuple[Sweep, ...]:
    """One grid (a mapping of axes), or a list of them whose cases are all measured."""
    if not isinstance(node, list):
        return (_sweep(check, node, sources, "sweep"),)
    if not node:
        check.fail("sweep", "expected a mapping of axes, or a non-empty list of them")
    return tuple(_sweep(check, item, sources, f"sweep[{index}]") for index, item in enumerate(node))


def _sweep(check: Checker, node: Any, sources: Sequence[str], where: str) -> Sweep:
    fields = check.mapping(node, where, tuple(AXES))
    items: dict[AxisKind, Callable[[Any, str], Any]] = {
        "count": lambda value, path: check.integer(value, path, minimum=1),
        "dtype": lambda value, path: check.choice(value, path, tuple(DTYPES), "dtype"),
        "device": check.device,
        "flag": check.boolean,
        "mode": lambda value, path: check.choice(value, path, MODES, "mode"),
        "source": lambda value, path: check.choice(value, path, sources, "input distribution"),
    }
    values = {name: check.axis(fields[name], f"{where}.{name}", items[AXES[name].kind])
              for name in AXES if name in fields}
    values |= {name: tuple(sorted(values[name])) for name in values if AXES[name].curve}
    sweep = Sweep(**values)
    for index, kv in enumerate(sweep.kv_heads or ()):
        for h in sweep.heads:
            if h % kv:
                check.fail(f"{where}.kv_heads[{index}]", f"{kv} does not divide heads={h} (kv_heads must divide heads)")
    if sweep.q_len != (None,) and not expand(sweep):
        check.fail(f"{where}.q_len", "larger than every seq_len, so no case remains (outside decode mode, "
                   "q_len must be at most seq_len: the queries are the last q_len positions)")
    return sweep


def _measure(check: Checker, node: Any) -> Measure:
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
            check.fail(f"measure.{name}", f"{expected}, got {show(value)}")
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


def _setting(check: Checker, path: str, value: Any, default: Any, minimum: int) -> Any:
    """One measurement setting, checked against the kind of its default."""
    if path == "measure.latency.cache":
        return check.choice(value, path, CACHE_STATES, "cache state")
    if isinstance(default, int):
        return check.integer(value, path, minimum=minimum)
    return check.number(value, path)


def _limits(check: Checker, node: Any) -> Limits:
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


def load_report_settings(path: Path) -> ReportSettings:
    """The report section of a suite file (the copy a run folder keeps), the rest unchecked: a
    report is rebuilt even where the suite's plugins are no longer installed. Defaults when the
    file is missing."""
    if not path.is_file():
        return ReportSettings()
    document = read_yaml(path)
    check = Checker(str(path))
    return _report(check, check.mapping(document, "", None).get("report", {}))


def _report(check: Checker, node: Any) -> ReportSettings:
    fields = check.mapping(node, "report", tuple(ReportSettings.__dataclass_fields__))
    if "error_budgets" not in fields:
        return ReportSettings()
    budgets = check.axis(fields["error_budgets"], "report.error_budgets", check.number)
    if len(budgets) > MAX_ERROR_BUDGETS:
        check.fail("report.error_budgets", f"{len(budgets)} budgets given (allowed: 1 to {MAX_ERROR_BUDGETS} "
                                           "relative errors, e.g. [0.01, 0.1])")
    return ReportSettings(error_budgets=tuple(sorted(budgets)))


def _unknown_implementation(name: str, registry: Catalog) -> str:
    message = f"unknown implementation {name!r} (registered: {', '.join(registry.names()) or 'none'})"
    failed = [problem for problem in registry.problems if problem.plugin == name]
    if failed:
        message += f"; plugin {name!r} failed to load: {failed[0].reason}"
    return message + did_you_mean(name, registry.names())
