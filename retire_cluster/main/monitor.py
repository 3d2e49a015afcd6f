"""Who is late: devices past ``offline_timeout`` and tasks past their lease.

No I/O and no clock of its own: :meth:`Monitor.due` takes ``now`` and answers.
The node calls it from a small loop driven by its injected clock; tests call it
(through ``MainNode.tick(now)``) with whatever time they like.

Task leases sit in a heap of (deadline, task id, attempt); an entry whose task
has since moved on (finished, or reassigned under a new attempt) is dropped
when it surfaces, so nothing has to be removed eagerly. Such entries would
otherwise pile up for a whole task timeout (an hour by default: 18 million of
them at 5,000 tasks/s), so the node says when a task leaves its device
(:meth:`Monitor.release`) and the heap is rebuilt without the dead entries
once they outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from .registry import Device, Registry
from .tasks import Task

__all__ = ["Due", "Monitor"]

#: Dead lease entries tolerated beyond the live ones before the heap is rebuilt.
COMPACT_SLACK = 1024


@dataclass
class Due:
    """What the node must act on now."""

    offline: list[Device]
    #: (task, attempt whose lease expired); act only if the task still holds it
    expired: list[tuple[Task, int]]


class Monitor:
    """Deadlines of devices and task leases.

    Args:
        registry: the devices.
        offline_timeout_s: silence after which a device is offline.
        lease_grace_s: how long past a task's ``timeout`` (counted from its
            assignment) the main node waits for the worker's own timeout result
            before it expires the lease itself.
    """

    def __init__(
        self, registry: Registry, *, offline_timeout_s: float, lease_grace_s: float = 5.0
    ) -> None:
        self.registry = registry
        self.offline_timeout_s = offline_timeout_s
        self.lease_grace_s = lease_grace_s
        self._leases: list[tuple[float, str, int]] = []
        self._live: dict[str, int] = {}  # task id -> the attempt whose lease runs

    def watch(self, task: Task) -> None:
        """Start the lease of a task that was just assigned."""
        assert task.assigned_at is not None
        deadline = task.assigned_at + task.timeout_s + self.lease_grace_s
        self._live[task.task_id] = task.attempt
        heapq.heappush(self._leases, (deadline, task.task_id, task.attempt))
        if len(self._leases) > 2 * len(self._live) + COMPACT_SLACK:
            live = self._live
            self._leases = [entry for entry in self._leases if live.get(entry[1]) == entry[2]]
            heapq.heapify(self._leases)

    def release(self, task: Task) -> None:
        """``task`` left its device (it ended, or went back to the queue): its lease is over."""
        if self._live.get(task.task_id) == task.attempt:
            del self._live[task.task_id]

    def due(self, now: float, lookup: Callable[[str], Task | None]) -> Due:
        """Devices to declare offline and task leases that expired at ``now``."""
        expired: list[tuple[Task, int]] = []
        leases = self._leases
        while leases and leases[0][0] <= now:
            _, task_id, attempt = heapq.heappop(leases)
            if self._live.get(task_id) == attempt:
                del self._live[task_id]
            task = lookup(task_id)
            if task is not None and task.attempt == attempt and task.assigned_device is not None:
                if not task.terminal:
                    expired.append((task, attempt))
        return Due(self.registry.late(now, self.offline_timeout_s), expired)

    def __len__(self) -> int:
        return len(self._leases)
