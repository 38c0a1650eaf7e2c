"""attnbench: a plugin-based benchmarking harness for attention implementations.

The public plugin API:

    import attnbench

    class MyAttention(attnbench.Implementation):
        name = "mine"
        ...

    @attnbench.hookimpl
    def attnbench_register_implementations(registry):
        registry.add(MyAttention())
"""

from attnbench.case import Case
from attnbench.errors import NotSupported, UserError
from attnbench.hookspecs import hookimpl
from attnbench.implementation import AttentionFn, Implementation, Tolerance
from attnbench.registry import Registry

__version__ = "0.1.0"

__all__ = ["AttentionFn", "Case", "Implementation", "NotSupported", "Registry", "Tolerance", "UserError", "hookimpl"]
