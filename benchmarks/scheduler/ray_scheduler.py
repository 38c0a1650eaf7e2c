"""The Ray executor's scheduler, measured with stand-ins that sleep instead of computing.

    .venv/bin/python benchmarks/scheduler/ray_scheduler.py [--cases 12] [--slots 1,2,4]
    .venv/bin/python benchmarks/scheduler/ray_scheduler.py --suite suites/quick.yaml

First: the same sweep of sleeping cases on Ray clusters of 1, 2 and 4 one-CPU nodes on this
machine (loopback only), and on the local executor: cases per second, the speed-up over one slot
(near-linear is the goal: a case's rows are all the driver waits for), and Ray's time per case
over the local executor's. The time counted runs from the first case's dispatch to the last row:
starting the cluster and its actors is reported apart. With --suite: that suite (a real one)
measured by the local executor and by `--executor ray` on one node of this machine, one after the
other: the wall time per case of each, and their difference, Ray's overhead per case.
Never beside the test suite or another benchmark (check `uptime`): sleeping stand-ins hide CPU
contention, the real suite does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="sleeping cases per run (default 12)")
    parser.add_argument("--slots", default="1,2,4", help="cluster sizes, in one-CPU nodes (default 1,2,4)")
    parser.add_argument("--suite", type=Path, help="instead: Ray's overhead per case on this suite")
    args = parser.parse_args()
    # Before Ray is imported: the test clusters bind to loopback, and measure at niceness 0.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The nodes' workers import the stand-ins as this script does.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    print(f"load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.suite:
        return suite_overhead(args.suite)
    return sleeping_throughput(args.cases, [int(part) for part in args.slots.split(",")])


class Clock:
    """Progress that notes the first dispatch and the last row, and for each row how long after
    its point ended it arrived here (the nodes share this machine's clock)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.rows: list = []
        self.delays: list[float] = []

    def started(self, total: int) -> None: ...

    def point(self, implementation, case) -> None:
        self.first = self.first or time.perf_counter()

    def finished(self, row) -> None:
        self.last = time.perf_counter()
        self.rows.append(row)
        if row.ended_at is not None:
            self.delays.append(time.time() - row.ended_at)

    def costs_ms(self) -> str:
        """Per case: the median time from a row's point ending to its arrival here, and from a
        case ending on a slot to the next one starting there."""
        by_slot: dict[str, list] = {}
        for row in self.rows:
            by_slot.setdefault(row.where.slot, []).append(row)
        gaps = [later.started_at - earlier.ended_at for rows in by_slot.values()
                for earlier, later in zip(rows, rows[1:], strict=False)]
        return f"{statistics.median(self.delays) * 1e3:.1f} ms, {statistics.median(gaps) * 1e3:.1f} ms"


def sleeping_throughput(cases: int, slot_counts: list[int]) -> int:
    import ray
    from ray.cluster_utils import Cluster
    from standins import SLEEP_S, Sleeper

    from attnbench.contract.registry import Registry
    from attnbench.execution.distributed.placement import RayPlacement
    from attnbench.execution.local.isolation import start_fork_server
    from attnbench.execution.runner import run_suite
    from attnbench.settings.loader import load_suite

    registry = Registry()
    registry.add(Sleeper("sleeper"))
    with tempfile.TemporaryDirectory() as folder:
        suite_path = Path(folder) / "sleepers.yaml"
        heads = list(range(1, cases + 1))
        suite_path.write_text(f"implementations: [sleeper]\nsweep: {{seq_len: 32, heads: {heads}}}\n"
                              "measure: {correctness: {rows: 32}, latency: false, memory: false}\n")
        suite = load_suite(suite_path, registry)
        start_fork_server()  # as each Ray slot does before its first case: the start-up is not a case's
        local = Clock()
        started = time.perf_counter()
        rows = run_suite(suite, registry, output=Path(folder) / "local", progress=local).rows
        local_s = local.last - local.first
        print(f"\nstand-in: {SLEEP_S:g} s per call; {cases} cases of one point each; local executor: "
              f"{local_s:.1f} s for {len(rows)} points ({cases / local_s:.2f} cases/s, {local_s / cases:.2f} s a case; "
              f"{time.perf_counter() - started - local_s:.1f} s before the first case; row delay, gap between cases: "
              f"{local.costs_ms()})")
        results = []
        for slots in slot_counts:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            for _ in range(slots - 1):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            clock = Clock()
            started = time.perf_counter()
            result = run_suite(suite, registry, output=Path(folder) / f"ray{slots}", progress=clock,
                               placement=RayPlacement(registry, cluster.address))
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            span = clock.last - clock.first
            statuses = {row.status for row in result.rows}
            used = len({row.where.node for row in result.rows})
            results.append((slots, span, clock.first - started, statuses, used, clock.costs_ms()))
        base = results[0][1]
        print(f"\n{'slots':>5}  {'nodes used':>10}  {'cases/s':>8}  {'speed-up':>8}  {'s a case':>8}  "
              f"{'Ray/local a case':>16}  {'start-up s':>10}  {'row delay, gap':>18}  statuses")
        for slots, span, startup, statuses, used, costs in results:
            print(f"{slots:>5}  {used:>10}  {cases / span:>8.2f}  {base / span:>7.2f}×  {span / cases:>8.2f}  "
                  f"{span * slots / local_s:>15.2f}×  {startup:>10.1f}  {costs:>18}  {', '.join(sorted(statuses))}")
        print("\nRay/local a case: a slot's time per case over the local executor's (1.00×: no overhead). Row "
              "delay: a point's end to its row here (median); gap: a case's end to the next one's start on the "
              "same slot (median): what dispatching through Ray costs a case.")
    return 0


def suite_overhead(suite_path: Path) -> int:
    from attnbench.contract.registry import load_registry
    from attnbench.execution.distributed.placement import RayPlacement
    from attnbench.execution.runner import run_suite
    from attnbench.settings.grid import expand_all
    from attnbench.settings.loader import load_suite

    registry = load_registry()
    suite = load_suite(suite_path, registry)
    cases = len(expand_all(suite.sweeps))
    with tempfile.TemporaryDirectory() as folder:
        spans = {}
        for label, placement in (("local", None), ("ray", RayPlacement(registry))):
            clock = Clock()
            started = time.perf_counter()
            rows = run_suite(suite, registry, output=Path(folder) / label, progress=clock, placement=placement).rows
            spans[label] = clock.last - clock.first
            statuses = sorted({row.status for row in rows})
            print(f"{label:>5}: {spans[label]:.1f} s for {cases} cases, {len(rows)} points "
                  f"({spans[label] / cases:.2f} s a case; {clock.first - started:.1f} s before the first case); "
                  f"statuses {', '.join(statuses)}")
    print(f"Ray's overhead: {(spans['ray'] - spans['local']) / cases:+.2f} s a case "
          f"({spans['ray'] / spans['local']:.2f}× the local executor's time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
