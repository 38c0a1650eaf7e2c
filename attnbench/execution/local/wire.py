"""Messages between the harness and a worker: JSON objects, never pickles, in either direction of
the control pipe; tensors travel as files described in them (attnbench.measuring.tensor_files).

What a worker sends is data from a process that runs plugin code: the harness reads it with a
size limit and checks every field it uses (``number``, ``text``, ``texts``), so a reply can be
wrong but never runs code or crashes the harness.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

from attnbench.support.text import one_line

MESSAGE_LIMIT_BYTES = 4 * 2**20  # a reply is a few numbers and notes; anything larger is broken


class WireError(ValueError):
    """A worker's reply that is not what the harness asked for."""


def send(connection: Connection, message: Mapping[str, Any]) -> None:
    connection.send_bytes(json.dumps(message).encode())


def receive(connection: Connection, limit: int = MESSAGE_LIMIT_BYTES) -> dict[str, Any]:
    """The next message; a WireError when it is over ``limit`` or not a JSON object."""
    try:
        data = connection.recv_bytes(limit)
    except OSError as error:  # (recv_bytes says so when the message is over the limit)
        if "too long" in str(error) or "bad message length" in str(error):
            raise WireError(f"a message over {limit} bytes") from None
        raise
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as error:  # (RecursionError: brackets nested a million deep)
        raise WireError(f"not JSON ({type(error).__name__}: {one_line(str(error), 80)})") from None
    if not isinstance(message, dict):
        raise WireError(f"a {type(message).__name__}, not an object")
    return message


def number(message: Mapping[str, Any], key: str, *, optional: bool = False) -> float | None:
    """A finite, non-negative number under ``key`` (None allowed when ``optional``)."""
    value = message.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise WireError(f"{key}: {one_line(repr(value), 60)} is not a finite, non-negative number")
    return float(value)


def integer(message: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = message.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"{key}: {one_line(repr(value), 60)} is not a non-negative integer")
    return value


def texts(message: Mapping[str, Any], key: str) -> list[str]:
    """A list of strings under ``key`` (missing: none), each made one bounded, printable line."""
    value = message.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise WireError(f"{key}: not a list of strings")
    return [one_line(item) for item in value[:1000]]
