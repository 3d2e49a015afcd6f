"""Who is late: devices past ``offline_timeout`` and tasks past their lease.

No I/O and no clock of its own: :meth:`Monitor.due` takes ``now`` and answers.
The node calls it from a small loop driven by its injected clock; tests call it
(through ``MainNode.tick(now)``) with whatever time they like.

Task leases sit in a heap of (deadline, task id, attempt); an entry whose task
has since moved on (finished, reassigned under a new attempt, or given a later
deadline) is dropped when it surfaces, so nothing has to be removed eagerly.
Such entries would otherwise pile up for a whole task timeout (an hour by
default: 18 million of them at 5,000 tasks/s), so the node says when a task
leaves its device (:meth:`Monitor.release`) and the heap is rebuilt without
the dead entries once they outnumber the live ones.

A lease that runs out while its device is away (its connection dropped, or
the main node restarted, and ``offline_timeout`` has not passed) does not
expire: the device may hold the result, finished in time, and send it when
it registers again. The lease is looked at again ``lease_grace_s`` later,
and after the device came back it gets ``lease_grace_s`` once more, for that
result to arrive; a device that goes offline instead loses its tasks as usual.
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
        #: task id -> (attempt, deadline) of the lease that runs
        self._live: dict[str, tuple[int, float]] = {}
        #: tasks whose lease ran out while their device was away: (task id, attempt)
        self._away: set[tuple[str, int]] = set()

    def watch(self, task: Task, deadline: float | None = None) -> None:
        """Start the lease of a task that was just assigned (or move it to ``deadline``)."""
        if deadline is None:
            assert task.assigned_at is not None
            deadline = task.assigned_at + task.timeout_s + self.lease_grace_s
        self._live[task.task_id] = (task.attempt, deadline)
        heapq.heappush(self._leases, (deadline, task.task_id, task.attempt))
        if len(self._leases) > 2 * len(self._live) + COMPACT_SLACK:
            live = self._live
            self._leases = [entry for entry in self._leases if live.get(entry[1]) == (entry[2], entry[0])]
            heapq.heapify(self._leases)

    def release(self, task: Task) -> None:
        """``task`` left its device (it ended, or went back to the queue): its lease is over."""
        live = self._live.get(task.task_id)
        if live is not None and live[0] == task.attempt:
            del self._live[task.task_id]
        self._away.discard((task.task_id, task.attempt))

    def due(self, now: float, lookup: Callable[[str], Task | None]) -> Due:
        """Devices to declare offline and task leases that expired at ``now``."""
        expired: list[tuple[Task, int]] = []
        leases = self._leases
        later: list[Task] = []
        while leases and leases[0][0] <= now:
            deadline, task_id, attempt = heapq.heappop(leases)
            if self._live.get(task_id) != (attempt, deadline):
                continue  # the task moved on, or its lease was moved to a later deadline
            del self._live[task_id]
            task = lookup(task_id)
            if task is None or task.attempt != attempt or task.assigned_device is None or task.terminal:
                self._away.discard((task_id, attempt))
                continue
            device = self.registry.get(task.assigned_device)
            if device is not None and device.online and device.conn is None:
                # Away, not offline: it may hold the result, finished in time. Wait for it.
                self._away.add((task_id, attempt))
                later.append(task)
            elif (task_id, attempt) in self._away:
                # Back since the last look: the result it holds gets lease_grace_s to arrive.
                self._away.discard((task_id, attempt))
                later.append(task)
            else:
                expired.append((task, attempt))
        for task in later:
            self.watch(task, now + self.lease_grace_s)
        return Due(self.registry.late(now, self.offline_timeout_s), expired)

    def __len__(self) -> int:
        return len(self._leases)
