"""The attnbench plugin hooks (pluggy project ``attnbench``).

Built-in implementations and third-party packages use the same ``hookimpl`` marker:

    @attnbench.hookimpl
    def attnbench_register_implementations(registry):
        registry.add(MyAttention())
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT_NAME = "attnbench"
ENTRY_POINT_GROUP = "attnbench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Registering(Protocol):
    """What a plugin's hook receives (attnbench.contract.registry.Registry)."""

    def add(self, implementation: Any) -> None:
        """An implementation (attnbench.Implementation) or an input source (attnbench.InputSource)."""


@hookspec
def attnbench_register_implementations(registry: Registering) -> None:
    """Add this plugin's implementations (and input sources) with ``registry.add(...)``.

    Called once per plugin when the registry loads. An implementation that breaks the
    contract, or a name already taken, is reported against this plugin and not added;
    the plugin's other implementations still are.
    """
