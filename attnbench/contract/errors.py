"""The one error class for mistakes in what the user gave us, and a helper for its messages."""

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """A bad suite file, flag or option.

    The CLI prints the message as one line (no traceback) and exits with code 2, so the
    message must say where the problem is (file, field path) and what is allowed.
    """


class NotSupported(Exception):
    """Raised by an implementation's ``prepare`` when it cannot take a case with these options
    (what ``not_supported_reasons``, which sees no options, cannot tell): the point is then
    ``unsupported`` with this message as its reason."""


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """A "; did you mean 'x'?" suffix when ``word`` is close to one of ``choices``, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
