"""attnbench: a plugin-based benchmarking harness for attention implementations.

The public plugin API:

    import attnbench

    class MyAttention(attnbench.Implementation):
        name = "mine"
        ...

    @attnbench.hookimpl
    def attnbench_register_implementations(registry):
        registry.add(MyAttention())

A plugin may add input sources the same way (``registry.add(MySource())``, an attnbench.InputSource).
"""

from attnbench.contract.case import Case
from attnbench.contract.errors import NotSupported, UserError
from attnbench.contract.hookspecs import hookimpl
from attnbench.contract.implementation import AttentionFn, DecodeStep, Implementation, Tolerance
from attnbench.contract.inputs import InputSource
from attnbench.contract.registry import Registry
from attnbench.contract.work import ByteCount, FlopCount

__version__ = "0.1.0"

__all__ = ["AttentionFn", "ByteCount", "Case", "DecodeStep", "FlopCount", "Implementation", "InputSource",
           "NotSupported", "Registry", "Tolerance", "UserError", "hookimpl"]
