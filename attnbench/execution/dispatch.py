"""Which case goes to which slot, and when.

Cases start in grid order on the first idle slot that runs their device. No two cases share a
slot, and a CPU case holds its whole machine: it starts only when nothing runs there, and nothing
starts there until it ends. A point waits while a smaller point of its curve on the same kind of
device is still running, unless what has finished already predicts it far inside its limits
(attnbench.execution.skips), so that skip predictions see the smaller points first. A slot lost
with a case unfinished gives that case's unfinished points once to another slot, then records
them as lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from attnbench.contract.case import Case, curve_x, group_key
from attnbench.contract.implementation import Implementation
from attnbench.execution.cases import CaseWork
from attnbench.execution.placement import CaseDone, Placement, RowReady, Slot, SlotLost, device_kind
from attnbench.execution.scheduler import SweepPlan, failed_row
from attnbench.execution.skips import SkipPredictor
from attnbench.measuring import outcome
from attnbench.storage.results import Row

RETRIES = 1  # a case whose slot was lost runs again at most this often, on another slot


@dataclass
class _Running:
    slot: Slot
    work: CaseWork
    done: set[str] = field(default_factory=set)  # series whose rows came back


class Dispatcher:
    """Runs cases on ``slots`` of ``placement``; ``implementations``: series name -> what it runs
    (its declarations feed the skip predictions)."""

    def __init__(self, placement: Placement, slots: Sequence[Slot], plan: SweepPlan,
                 implementations: Mapping[str, Implementation], skips: SkipPredictor,
                 started: Callable[[str, CaseWork], None], warn: Callable[[str], None],
                 flops_samples: Mapping[str, list[float]], copy_samples: Mapping[str, list[float]]) -> None:
        self.placement = placement
        self.slots = list(slots)
        self.kinds_offered = {kind for slot in slots for kind in slot.kinds}
        self.plan = plan
        self.implementations = implementations
        self.skips = skips
        self.started = started
        self.warn = warn
        self.flops_samples = dict(flops_samples)
        self.copy_samples = dict(copy_samples)
        self.unplaced = 0  # points no slot was left to run (every slot of their device was lost)

    def run(self, todo: Sequence[CaseWork]) -> Iterator[Row]:
        """Every row of ``todo``'s cases, as each comes back."""
        pending = list(todo)
        running: dict[str, _Running] = {}
        attempts: dict[Case, int] = {}
        while pending or running:
            self._start_what_fits(pending, running)
            if not running:
                yield from self._unplaceable(pending)
                return
            event = self.placement.next_event()
            if isinstance(event, RowReady):
                running[event.slot.name].done.add(event.row.implementation)
                self.skips.record(event.row)
                yield event.row
            elif isinstance(event, CaseDone):
                del running[event.slot.name]
                self.flops_samples.update(event.end.matmul_flops_samples)
                self.copy_samples.update(event.end.copy_bytes_per_s_samples)
            elif isinstance(event, SlotLost):
                lost = running.pop(event.slot.name)
                self.slots.remove(event.slot)
                yield from self._after_loss(lost, event.reason, pending, attempts)

    def _start_what_fits(self, pending: list[CaseWork], running: dict[str, _Running]) -> None:
        for slot in self.slots:
            if slot.name in running or _machine_held(slot, running):
                continue
            for index, work in enumerate(pending):
                if self._may_start(work, slot, running):
                    work = dataclasses.replace(work, skips=self._skips(work, slot))
                    del pending[index]
                    running[slot.name] = _Running(slot, work)
                    self.started(slot.name, work)
                    self.placement.start(slot, work)
                    break

    def _may_start(self, work: CaseWork, slot: Slot, running: dict[str, _Running]) -> bool:
        case, kind = work.case, device_kind(work.case.device)
        if not slot.runs(case.device):
            return False
        if kind == "cpu" and any(other.slot.node == slot.node for other in running.values()):
            return False
        for name in work.series:
            smaller_running = any(
                name in other.work.series and name not in other.done
                and group_key(other.work.case) == group_key(case) and curve_x(other.work.case) < curve_x(case)
                and other.slot.device_names.get(kind) == slot.device_names.get(kind)
                for other in running.values())
            device_name = slot.device_names.get(kind, "")
            if smaller_running and not self.skips.comfortably_within_limits(
                    name, self.implementations[name], case, slot.memory_caps.get(kind), device_name):
                return False
        return True

    def _skips(self, work: CaseWork, slot: Slot) -> dict[str, str]:
        kind = device_kind(work.case.device)
        reasons = {name: self.skips.skip_reason(name, self.implementations[name], work.case,
                                                slot.memory_caps.get(kind), slot.device_names.get(kind, ""))
                   for name in work.series}
        return {name: reason for name, reason in reasons.items() if reason}

    def _after_loss(self, lost: _Running, reason: str, pending: list[CaseWork],
                    attempts: dict[Case, int]) -> Iterator[Row]:
        work = lost.work
        unfinished = tuple(name for name in work.series if name not in lost.done)
        attempts[work.case] = attempts.get(work.case, 0) + 1
        if unfinished and attempts[work.case] <= RETRIES and any(slot.runs(work.case.device) for slot in self.slots):
            self.warn(f"lost {lost.slot.name} ({reason}); its case {work.case.describe()} runs again elsewhere")
            note = f"measured again after the cluster lost {lost.slot.name}, which was measuring it ({reason})"
            pending.insert(0, CaseWork(work.case, unfinished, notes=(*work.notes, note)))
            return
        self.warn(f"lost {lost.slot.name} ({reason}); {len(unfinished)} point(s) of its case recorded as lost")
        for name in unfinished:
            row = failed_row(work.case, name, outcome.node_lost(lost.slot.name, reason), self.plan)
            self.skips.record(row)
            yield dataclasses.replace(row, notes=(*row.notes, *work.notes))

    def _unplaceable(self, pending: list[CaseWork]) -> Iterator[Row]:
        """Cases no slot runs: on a device no node ever had, unsupported rows; on one whose slots
        were all lost, nothing (the run folder lacks them, and --resume measures them)."""
        for work in pending:
            kind = device_kind(work.case.device)
            if kind in self.kinds_offered:
                self.unplaced += len(work.series)
                continue
            for name in work.series:
                row = failed_row(work.case, name, outcome.no_slot(kind), self.plan)
                self.skips.record(row)
                yield row
        if self.unplaced:
            self.warn(f"{self.unplaced} point(s) were not measured: every node that could run them was lost")


def _machine_held(slot: Slot, running: Mapping[str, _Running]) -> bool:
    """A CPU case runs on the slot's machine: nothing else starts there."""
    return any(other.slot.node == slot.node and device_kind(other.work.case.device) == "cpu"
               for other in running.values())
