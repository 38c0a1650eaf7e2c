"""One change to a built-in, measured before and after in one run: the implementation as it is in
the working tree against the same implementation at an earlier commit, called alternately on the
same inputs, so that both see the same machine.

    python benchmarks/before_after.py REV IMPLEMENTATION [--seq-lens 4096 16384] [--mode forward]
        [--causal] [--threads 1] [--rounds 7] [--option chunk_size=512 ...]

Prints, per N, each median latency (of ``--rounds`` alternating calls, after a warm-up call of
each), the speed-up, and how far the two outputs (and, for a training step, the gradients) are
apart: a change meant to be exact must leave that at rounding level. For quoting, measure
through attnbench itself (suites/limits.yaml, benchmarks/hardware_limit.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import yaml

import attnbench
from attnbench import Case
from attnbench.measuring.allocator import steady_cpu_allocator
from attnbench.presenting.summary import format_table
from attnbench.support.units import format_seconds

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with, e.g. HEAD or main~1")
    parser.add_argument("implementation", help="a built-in's name (its module is plugins/NAME.py)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--mode", choices=("forward", "forward_backward"), default="forward")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for both, as YAML, e.g. chunk_size=512")
    args = parser.parse_args()
    steady_cpu_allocator()  # as attnbench's workers have it: freed pages reused, not faulted in afresh
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.option)}
    with tempfile.TemporaryDirectory() as folder:
        before = _implementation(_module_at(args.rev, args.implementation, Path(folder)), args.implementation)
        after = _implementation(_module_at(None, args.implementation, Path(folder)), args.implementation)
        lines = [_compare(before, after, _case(n, args), options, args.rounds) for n in args.seq_lens]
    print(f"{args.implementation}: {args.rev} against the working tree, {args.mode}"
          f"{' causal' if args.causal else ''}, {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    print(format_table(("N", "before", "after", "speed-up", "outputs apart", "gradients apart"), lines))
    return 0


def _case(seq_len: int, args: argparse.Namespace) -> Case:
    return Case(batch=1, heads=8, kv_heads=8, seq_len=seq_len, head_dim=64, dtype=torch.float32, device="cpu",
                causal=args.causal, mode=args.mode)


def _module_at(rev: str | None, name: str, folder: Path) -> ModuleType:
    """plugins/NAME.py at ``rev`` (None: the working tree), imported under a name of its own."""
    label = rev.replace("~", "_").replace("^", "_") if rev else "worktree"
    path = folder / f"{name}_{label}.py"
    if rev is None:
        path.write_text((REPO / "plugins" / f"{name}.py").read_text())
    else:
        path.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:plugins/{name}.py"],
                                       check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look up the module's names
    spec.loader.exec_module(module)
    return module


class _Collect:
    def __init__(self) -> None:
        self.added: list[attnbench.Implementation] = []

    def add(self, implementation: attnbench.Implementation) -> None:
        self.added.append(implementation)


def _implementation(module: ModuleType, name: str) -> attnbench.Implementation:
    collect = _Collect()
    module.attnbench_register_implementations(collect)
    return next(impl for impl in collect.added if impl.name == name)


def _compare(before: attnbench.Implementation, after: attnbench.Implementation, case: Case,
             options: dict, rounds: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 8, case.seq_len, 64, generator=generator) for _ in range(3)]
    grad = torch.randn(1, 8, case.seq_len, 64, generator=generator)
    calls = [_call(impl, case, {**impl.default_options, **options}, inputs, grad) for impl in (before, after)]
    results = [call() for call in calls]  # warm-up, and what each computes
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[index].append(time.perf_counter() - start)
    old, new = (statistics.median(t) for t in times)
    apart = [_relative(a, b) for a, b in zip(*results, strict=True)]
    return [str(case.seq_len), format_seconds(old), format_seconds(new), f"{old / new:.2f}x",
            f"{apart[0]:.1e}", f"{max(apart[1:]):.1e}" if len(apart) > 1 else ""]


def _call(impl: attnbench.Implementation, case: Case, options: dict, inputs: list[torch.Tensor],
          grad: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    attention = impl.prepare(case, options)
    leaves = [x.clone().requires_grad_(case.backward) for x in inputs]

    def call() -> list[torch.Tensor]:
        if not case.backward:
            with torch.no_grad():
                return [attention(*leaves)]
        for leaf in leaves:
            leaf.grad = None
        out = attention(*leaves)
        out.backward(grad)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    return call


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


if __name__ == "__main__":
    sys.exit(main())
