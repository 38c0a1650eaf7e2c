"""A plugin that sets torch's thread count and OMP_NUM_THREADS when imported, then registers an
exact implementation."""

import os

import torch

import attnbench
from adversaries.cheats import Adversary, exact

torch.set_num_threads(max(1, torch.get_num_threads() - 1) if torch.get_num_threads() > 1 else 3)
os.environ["OMP_NUM_THREADS"] = "1"


class ImportsWithThreads(Adversary):
    name = "threads_at_import"

    def prepare(self, case, options):
        return exact


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    registry.add(ImportsWithThreads())
