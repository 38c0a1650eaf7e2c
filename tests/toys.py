"""Small implementations that misbehave on purpose, importable by worker processes."""

from __future__ import annotations

import os
import signal
import time

import torch

import attnbench


class Toy(attnbench.Implementation):
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"

    def __init__(self, name: str, behaviour) -> None:
        self.name = name
        self.behaviour = behaviour

    def prepare(self, case, options):
        return self.behaviour


def exact_attention(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    )


def sleeps_then_exact(q, k, v):
    time.sleep(1.0)
    return exact_attention(q, k, v)


def returns_query(q, k, v):
    return q.clone()


def returns_nan(q, k, v):
    return torch.full_like(q, float("nan"))


def wrong_shape(q, k, v):
    return q[:, :, :-1]


def segfaults(q, k, v):
    os.kill(os.getpid(), signal.SIGSEGV)


def hangs(q, k, v):
    time.sleep(3600)


def raises(q, k, v):
    raise ValueError("this implementation is broken on purpose")


_last_output: list[torch.Tensor] = []


def frees_in_naive_order(q, k, v):
    """Naive attention's order of allocations at a large N, with 64 MiB blocks and a 1 MiB output
    (its proportions at N=8192): a temporary, the scores, the probabilities, the scores freed, the
    output made and kept past the call, as a result is. It never holds more than 130 MiB, but a
    heap that served such blocks fragmented, and what it held grew call after call."""
    block, small = 64 * 2**20 // 4, 2**20 // 4
    temporary = torch.ones(small)
    scores = torch.ones(block)
    del temporary
    probabilities = scores * 2
    del scores
    _last_output[:] = [torch.ones(small)]
    del probabilities
    return exact_attention(q, k, v)


def touches_two_gib(q, k, v):
    """Needs 2 GiB in use (64 MiB at a time, each written): twice a 1 GiB cap."""
    held = [torch.ones(16 * 2**20) for _ in range(32)]
    return exact_attention(q, k, v) + 0 * held[0][0]


def allocates_too_much(q, k, v):
    return torch.empty(64 * 2**30, dtype=torch.uint8)  # 64 GiB


class _WrongBackward(torch.autograd.Function):
    """Exact forward, but the gradient for q is scaled by 2: a backward bug."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return exact_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
            dq, dk, dv = torch.autograd.grad(exact_attention(q, k, v), (q, k, v), grad_out)
        return 2 * dq, dk, dv


def wrong_backward(q, k, v):
    return _WrongBackward.apply(q, k, v)


def notes_its_threads(q, k, v):
    import warnings

    warnings.warn(f"threads={torch.get_num_threads()}", stacklevel=1)
    return exact_attention(q, k, v)


def run_alone(implementation: attnbench.Implementation, case, measure, timeout_s: float = 60,
              memory_gb: float | None = 1.0):
    """One round of ``implementation`` on ``case`` in a confined worker, as a sweep runs it:
    the executor's Finished (its outcome, wall time, log tail, notes)."""
    from attnbench.contract.registry import Registry
    from attnbench.execution.executor import ImplementationRef, PointRound
    from attnbench.execution.local.executor import LocalExecutor
    from attnbench.settings.suite import Limits

    registry = Registry()
    registry.add(implementation)
    executor = LocalExecutor(registry)
    unit = PointRound(ImplementationRef("<python>", implementation.name), implementation.name, case, {}, measure,
                      Limits(timeout_s=timeout_s, memory_gb=memory_gb), 0, 1)
    executor.submit(unit)
    try:
        return next(iter(executor.finished()))
    finally:
        executor.close()


class NoReferenceHere(attnbench.Implementation):
    """An approximation that overrides reference() and answers None (the contract allows it): it
    has no reference of its own for this case, and is reported against exact attention only."""

    name = "no_reference_here"
    exact = False
    time_complexity = "n^2"
    memory_complexity = "n"

    def prepare(self, case, options):
        return exact_attention

    def reference(self, q, k, v, case, options, rows):
        return None


class NumpyCacheDecoder(Toy):
    """Exact decode steps over a KV cache kept in numpy arrays: torch's allocator never sees it."""

    supports_decode = True
    decode_time_complexity = "n"
    decode_memory_complexity = "n"

    def __init__(self) -> None:
        super().__init__("numpy_cache", exact_attention)

    def prepare_decode(self, case, options, k_cache, v_cache):
        import numpy as np

        kept = case.seq_len
        shape = (*k_cache.shape[:2], case.key_len, k_cache.shape[-1])
        keys, values = np.empty(shape, np.float32), np.empty(shape, np.float32)
        keys[:, :, :kept], values[:, :, :kept] = k_cache.numpy(), v_cache.numpy()

        def step(q, k, v):
            keys[:, :, kept:], values[:, :, kept:] = k.numpy(), v.numpy()
            return exact_attention(q, torch.from_numpy(keys), torch.from_numpy(values))

        return step
