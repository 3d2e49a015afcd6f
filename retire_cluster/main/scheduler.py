"""Which pending task goes to which device. No I/O, no clock.

Theory of operation: pending tasks are grouped by *class*, the pair of task
type and requirements, because every task of a class can run on exactly the
same devices. Each class is a heap ordered by priority (higher first) then
submission order (FIFO). A scheduling pass repeatedly takes the class whose
head task comes first overall and asks the strategy for a device among those
with a free slot that match the class; a class with no such device is set
aside for the rest of the pass, so lower-priority work for *other* devices is
not blocked behind it. Cost per decision grows with the number of classes and
candidate devices, never with the queue length.

Tasks leave the queue lazily: cancelling a pending task only changes its
status, and the pass skips heap entries whose task is no longer pending.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

from ..protocol.messages import TaskStatus
from .registry import Device, device_matches
from .tasks import Task

__all__ = ["STRATEGIES", "Scheduler", "least_loaded"]

ClassKey = tuple[str, str]
Strategy = Callable[[list[Device]], Device]


def least_loaded(candidates: list[Device]) -> Device:
    """Most free slots first, then lowest CPU load, then device id (stable)."""
    return min(candidates, key=lambda d: (-d.free_slots, d.cpu_load, d.device_id))


STRATEGIES: dict[str, Strategy] = {"least_loaded": least_loaded}


def class_key(task: Task) -> ClassKey:
    req = task.requirements
    if not req:
        return (task.task_type, "")
    parts = []
    for key in sorted(req):
        value = req[key]
        if isinstance(value, list):
            value = sorted(str(v) for v in value)
        parts.append(f"{key}={value!r}")
    return (task.task_type, ";".join(parts))


class _Class:
    __slots__ = ("heap", "key", "requirements", "task_type")

    def __init__(self, key: ClassKey, task_type: str, requirements: dict[str, Any]) -> None:
        self.key = key
        self.task_type = task_type
        self.requirements = requirements
        self.heap: list[tuple[int, int, Task]] = []


class Scheduler:
    """The pending queue and the matching of tasks to devices.

    Args:
        strategy: name in :data:`STRATEGIES`.
    """

    def __init__(self, strategy: str = "least_loaded") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self._strategy = STRATEGIES[strategy]
        self._classes: dict[ClassKey, _Class] = {}
        self._pending = 0

    def __len__(self) -> int:
        """Tasks in the queue (including lazily removed ones not yet skipped)."""
        return self._pending

    def push(self, task: Task) -> None:
        """Queue a pending task (new, or taken back from a device)."""
        key = class_key(task)
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _Class(key, task.task_type, task.requirements)
        heapq.heappush(cls.heap, (-task.priority, task.seq, task))
        self._pending += 1

    def extend(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            self.push(task)

    def _head(self, cls: _Class) -> Task | None:
        heap = cls.heap
        while heap:
            task = heap[0][2]
            if task.status is TaskStatus.PENDING:
                return task
            heapq.heappop(heap)
            self._pending -= 1
        del self._classes[cls.key]
        return None

    def pick(self, devices: list[Device]) -> list[tuple[Task, Device]]:
        """Plan as many assignments as the devices' free slots allow.

        ``devices`` are those that can take work now. The returned tasks are
        already out of the queue; the caller moves each to ``assigned`` and
        reserves the slot (``device.running``) before acting on the next event.
        A caller that cannot carry out a pair puts the task back with push().
        """
        free = {d.device_id: d.free_slots for d in devices if d.free_slots > 0}
        if not free:
            return []
        by_id = {d.device_id: d for d in devices}
        heads: list[tuple[int, int, ClassKey]] = []
        for cls in list(self._classes.values()):
            task = self._head(cls)
            if task is not None:
                heads.append((-task.priority, task.seq, cls.key))
        heapq.heapify(heads)
        plan: list[tuple[Task, Device]] = []
        while heads and free:
            _, _, key = heapq.heappop(heads)
            cls = self._classes[key]
            candidates = [
                by_id[i] for i in free if device_matches(by_id[i], cls.task_type, cls.requirements)
            ]
            if not candidates:
                continue
            device = self._strategy(_with_planned(candidates, free))
            _, _, task = heapq.heappop(cls.heap)
            self._pending -= 1
            plan.append((task, device))
            free[device.device_id] -= 1
            if free[device.device_id] == 0:
                del free[device.device_id]
            nxt = self._head(cls)
            if nxt is not None:
                heapq.heappush(heads, (-nxt.priority, nxt.seq, key))
        return plan

    def blocked_classes(self, devices: list[Device]) -> list[tuple[str, dict[str, Any]]]:
        """Classes with pending work that no known device could ever run."""
        out = []
        for cls in self._classes.values():
            if not any(device_matches(d, cls.task_type, cls.requirements) for d in devices):
                out.append((cls.task_type, cls.requirements))
        return out


def _with_planned(candidates: list[Device], free: dict[str, int]) -> list[Device]:
    """Candidates, ordered so the strategy sees slots already planned this pass.

    The strategy reads ``device.free_slots``, which does not yet count the
    assignments planned in this pass; prefer devices with more slots left in
    the plan by presenting the ones with the most remaining first.
    """
    best = max(free[d.device_id] for d in candidates)
    return [d for d in candidates if free[d.device_id] == best]
