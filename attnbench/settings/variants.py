"""Option sweeps: one implementation run at several settings, each a series of its own.

A suite that gives an option a list of values (``options: {performer: {features: [64, 256]}}``)
asks for one variant per value, named after what was swept: ``performer[features=64]``. Several
swept options make every combination. A variant is a separate series everywhere (rows, tables,
plots, compare, history), as if it were an implementation of its own; what it runs is its
implementation with those options.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attnbench.settings.suite import OptionSweep, Suite

VARIANT_NAME = re.compile(r"^(?P<implementation>[^\[\]]+)\[(?P<settings>.*)\]$")


@dataclass(frozen=True)
class Variant:
    name: str  # the series: the implementation's name, or it with the swept settings
    implementation: str  # the registered implementation it runs
    options: Mapping[str, Any]  # the suite's options for it, one value each (defaults not laid over)


def variants(suite: Suite) -> tuple[Variant, ...]:
    """Every series of the suite, in the order of its implementations, then of the swept values."""
    return tuple(variant for name in suite.implementations
                 for variant in expand_options(name, suite.options.get(name, {})))


def expand_options(implementation: str, given: Mapping[str, Any]) -> list[Variant]:
    """One variant per combination of the swept values in ``given``; one when nothing is swept."""
    swept = {key: value.values for key, value in given.items() if isinstance(value, OptionSweep)}
    fixed = {key: value for key, value in given.items() if not isinstance(value, OptionSweep)}
    if not swept:
        return [Variant(implementation, implementation, fixed)]
    combos = itertools.product(*swept.values())
    settings = [dict(zip(swept, values, strict=True)) for values in combos]
    return [Variant(variant_name(implementation, chosen), implementation, {**fixed, **chosen}) for chosen in settings]


def variant_name(implementation: str, settings: Mapping[str, Any]) -> str:
    """``performer[features=64]``: values as JSON (compact), strings bare."""
    if not settings:
        return implementation
    return f"{implementation}[{','.join(f'{key}={setting_text(value)}' for key, value in settings.items())}]"


def parse_variant(name: str) -> tuple[str, dict[str, Any]]:
    """The implementation and options of a variant name (``flash`` -> ``("flash", {})``); a
    malformed name is a ValueError."""
    match = VARIANT_NAME.match(name)
    if not match:
        if "[" in name or "]" in name:
            raise ValueError(f"{name!r} is not a variant name (expected e.g. performer[features=64])")
        return name, {}
    options: dict[str, Any] = {}
    for part in _split_settings(match["settings"]):
        key, sep, text = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{name!r}: {part!r} is not key=value")
        options[key] = _parsed(text)
    return match["implementation"], options


def split_series(name: str) -> tuple[str, dict[str, Any]]:
    """A series' implementation and swept settings, as parse_variant, but a name that is not a
    variant's is an implementation of its own ({} settings) rather than an error."""
    try:
        return parse_variant(name)
    except ValueError:
        return name, {}


def series_order(name: str) -> tuple[str, list[tuple[str, float]], str]:
    """A sort key: by implementation, then its variants by their swept values (numbers by size,
    not as text: features=8 before features=64), then by name."""
    implementation, settings = split_series(name)
    numbers = [(key, float(value) if isinstance(value, (int, float)) else 0.0) for key, value in settings.items()]
    return implementation, numbers, name


def setting_text(value: Any) -> str:
    """An option's value as a variant name shows it: JSON (compact), strings bare."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_settings(text: str) -> Sequence[str]:
    """Split on the commas that are not inside a list value."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts
