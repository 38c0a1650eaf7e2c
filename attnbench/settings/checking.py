"""Reading suite YAML safely (no tags, no duplicate keys) and checking its values: every mistake
is one UserError line, ``<file>: <field path>: <problem> (allowed: ...)``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from attnbench.contract.case import DEVICE_PATTERN, DEVICES_ALLOWED
from attnbench.contract.errors import UserError, did_you_mean

T = TypeVar("T")

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


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


def read_yaml(path: Path) -> Any:
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


class Checker:
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
            self.fail(path, f"expected {what}, got {show(node)}")
        for key in node:
            # A name with a line break or other unprintable character is quoted: one line, always.
            name = key if isinstance(key, str) and key.isprintable() else repr(key)
            key_path = f"{path}.{name}" if path else name
            if not isinstance(key, str):
                self.fail(key_path, f"field names must be strings, got {show(key)}")
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
                self.fail(f"{path}[{index}]", f"{show(node[index])} is listed twice")
        return tuple(values)

    def integer(self, node: Any, path: str, minimum: int, maximum: int | None = None) -> int:
        if not isinstance(node, int) or isinstance(node, bool):
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(path, f"expected {kind}, got {show(node)}")
        if node < minimum:
            self.fail(path, f"must be at least {minimum}, got {node}")
        if maximum is not None and node > maximum:
            self.fail(path, f"must be at most {maximum} (2^64 - 1), got {node}" if maximum == MAX_SEED
                      else f"must be at most {maximum}, got {node}")
        return node

    def number(self, node: Any, path: str) -> float:
        if not isinstance(node, (int, float)) or isinstance(node, bool):
            self.fail(path, f"expected a positive number, got {show(node)}")
        if not node > 0 or node == float("inf"):
            self.fail(path, f"must be a positive finite number, got {node}")
        return float(node)

    def boolean(self, node: Any, path: str) -> bool:
        if not isinstance(node, bool):
            self.fail(path, f"expected true or false, got {show(node)}")
        return node

    def text(self, node: Any, path: str) -> str:
        if not isinstance(node, str):
            self.fail(path, f"expected a string, got {show(node)}")
        return node

    def choice(self, node: Any, path: str, choices: Iterable[str], what: str) -> str:
        choices = tuple(choices)
        if not isinstance(node, str) or node not in choices:
            allowed = ", ".join(choices)
            self.fail(path, f"unknown {what} {show(node)} (allowed: {allowed}){did_you_mean(node, choices)}")
        return node

    def device(self, node: Any, path: str) -> str:
        if not isinstance(node, str) or not DEVICE_PATTERN.match(node):
            self.fail(path, f"unknown device {show(node)} (allowed: {DEVICES_ALLOWED})")
        return node


def show(value: Any) -> str:
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
