"""What runs on a node of the Ray cluster: one actor per slot, measuring one case at a time.

The actor takes the catalog of the plugins installed on its node (registered in a confined worker;
and any implementations the driver built in Python and shipped), describes its machine (the environment, the device's name, the memory cap)
and runs each case it is given with the local executor: each round in a forked worker of this
node, exactly as on the machine that started the run. Its rows go back to the driver one by one
(a Ray streaming generator), and the driver writes them.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray

from attnbench.contract.registry import Registry
from attnbench.execution.local.catalog import load_catalog
from attnbench.execution.cases import CaseEnd, CaseRunner, CaseWork, where_on
from attnbench.execution.local.executor import LocalExecutor
from attnbench.execution.local.isolation import start_fork_server
from attnbench.execution.placement import device_kind
from attnbench.execution.scheduler import SweepPlan
from attnbench.storage.results import Row


class NodeRunner:
    """The actor's class (made a Ray actor by attnbench.execution.distributed.placement)."""

    def __init__(self, plan: SweepPlan, shipped: Sequence[bytes], stored_flops: Mapping[str, list[float]],
                 stored_copy: Mapping[str, list[float]], omp_num_threads: str | None) -> None:
        # Ray sets OMP_NUM_THREADS in its workers; the measurements' workers get the driver's.
        if omp_num_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_num_threads
        _drop_niceness()
        _leave_main_alone()
        catalog = load_catalog()  # the plugins installed on this node, registered in a confined worker
        catalog.close()  # (its data is all a node needs: workers load the plugins themselves)
        sent = Registry()
        for payload in shipped:
            sent.add_sent(pickle.loads(payload))
        catalog.add_python(sent)
        if plan.suite.measure.threads is None:  # the node's own cores, not the driver's
            plan = dataclasses.replace(plan, threads=_usable_cpus())
        self.node = ray.get_runtime_context().get_node_id()
        executor = self.executor = LocalExecutor(catalog)
        self.environment = executor.environment(plan.threads, {})
        self.plan = plan
        self.memory_caps = {kind: executor.memory_cap_bytes(plan.suite.limits, kind) for kind in ("cpu", "cuda")}
        self.runner = CaseRunner(plan, executor, self.environment, self.node, stored_flops, stored_copy)
        start_fork_server()

    def facts(self, kind: str) -> dict[str, Any]:
        """This slot as the driver needs it: its name, its device's name and memory cap, and the machine."""
        where = where_on(self.environment, kind, self.node)
        return {"name": where.slot, "node": self.node, "device_name": where.device_name,
                "memory_cap": self.memory_caps.get(device_kind(kind)), "environment": self.environment.to_json()}

    def run(self, work: CaseWork) -> Iterator[Row | CaseEnd]:
        try:
            yield from self.runner.run(work)
        finally:
            self.executor.close()  # the case's input sets and the workers' folders


def _leave_main_alone() -> None:
    """This process's __main__ is Ray's worker script, which multiprocessing would run again in
    every measurement worker it starts (a fixed cost per round that a local run does not pay);
    the workers need nothing from it."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is None and hasattr(main, "__file__"):
        del main.__file__


def _drop_niceness() -> None:
    """Ray starts its workers at a lower priority (its worker_niceness, 15 by default), which the
    measurements' workers would inherit; back to 0 where this process may (else the environment
    records the niceness and the driver warns)."""
    if hasattr(os, "setpriority") and os.getpriority(os.PRIO_PROCESS, 0) > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            pass


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
