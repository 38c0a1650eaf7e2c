"""Implementations that try to pass the checks, or to skew other implementations' numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np
import torch

import attnbench

# Every process these start carries this in its environment, so a test can find any left behind.
MARKER = "ATTNBENCH_ADVERSARY_MARKER"


def exact(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    )


class Adversary(attnbench.Implementation):
    """Declares itself exact, linear in memory: the claims a cheat would like to get away with."""

    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"


class ZeroesV(Adversary):
    """Writes zeros into v, then returns zeros: exact attention of what v has become."""

    name = "zeroes_v"

    def prepare(self, case, options):
        def attention(q, k, v):
            with torch.no_grad():
                v.zero_()
            return exact(q, k, v)

        return attention


class DoublesQ(Adversary):
    """Doubles q in place, then computes exact attention of the doubled q."""

    name = "doubles_q"

    def prepare(self, case, options):
        def attention(q, k, v):
            with torch.no_grad():
                q.mul_(2)
            return exact(q, k, v)

        return attention


class CachesFirstOutput(Adversary):
    """Computes the first call and returns that output forever after (sub-microsecond 'calls')."""

    name = "caches_output"

    def prepare(self, case, options):
        cache = []

        def attention(q, k, v):
            if not cache:
                cache.append(exact(q, k, v))
            return cache[0]

        return attention


class CachesByAddress(Adversary):
    """Caches keyed on the inputs' addresses: right whenever the values are new tensors, fast always."""

    name = "caches_by_address"

    def prepare(self, case, options):
        cache = {}

        def attention(q, k, v):
            key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            if key not in cache:
                cache[key] = exact(q, k, v)
            return cache[key]

        return attention


class CachesByVersion(Adversary):
    """Caches keyed on the inputs' addresses and version counters, one entry per input set the
    timed calls alternate between: right on new values, whatever tensors hold them, and free on
    repeated calls: its timed calls measure a dictionary lookup."""

    name = "caches_by_version"

    def prepare(self, case, options):
        cache = {}

        def attention(q, k, v):
            key = tuple((t.data_ptr(), t._version) for t in (q, k, v))
            if key not in cache:
                cache[key] = exact(q, k, v)
            else:  # (the row's notes show whether it ever hit)
                warnings.warn("caches_by_version: served a cached output", stacklevel=1)
            return cache[key]

        return attention


class ExactThenNoise(Adversary):
    """Exact on the first call, random afterwards."""

    name = "exact_then_noise"

    def prepare(self, case, options):
        calls = [0]

        def attention(q, k, v):
            calls[0] += 1
            return exact(q, k, v) if calls[0] == 1 else q * 0 + torch.randn_like(q)

        return attention


class ExactThenNaN(Adversary):
    """Exact on the first call, NaN afterwards."""

    name = "exact_then_nan"

    def prepare(self, case, options):
        calls = [0]

        def attention(q, k, v):
            calls[0] += 1
            return exact(q, k, v) if calls[0] == 1 else q * float("nan")

        return attention


class MostlyZeroRows(Adversary):
    """Exact on every eighth query row and both ends, zeros on the other 87.5%."""

    name = "mostly_zero_rows"

    def prepare(self, case, options):
        def attention(q, k, v):
            out = exact(q, k, v)
            keep = torch.zeros(q.shape[2], dtype=torch.bool, device=q.device)
            keep[::8] = True
            keep[-1] = True
            return out * keep.view(1, 1, -1, 1)

        return attention


class _WrongKeyGradients(torch.autograd.Function):
    """Exact forward and dq; dk and dv only right at every eighth key row and both ends."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return exact(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
            dq, dk, dv = torch.autograd.grad(exact(q, k, v), (q, k, v), grad_out)
        keep = torch.zeros(k.shape[2], dtype=k.dtype, device=k.device)
        keep[::8] = 1
        keep[0] = keep[-1] = 1
        return dq, dk * keep.view(1, 1, -1, 1), dv * keep.view(1, 1, -1, 1)


class WrongKeyGradients(Adversary):
    name = "wrong_key_grads"

    def prepare(self, case, options):
        return _WrongKeyGradients.apply


class ZerosAtHugeTolerance(Adversary):
    """Returns zeros and declares a tolerance that would pass anything."""

    name = "zeros_huge_tolerance"
    tolerances = {torch.float32: attnbench.Tolerance(atol=1e9, rtol=1e9)}

    def prepare(self, case, options):
        return lambda q, k, v: q * 0


class SlightlyOff(Adversary):
    """Exact plus a relative error of 5e-4: within the float32 cap it declares (rtol 1e-3), beyond
    the default tolerance (1e-5): correct only at its own, loose tolerance."""

    name = "slightly_off"
    tolerances = {torch.float32: attnbench.Tolerance(atol=1e-5, rtol=1e-3)}

    def prepare(self, case, options):
        return lambda q, k, v: exact(q, k, v) * (1 + 5e-4)


class ThreadsInPrepare(Adversary):
    """Changes torch's thread count in prepare (put back by the harness)."""

    name = "threads_in_prepare"

    def prepare(self, case, options):
        torch.set_num_threads(torch.get_num_threads() + 1)
        return exact


class ThreadsInCall(Adversary):
    """Changes torch's thread count inside every call: timed under settings of its own."""

    name = "threads_in_call"

    def prepare(self, case, options):
        wanted = torch.get_num_threads() + 1

        def attention(q, k, v):
            torch.set_num_threads(wanted)
            return exact(q, k, v)

        return attention


def _burn() -> None:
    while True:
        pass


class LeavesProcessesBehind(Adversary):
    """Starts a CPU-burning child, a thread, and a child that escapes into its own session by a
    double fork, in prepare; none of them ever stops by itself."""

    name = "leaves_processes"

    def prepare(self, case, options):
        environment = {**os.environ, MARKER: "1"}
        burner = "while True: pass"
        subprocess.Popen([sys.executable, "-c", burner], env=environment)
        subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys; os.setsid(); "
                          f"subprocess.Popen([sys.executable, '-c', {burner!r}], start_new_session=True); os._exit(0)"],
                         env=environment)
        threading.Thread(target=_burn, daemon=False).start()
        return exact


class NumpyMemory(Adversary):
    """Computes in numpy (float64 N×N scores): torch's allocator sees none of it."""

    name = "numpy_memory"

    def prepare(self, case, options):
        def attention(q, k, v):
            groups = q.shape[1] // k.shape[1]
            qn = q.detach().numpy().astype(np.float64)
            kn = k.detach().repeat_interleave(groups, 1).numpy().astype(np.float64)
            vn = v.detach().repeat_interleave(groups, 1).numpy().astype(np.float64)
            scores = qn @ kn.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            return torch.from_numpy((scores / scores.sum(-1, keepdims=True)) @ vn).to(q.dtype)

        return attention


class Chatty(Adversary):
    """Prints 16 MiB on every call."""

    name = "chatty"

    def prepare(self, case, options):
        lines = ("x" * 1023 + "\n") * 1024 * 16

        def attention(q, k, v):
            sys.stdout.write(lines)
            return exact(q, k, v)

        return attention


class KillsItsGroup(Adversary):
    """Sends SIGKILL to its whole process group (which used to be the harness's)."""

    name = "kills_its_group"

    def prepare(self, case, options):
        os.killpg(0, signal.SIGKILL)
        return exact


class HugeMessage(Adversary):
    """Raises an exception with a 20 MB message."""

    name = "huge_message"

    def prepare(self, case, options):
        raise ValueError("x" * 20_000_000)


class WeirdWarning(Adversary):
    """Warns with line breaks, table separators, HTML and terminal escapes (and is otherwise exact)."""

    name = "weird_warning"
    TEXT = "first line\nsecond | cell <script>alert(1)</script> \x1b[31mred\x1b[0m *bold* [link](http://x)"

    def prepare(self, case, options):
        warnings.warn(self.TEXT, stacklevel=1)
        return exact


CHEATS = (ZeroesV, DoublesQ, CachesFirstOutput, CachesByAddress, CachesByVersion, ExactThenNoise, ExactThenNaN,
          MostlyZeroRows, WrongKeyGradients, ZerosAtHugeTolerance, SlightlyOff, ThreadsInPrepare, ThreadsInCall,
          LeavesProcessesBehind, NumpyMemory, Chatty, KillsItsGroup, HugeMessage, WeirdWarning)


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    for cheat in CHEATS:
        registry.add(cheat())
