"""Which case runs on which slot, and when: one case per slot, a CPU case alone on its machine,
smaller points of a curve before larger ones, lost slots (without a cluster: a scripted placement)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import toys

from attnbench.contract.case import curve_x
from attnbench.contract.registry import Registry
from attnbench.execution.cases import CaseEnd, CaseWork
from attnbench.execution.dispatch import Dispatcher
from attnbench.execution.placement import CaseDone, RowReady, Slot, SlotEvent, SlotLost, device_kind
from attnbench.execution.scheduler import SweepPlan
from attnbench.execution.skips import SkipPredictor
from attnbench.settings.grid import expand_all
from attnbench.settings.loader import load_suite
from attnbench.storage.results import Row, Where

SERIES = ("one", "two")


def slot(name: str, node: str, kind: str) -> Slot:
    return Slot(name, node, frozenset({kind}), {kind: f"{kind} model"}, {kind: None})


@dataclass
class Scripted:
    """Runs each started case by turns with the others: one row per event, then its end. A slot
    named in ``lose_after`` is lost after that many rows of its first case."""

    lose_after: dict[str, int] = field(default_factory=dict)
    running: dict[str, tuple[Slot, CaseWork, deque]] = field(default_factory=dict)
    started: list[tuple[str, CaseWork]] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)  # what should never have run together
    turn: int = 0

    def start(self, where: Slot, work: CaseWork) -> None:
        for other, other_work, _ in self.running.values():
            cpu_involved = "cpu" in (device_kind(work.case.device), device_kind(other_work.case.device))
            if other.name == where.name or (other.node == where.node and cpu_involved):
                self.overlaps.append(f"{work.case.describe()} on {where.name} beside {other.name}")
        self.started.append((where.name, work))
        self.running[where.name] = (where, work, deque(work.series))

    def next_event(self) -> SlotEvent:
        names = sorted(self.running)
        name = names[self.turn % len(names)]
        self.turn += 1
        where, work, left = self.running[name]
        if name in self.lose_after and len(work.series) - len(left) == self.lose_after[name]:
            del self.running[name]
            self.lose_after.pop(name)
            return SlotLost(where, work, "node died")
        if left:
            series = left.popleft()
            return RowReady(where, Row("run", series, work.case, "ok", where=Where("h", "m", node=where.node)))
        del self.running[name]
        return CaseDone(where, CaseEnd(work, {}, {}))


def dispatch(write_suite, slots, sweep: str, placement: Scripted, warnings: list | None = None):
    registry = Registry()
    for name in SERIES:
        registry.add(toys.Toy(name, toys.exact_attention))
    suite = load_suite(write_suite(f"implementations: [one, two]\nsweep: {sweep}\n"), registry)
    plan = SweepPlan(suite, {}, {}, {}, {}, "run", 1)
    implementations = {name: registry.get(name) for name in SERIES}
    dispatcher = Dispatcher(placement, slots, plan, implementations, SkipPredictor(suite.limits, 1, 1),
                            lambda slot, work: None, (warnings if warnings is not None else []).append, {}, {})
    todo = [CaseWork(case, SERIES) for case in expand_all(suite.sweeps)]
    return list(dispatcher.run(todo)), dispatcher


def test_a_cpu_case_holds_its_machine_and_no_two_cases_share_a_slot(write_suite):
    placement = Scripted()
    slots = [slot("a-cpu", "a", "cpu"), slot("a-gpu0", "a", "cuda"), slot("a-gpu1", "a", "cuda"),
             slot("b-cpu", "b", "cpu")]
    rows, _ = dispatch(write_suite, slots, "{seq_len: 64, heads: [1, 2, 3], device: [cpu, cuda]}", placement)
    assert placement.overlaps == []
    assert sorted((r.implementation, r.case.heads, r.case.device) for r in rows) == sorted(
        (name, heads, device) for name in SERIES for heads in (1, 2, 3) for device in ("cpu", "cuda"))
    # Both machines and both GPUs were used: the cases ran side by side where they could.
    assert {name for name, _ in placement.started} == {"a-cpu", "a-gpu0", "a-gpu1", "b-cpu"}


def test_a_larger_point_waits_for_the_smaller_ones_of_its_curve(write_suite):
    placement = Scripted()
    slots = [slot("a", "a", "cpu"), slot("b", "b", "cpu")]
    dispatch(write_suite, slots, "{seq_len: [64, 128], causal: [false, true]}", placement)
    first_two = [(work.case.causal, curve_x(work.case)) for _, work in placement.started[:2]]
    # Not 64 and 128 of one curve: the two curves' smallest points run first, side by side.
    assert sorted(first_two) == [(False, 64), (True, 64)]


def test_a_lost_slot_costs_only_its_unfinished_points_which_run_once_more_elsewhere(write_suite):
    placement = Scripted(lose_after={"a": 1})
    warnings: list[str] = []
    rows, _ = dispatch(write_suite, [slot("a", "a", "cpu"), slot("b", "b", "cpu")], "{seq_len: 64}", placement,
                       warnings)
    assert sorted((row.implementation, row.status) for row in rows) == [("one", "ok"), ("two", "ok")]
    retried = placement.started[-1]
    assert retried[0] == "b" and retried[1].series == ("two",)
    assert retried[1].notes == ("measured again after the cluster lost a, which was measuring it (node died)",)
    assert any("lost a (node died)" in warning for warning in warnings)


def test_points_lost_twice_are_recorded_with_the_loss_as_their_reason(write_suite):
    placement = Scripted(lose_after={"a": 1, "b": 0})
    rows, _ = dispatch(write_suite, [slot("a", "a", "cpu"), slot("b", "b", "cpu")], "{seq_len: 64}", placement)
    assert [(row.implementation, row.status) for row in rows] == [("one", "ok"), ("two", "crashed")]
    assert rows[1].reasons == ("the cluster lost b, which was measuring it: node died",)


def test_a_device_no_node_has_is_unsupported_and_cases_left_without_slots_are_left_for_resume(write_suite):
    rows, _ = dispatch(write_suite, [slot("a", "a", "cpu")], "{seq_len: 64, device: [cpu, cuda]}", Scripted())
    cuda = [row for row in rows if row.case.device == "cuda"]
    assert [(row.status, row.reasons) for row in cuda] == [("unsupported", ("no node of the cluster has a cuda "
                                                                              "device",))] * 2
    rows, dispatcher = dispatch(write_suite, [slot("a", "a", "cpu")], "{seq_len: [64, 128], heads: [1, 2]}",
                                Scripted(lose_after={"a": 0}))
    # The case that was running is recorded as lost (no slot is left to retry it); the three never
    # started are not recorded.
    assert [row.status for row in rows] == ["crashed", "crashed"] and dispatcher.unplaced == 6


def test_a_cluster_of_mixed_gpus_is_reported_per_device_name(tmp_path):
    from attnbench.analysis.scaling import scaling_fits
    from attnbench.measuring.figures import Memory
    from attnbench.storage.results import RowWriter
    from attnbench.storage.run_folder import load_run
    from attnbench.testing import small_case

    writer = RowWriter(tmp_path / "rows.jsonl")
    for model, slot_node in (("NVIDIA H100", "n1"), ("NVIDIA B200", "n2")):
        for n in (64, 128, 256):
            writer.write(Row("run", "one", small_case(seq_len=n, device="cuda"), "ok",
                             memory=Memory(n * 1000 * (2 if "B" in model else 1), None, "allocator"),
                             where=Where("h", model, "GPU-" + slot_node, slot_node)))
    writer.close()
    rows = load_run(tmp_path).rows
    assert {row.case.device for row in rows} == {"cuda (NVIDIA H100)", "cuda (NVIDIA B200)"}
    assert {row.yardstick_key("float32") for row in rows} == {"h/n1/GPU-n1|cuda/float32", "h/n2/GPU-n2|cuda/float32"}
    fits = [fit for fit in scaling_fits(rows, {}) if fit.metric == "memory"]
    assert sorted(fit.group.device for fit in fits) == ["cuda (NVIDIA B200)", "cuda (NVIDIA H100)"]
