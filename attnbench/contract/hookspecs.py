"""The attnbench plugin hooks (pluggy project ``attnbench``).

Built-in implementations and third-party packages use the same ``hookimpl`` marker:

    @attnbench.hookimpl
    def attnbench_register_implementations(registry):
        registry.add(MyAttention())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from attnbench.contract.registry import Registry

PROJECT_NAME = "attnbench"
ENTRY_POINT_GROUP = "attnbench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def attnbench_register_implementations(registry: Registry) -> None:
    """Add this plugin's implementations with ``registry.add(implementation)``.

    Called once per plugin when the registry loads. An implementation that breaks the
    contract, or a name already taken, is reported against this plugin and not added;
    the plugin's other implementations still are.
    """
