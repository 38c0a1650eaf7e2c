"""Stand-in implementations for the scheduler benchmark: each call sleeps instead of computing
(so that a slot's throughput is the scheduler's, not the CPU's), then returns exact attention."""

from __future__ import annotations

import time

import torch

import attnbench

SLEEP_S = 0.2  # one call


def sleeps_then_attends(q, k, v):
    time.sleep(SLEEP_S)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Sleeper(attnbench.Implementation):
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, case, options):
        return sleeps_then_attends
