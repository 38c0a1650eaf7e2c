"""Cases on a Ray cluster: a slot per GPU, and per node for CPU cases; rows stream back here.

``attnbench run SUITE --executor ray`` starts a Ray instance on this machine, bound to loopback
with no dashboard; ``--ray-address`` joins a running cluster instead. Each slot is an actor
(attnbench.execution.distributed.node) pinned to its node: a GPU slot holds one GPU
(``num_gpus=1``), a CPU slot all of its node's CPUs, so that Ray places nothing else of this run
beside a CPU measurement (the dispatcher also keeps GPU cases off a node while a CPU case runs
there). The driver (this process) decides what runs where (attnbench.execution.dispatch) and
writes every row to the run folder as it arrives.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from attnbench.contract.errors import UserError
from attnbench.contract.catalog import PYTHON_PLUGIN, Catalog, as_catalog
from attnbench.contract.registry import Registry
from attnbench.execution.cases import CaseEnd, CaseWork
from attnbench.execution.placement import CaseDone, RowReady, Slot, SlotEvent, SlotLost
from attnbench.execution.scheduler import SweepPlan
from attnbench.storage.environment import Environment, capture_environment
from attnbench.support.confinement import expected_protections
from attnbench.support.containment import PluginFault, contained
from attnbench.support.text import one_line

EXTRA = "pip install -e '.[ray]'"
START_TIMEOUT_S = 120.0  # for a slot's actor to start (import torch, load plugins) on its node
POLL_S = 1.0  # how long one wait for the next row lasts, so that a Ctrl-C is seen
CANCEL_GRACE_S = 10.0  # after a cancel, for the slots' workers to stop and clean up before they are killed
# Implementations registered in Python rather than by an installed plugin travel with the work.


def require_ray() -> None:
    """One line naming the extra when Ray is not installed. It does not import Ray: Ray reads the
    setting that keeps a Ray of this machine on loopback when it is imported (RayPlacement._connect)."""
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"--executor ray: Ray is not installed; install the extra: {EXTRA}")


class RayPlacement:
    """``address``: a running cluster ("auto", or "host:port"); None starts one on this machine."""

    def __init__(self, registry: Catalog | Registry, address: str | None = None,
                 warn: Callable[[str], None] = lambda text: None) -> None:
        self.catalog = as_catalog(registry)
        self.address = address
        self.warn = warn
        self.actors: dict[str, Any] = {}  # slot name -> its actor
        self.facts: dict[str, dict[str, Any]] = {}  # slot name -> what its actor said of itself
        self.streams: dict[Any, tuple[Slot, CaseWork]] = {}  # a running case's row stream -> where, what
        self.ready: deque[SlotEvent] = deque()

    def environment(self, threads: int, plugins: dict[str, dict[str, Any]]) -> Environment:
        return capture_environment(threads=threads, plugins=plugins, protections=expected_protections().to_json())

    def open(self, plan: SweepPlan, kinds: set[str], stored_flops: Mapping[str, list[float]],
             stored_copy: Mapping[str, list[float]]) -> list[Slot]:
        ray = self._connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from attnbench.execution.distributed.node import NodeRunner

        actor_class = ray.remote(max_restarts=0, max_task_retries=0)(NodeRunner)
        shipped = self._shipped(plan)
        pending = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            on_node = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            for kind, claim in _claims(node.get("Resources", {}), kinds):
                actor = actor_class.options(scheduling_strategy=on_node, **claim).remote(
                    plan, shipped, stored_flops, stored_copy, os.environ.get("OMP_NUM_THREADS"))
                pending.append((kind, actor, actor.facts.remote(kind)))
        slots = []
        for kind, actor, facts_ref in pending:
            try:
                facts = ray.get(facts_ref, timeout=START_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 (a node that cannot start a slot loses only that slot)
                self.warn(f"a {kind} slot did not start on the Ray cluster: {_reason(error)}")
                ray.kill(actor, no_restart=True)
                continue
            slot = Slot(facts["name"], facts["node"], frozenset({kind}), {kind: facts["device_name"]},
                        {kind: facts["memory_cap"]})
            if slot.name in self.actors:  # e.g. two GPUs that report no UUID: one slot, not two on one key
                self.warn(f"two slots on the Ray cluster call themselves {slot.name}; one of them is left out")
                ray.kill(actor, no_restart=True)
                continue
            niceness = facts["environment"].get("niceness")
            if niceness:
                self.warn(f"{slot.name} measures at niceness {niceness} (Ray's worker_niceness), so other work "
                          "there takes the CPUs first: start its Ray node with RAY_worker_niceness=0")
            self.actors[slot.name], self.facts[slot.name] = actor, facts
            slots.append(slot)
        if not slots:
            raise UserError(f"--executor ray: the Ray cluster{f' at {self.address}' if self.address else ''} "
                            f"offers no slot for {', '.join(sorted(kinds))} cases")
        return slots

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {name: facts["environment"] for name, facts in self.facts.items()}

    def start(self, slot: Slot, work: CaseWork) -> None:
        self.streams[self.actors[slot.name].run.remote(work)] = (slot, work)

    def next_event(self) -> SlotEvent:
        import ray

        while not self.ready:
            done, _ = ray.wait(list(self.streams), num_returns=1, timeout=POLL_S)
            for stream in done:
                self.ready.append(self._take(ray, stream))
        return self.ready.popleft()

    def close(self) -> None:
        """Cancel the running cases (their workers stop and clean up), then end every slot."""
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for stream in self.streams:
            contained(lambda stream=stream: ray.cancel(stream), "cancelling a case on the Ray cluster")
        if self.streams:
            contained(lambda: ray.wait(list(self.streams), num_returns=len(self.streams), timeout=CANCEL_GRACE_S),
                      "waiting for cancelled cases")
        for actor in self.actors.values():
            contained(lambda actor=actor: ray.kill(actor, no_restart=True), "ending a slot on the Ray cluster")
        self.streams.clear()
        self.actors.clear()
        ray.shutdown()  # a cluster we joined keeps running; one started here stops

    def _take(self, ray: Any, stream: Any) -> SlotEvent:
        slot, work = self.streams[stream]
        try:
            item = ray.get(next(stream))
        except StopIteration:
            del self.streams[stream]
            return SlotLost(slot, work, "its case ended without its last rows")
        except Exception as error:  # noqa: BLE001 (any failure of the slot: its node died, its actor was killed)
            del self.streams[stream]
            contained(lambda: ray.kill(self.actors.pop(slot.name), no_restart=True), "ending a lost slot")
            return SlotLost(slot, work, _reason(error))
        if isinstance(item, CaseEnd):
            del self.streams[stream]
            return CaseDone(slot, item)
        return RowReady(slot, item)

    def _connect(self) -> Any:
        require_ray()
        if self.address is None:
            # Nothing of a Ray started here may listen beyond this machine: a reachable Ray runs any job
            # it is sent. Ray binds its servers (GCS, raylet and object manager, every worker's and the
            # driver's, its agents) to loopback when the node's IP is loopback, and takes loopback as that
            # IP only where it allows no cluster (where it does, it rewrites even _node_ip_address=127.0.0.1
            # to the external IP). Ray reads this when it is first imported: it comes before any `import
            # ray`. tests/test_ray.py checks the sockets of a real run.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            # Its workers (and so the measurements) at the priority a local run has, not Ray's 15.
            os.environ.setdefault("RAY_worker_niceness", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
            from ray.util import get_node_ip_address
        except ImportError as error:
            raise UserError(f"--executor ray: Ray cannot be imported ({_reason(error)}); reinstall the extra: "
                            f"{EXTRA}") from None
        node_ip = get_node_ip_address() if self.address is None else None  # before init: the IP it would use
        if node_ip is not None and not _loopback(node_ip):
            # Ray was imported before the line above (by the program that runs attnbench): refuse, not expose.
            raise UserError(f"--executor ray: the Ray it starts would listen on {node_ip}, beyond this machine "
                            "(Ray was imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); set that before importing "
                            "Ray, or start a Ray yourself and pass --ray-address")

        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if self.address is None:
                # "local": a Ray of its own, even where another runs on this machine (ray.init() would join
                # the one in RAY_ADDRESS or the last one started here, bound however that was).
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        except Exception as error:  # noqa: BLE001 (Ray's own errors: no cluster there, a version mismatch)
            where = f"--ray-address {self.address}" if self.address else "--executor ray"
            raise UserError(f"{where}: could not start or join Ray: {_reason(error)}") from None
        finally:
            # ray.init makes SIGTERM exit at once; attnbench's handler stops the sweep keeping its rows.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        return ray

    def _shipped(self, plan: SweepPlan) -> list[bytes]:
        """The implementations of the sweep registered in Python (no plugin installs them on the nodes)."""
        shipped = []
        for ref in dict.fromkeys(plan.refs.values()):
            if ref.plugin != PYTHON_PLUGIN:
                continue
            payload = contained(lambda ref=ref: _pickled(self.catalog.python_object(ref.name)), f"pickling {ref.name!r}")
            if isinstance(payload, PluginFault):
                self.warn(f"{ref.name} cannot be sent to the Ray cluster ({payload.message}): its points will say "
                          "it is not registered there")
            else:
                shipped.append(payload)
        return shipped


def _claims(resources: Mapping[str, float], kinds: set[str]) -> list[tuple[str, dict[str, float]]]:
    """The slots a node offers and what each holds there: for CPU cases all of its CPUs, for GPU
    cases one GPU each (and no CPU, so that they sit beside a CPU slot; the dispatcher keeps a CPU
    case alone on its machine)."""
    claims: list[tuple[str, dict[str, float]]] = []
    if "cpu" in kinds and resources.get("CPU", 0) >= 1:
        claims.append(("cpu", {"num_cpus": resources["CPU"]}))
    if "cuda" in kinds:
        claims += [("cuda", {"num_gpus": 1, "num_cpus": 0})] * int(resources.get("GPU", 0))
    return claims


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _pickled(implementation: object) -> bytes:
    from ray import cloudpickle  # classes defined in a script travel by value

    return cloudpickle.dumps(implementation)


def _reason(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return one_line(f"{type(error).__name__}: {lines[0] if lines else ''}")[:300]

