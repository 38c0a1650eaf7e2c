"""The Ray executor on a real cluster of two nodes on this machine, bound to loopback: the same
rows as the local executor, one case per node at a time, a node lost mid-case, Ctrl-C, resume; and
the Ray that `--executor ray` starts itself, listening on loopback only."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import toys

# Before Ray is imported: every node of the test cluster binds to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # as `--executor ray` starts its own (see the README)
ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from attnbench import cli  # noqa: E402
from attnbench.contract.errors import UserError  # noqa: E402
from attnbench.contract.registry import DISABLE_AUTOLOAD_VARIABLE, Registry  # noqa: E402
from attnbench.execution.distributed.placement import RayPlacement  # noqa: E402
from attnbench.execution.runner import run_suite  # noqa: E402
from attnbench.settings.loader import load_suite  # noqa: E402
from attnbench.storage.results import read_rows  # noqa: E402
from attnbench.support.containment import Interrupted  # noqa: E402

TESTS = Path(__file__).resolve().parent
FAST = "measure: {correctness: {rows: 32}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 2}}\n"
PROBE = "ATTNBENCH_LISTEN_PROBE"  # in the environment of every process of one run, and so findable


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each; their workers import the toys like ours do."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), *sys.path[:1], saved]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def members(registry: Registry, *extra) -> Registry:
    chosen = Registry()
    for member in (registry.get("naive"), *extra):
        chosen.add(member)
    return chosen


def test_a_ray_run_has_the_local_runs_points_and_statuses_one_case_per_node_at_a_time(cluster, tmp_path,
                                                                                         write_suite, registry):
    chosen = members(registry, toys.Toy("wrong", toys.returns_query))
    suite = load_suite(write_suite("implementations: [naive, wrong]\nsweep: {seq_len: 32, heads: [1, 2, 3]}\n"
                                   + FAST), chosen)
    local = run_suite(suite, chosen, output=tmp_path / "local").rows
    sigterm = signal.getsignal(signal.SIGTERM)
    on_ray = run_suite(suite, chosen, output=tmp_path / "ray", placement=RayPlacement(chosen, cluster[0].address))
    assert signal.getsignal(signal.SIGTERM) == sigterm  # joining Ray leaves SIGTERM to attnbench

    def points(rows):
        return sorted((row.implementation, row.case.seq_len, row.case.heads, row.status) for row in rows)

    assert points(on_ray.rows) == points(local) and len(local) == 6
    assert {row.status for row in local if row.implementation == "wrong"} == {"incorrect"}
    ray.init(address=cluster[0].address, log_to_driver=False)
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    ray.shutdown()
    assert {row.where.host for row in on_ray.rows} == {socket.gethostname()}
    assert {row.where.node for row in on_ray.rows} <= nodes and len({row.where.node for row in on_ray.rows}) > 1
    # No two cases ever overlapped on one node (each node is one CPU slot).
    spans: dict[tuple[str, object], list[float]] = defaultdict(list)
    for row in on_ray.rows:
        spans[(row.where.node, row.case)] += [row.started_at, row.ended_at]
    by_node = defaultdict(list)
    for (node, _), times in spans.items():
        by_node[node].append((min(times), max(times)))
    for intervals in by_node.values():
        intervals.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False))
    # Each node's environment and yardstick are its own, and throughput is put against them.
    environment = on_ray.environment
    assert set(environment.nodes) >= {row.where.slot for row in on_ray.rows}
    assert all(f"{row.where.slot}|cpu/float32" in environment.matmul_flops for row in on_ray.rows)
    assert {node["niceness"] for node in environment.nodes.values()} == {0}


class Stopper:
    """Progress that loses a node (not the head) when its first row arrives, and is Ctrl-C'd
    when the first point measured again elsewhere arrives."""

    def __init__(self, cluster: Cluster, workers: list) -> None:
        self.cluster, self.workers = cluster, workers
        self.lost: str | None = None

    def started(self, total: int) -> None: ...

    def point(self, implementation, case) -> None: ...

    def finished(self, row) -> None:
        worker = next((node for node in self.workers if node.node_id == row.where.node), None)
        if self.lost is None and worker is not None:
            self.lost = worker.node_id
            self.cluster.remove_node(worker, allow_graceful=False)
        if any("measured again after the cluster lost" in note for note in row.notes):
            raise Interrupted("SIGINT")


def test_a_lost_node_costs_only_its_case_and_an_interrupted_run_resumes_to_every_point_once(
        cluster, tmp_path, write_suite, registry):
    chosen = members(registry, toys.Toy("sleepy", toys.sleeps_then_exact))
    heads = (1, 2, 3, 4, 5, 6)
    suite = load_suite(write_suite(f"implementations: [naive, sleepy]\nsweep: {{seq_len: 32, heads: {list(heads)}}}\n"
                                   "measure: {correctness: {rows: 32}, latency: false, memory: false}\n"), chosen)
    stopper = Stopper(*cluster)
    first = run_suite(suite, chosen, output=tmp_path, progress=stopper,
                      placement=RayPlacement(chosen, cluster[0].address))
    assert first.interrupted is not None and stopper.lost is not None
    retried = [row for row in first.rows if any("measured again after the cluster lost" in n for n in row.notes)]
    assert retried and all(row.status == "ok" and row.where.node != stopper.lost for row in retried)
    # A case the lost node was running keeps the points it had finished there; the rest ran elsewhere.
    for row in first.rows:
        if row.case in {point.case for point in retried}:
            assert row in retried or row.where.node == stopper.lost

    resumed = run_suite(suite, chosen, resume=first.run_dir, placement=RayPlacement(chosen, cluster[0].address))
    assert resumed.interrupted is None
    ledger = read_rows(first.rows_path)
    counts = Counter((row.implementation, row.case.heads) for row in ledger)
    assert counts == Counter({(name, count): 1 for name in ("naive", "sleepy") for count in heads})
    assert {row.status for row in ledger} == {"ok"}


def test_without_ray_the_flag_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    suite = tmp_path / "suite.yaml"
    suite.write_text("implementations: [naive]\nsweep: {seq_len: 32}\n")
    assert cli.main(["run", str(suite), "--executor", "ray"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "attnbench: error: --executor ray: Ray is not installed; install the extra: pip install -e '.[ray]'"


def listeners(marker: str) -> set[tuple[int, str, str, str, int]]:
    """(pid, process name, protocol, address, port) of each listening socket of the processes that
    carry ``marker`` in their environment: TCP in LISTEN, UDP unconnected and bound to a port (from
    /proc/net and each process's socket inodes)."""
    owners: dict[int, tuple[int, str]] = {}  # socket inode -> (pid, name)
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or f"{PROBE}={marker}\0".encode() not in (entry / "environ").read_bytes():
                continue
            name = (entry / "comm").read_text().strip()
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = (int(entry.name), name)
        except OSError:  # a process that ended meanwhile
            continue
    found = set()
    for protocol, listening in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        for line in Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if inode not in owners or state != listening:
                continue
            hex_address, hex_port = local.split(":")
            # The kernel prints the address as 32-bit words in host byte order.
            words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
            address = ipaddress.ip_address(b"".join(struct.pack("=I", word) for word in words))
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket is 127.0.0.1
            if int(hex_port, 16):
                found.add((*owners[inode], protocol, str(address), int(hex_port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the sockets from Linux's /proc")
def test_the_ray_a_run_starts_listens_on_loopback_only(tmp_path, write_suite):
    """Issue 31: `attnbench run SUITE --executor ray` as a user starts it, in a fresh process without
    the loopback setting this module made for its own Ray: while the run's Ray is up, every socket
    that the driver and Ray's processes (GCS, raylet, workers, agents) listen on is bound to
    127.0.0.1 or ::1. The sockets are read, not the settings."""
    suite = write_suite("implementations: [naive]\nsweep: {seq_len: 32, heads: 2}\n" + FAST)
    marker = uuid.uuid4().hex  # every process the run starts inherits it
    environment = {name: value for name, value in os.environ.items() if name != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    environment.update({PROBE: marker, DISABLE_AUTOLOAD_VARIABLE: "1"})
    with (tmp_path / "stderr").open("w") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "attnbench", "run", str(suite), "--executor", "ray",
                                "--output", str(tmp_path / "out")], cwd=tmp_path, env=environment,
                               stdout=subprocess.DEVNULL, stderr=stderr)
        seen: set[tuple[int, str, str, str, int]] = set()
        deadline = time.monotonic() + 300
        try:
            while run.poll() is None and time.monotonic() < deadline:
                seen |= listeners(marker)
                time.sleep(0.1)
        finally:
            run.kill()
            run.wait()
    assert run.returncode == 0, (tmp_path / "stderr").read_text()
    # The check saw the run's Ray up: the driver, the GCS, the raylet and the slot's worker listening.
    assert {"gcs_server", "raylet", "ray::NodeRunner"} <= {name for _, name, *_ in seen}, seen
    assert run.pid in {pid for pid, *_ in seen}, seen
    assert {entry for entry in seen if entry[3] not in ("127.0.0.1", "::1")} == set(), sorted(seen)


def test_a_ray_that_would_listen_beyond_this_machine_is_not_started(monkeypatch, registry):
    """Where Ray was imported without the loopback setting, its node's address is the external one:
    the run refuses in one line rather than start a Ray reachable from the network."""
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.7")
    with pytest.raises(UserError, match="the Ray it starts would listen on 192.0.2.7, beyond this machine"):
        RayPlacement(registry, None)._connect()
    assert not ray.is_initialized()
