"""Which pending task goes to which device. No I/O; time is an argument.

Theory of operation: pending tasks are grouped by *class*, the pair of task
type and requirements, because every task of a class can run on exactly the
same devices. Each class holds

- a heap of its tasks by priority (higher first) then submission order, and
- the set of devices that match it, plus a heap of those devices ordered by
  the strategy's key (see :mod:`strategies`).

A scheduling pass repeatedly takes the class whose head task comes first
overall and the first *available* device of that class's device heap; a
class with no available device is set aside for the rest of the pass, so
lower-priority work for other devices is not blocked behind it. One decision
costs O(log classes + log devices + log tasks): it never scans the queue nor
the devices.

Both kinds of heap are lazy. Cancelling a pending task only changes its
status; a device that changed (slots, load, breaker, connection) is re-keyed
by pushing a fresh entry stamped with a new version, and entries with an old
version or for an unavailable device are dropped when they surface. Heaps
are rebuilt when stale entries outnumber live ones: a cancelled task behind a
head that stays pending (a class no device runs) never surfaces, and without
that its Task, payload and all, would stay in the queue for good.

The class's matching devices are computed once when the class appears
(O(devices)) and kept up to date as devices change (O(classes) per change).
A class whose queue runs empty stays (the last MAX_EMPTY_CLASSES of them), so
tasks submitted one at a time do not pay the O(devices) step each.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..protocol.errors import did_you_mean
from ..protocol.messages import TaskStatus
from .registry import Device, device_matches
from .strategies import Strategy, make_strategy
from .tasks import Task

__all__ = ["Scheduler", "class_key"]

ClassKey = tuple[str, str]


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


#: How many classes with no pending task stay indexed (each costs a check per device change).
MAX_EMPTY_CLASSES = 64
#: Entries of tasks no longer pending (cancelled) tolerated in a class's queue beyond twice
#: the pending ones before it is rebuilt without them.
TASKS_SLACK = 64
#: How long a class's explanation of a wait is reused: it costs O(devices), and a client
#: waiting on 10,000 pending tasks asks for each task's status.
EXPLAIN_TTL_S = 1.0


class _Class:
    __slots__ = ("compact_at", "devices", "eligible", "key", "requirements", "task_type", "tasks", "why")

    def __init__(self, key: ClassKey, task_type: str, requirements: dict[str, Any]) -> None:
        self.key = key
        self.task_type = task_type
        self.requirements = requirements
        self.tasks: list[tuple[int, int, Task]] = []
        #: rebuild ``tasks`` without the tasks no longer pending once it is longer than this
        self.compact_at = TASKS_SLACK
        self.eligible: set[str] = set()
        self.devices: list[tuple[Any, int, str]] = []  # (strategy key, version, device id)
        #: (when, whether any device matched, explain's sentence), reused for EXPLAIN_TTL_S.
        self.why: tuple[float, bool, str] | None = None


class Scheduler:
    """The pending queue, the devices it may use, and the matching of the two.

    Args:
        strategy: a name in :data:`strategies.STRATEGIES`.
    """

    def __init__(self, strategy: str = "least_loaded") -> None:
        self.strategy: Strategy = make_strategy(strategy)
        self._classes: dict[ClassKey, _Class] = {}
        #: Classes whose queue ran empty, oldest first: kept (and kept indexed)
        #: so that the next task of the class does not rebuild its device
        #: index, an O(devices) step (27 ms per submission at 10,000 devices).
        self._empty: OrderedDict[ClassKey, None] = OrderedDict()
        self._active: dict[ClassKey, _Class] = {}  # the classes with queued tasks: what a pass looks at
        self._devices: dict[str, Device] = {}
        self._versions: dict[str, int] = {}
        self._pending = 0

    def __len__(self) -> int:
        """Tasks in the queue (including lazily removed ones not yet skipped)."""
        return self._pending

    # -- devices ------------------------------------------------------------

    @staticmethod
    def available(device: Device, now: float) -> bool:
        return device.can_take_work and device.breaker.allows(now)

    def update_device(self, device: Device, now: float) -> None:
        """Tell the scheduler a device appeared or changed in any way (cheap: O(classes))."""
        device_id = device.device_id
        self._devices[device_id] = device
        version = self._versions[device_id] = self._versions.get(device_id, 0) + 1
        available = self.available(device, now)
        for cls in self._classes.values():
            if device_matches(device, cls.task_type, cls.requirements):
                cls.eligible.add(device_id)
                if available:
                    heapq.heappush(cls.devices, (self.strategy.key(device, cls.task_type), version, device_id))
                    if len(cls.devices) > 2 * len(cls.eligible) + 64:
                        self._rebuild(cls, now)
            else:
                cls.eligible.discard(device_id)

    def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        self._versions[device_id] = self._versions.get(device_id, 0) + 1
        for cls in self._classes.values():
            cls.eligible.discard(device_id)
        self.strategy.forget(device_id)

    def forget_device(self, device_id: str) -> None:
        """A device gone for good: nothing of it is kept (its heap entries and version too)."""
        self.remove_device(device_id)
        del self._versions[device_id]
        for cls in self._classes.values():
            kept = [entry for entry in cls.devices if entry[2] != device_id]
            if len(kept) != len(cls.devices):
                heapq.heapify(kept)
                cls.devices = kept

    def _rebuild(self, cls: _Class, now: float) -> None:
        entries = []
        for device_id in cls.eligible:
            device = self._devices[device_id]
            if self.available(device, now):
                entries.append((self.strategy.key(device, cls.task_type), self._versions[device_id], device_id))
        heapq.heapify(entries)
        cls.devices = entries

    def _best_device(self, cls: _Class, now: float) -> Device | None:
        heap = cls.devices
        while heap:
            _, version, device_id = heap[0]
            device = self._devices.get(device_id)
            if (
                device is not None
                and version == self._versions.get(device_id)
                and device_id in cls.eligible
                and self.available(device, now)
            ):
                return device
            heapq.heappop(heap)
        return None

    # -- tasks --------------------------------------------------------------

    def push(self, task: Task, now: float = 0.0) -> None:
        """Queue a pending task (new, or taken back from a device)."""
        key = class_key(task)
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _Class(key, task.task_type, task.requirements)
            for device in self._devices.values():
                if device_matches(device, cls.task_type, cls.requirements):
                    cls.eligible.add(device.device_id)
            self._rebuild(cls, now)
        else:
            self._empty.pop(key, None)
        self._active[key] = cls
        heapq.heappush(cls.tasks, (-task.priority, task.seq, task))
        self._pending += 1
        if len(cls.tasks) > cls.compact_at:
            self._compact(cls)

    def _compact(self, cls: _Class) -> None:
        """Drop the tasks no longer pending from a class's queue (amortised O(1) per push)."""
        live = [entry for entry in cls.tasks if entry[2].status is TaskStatus.PENDING]
        self._pending -= len(cls.tasks) - len(live)
        heapq.heapify(live)
        cls.tasks = live
        cls.compact_at = 2 * len(live) + TASKS_SLACK

    def extend(self, tasks: Iterable[Task], now: float = 0.0) -> None:
        for task in tasks:
            self.push(task, now)

    def _head(self, cls: _Class) -> Task | None:
        heap = cls.tasks
        while heap:
            task = heap[0][2]
            if task.status is TaskStatus.PENDING:
                return task
            heapq.heappop(heap)
            self._pending -= 1
        if cls.key not in self._empty:
            self._active.pop(cls.key, None)
            self._empty[cls.key] = None
            if len(self._empty) > MAX_EMPTY_CLASSES:
                del self._classes[self._empty.popitem(last=False)[0]]
        return None

    def pick(self, now: float, limit: int | None = None) -> list[tuple[Task, Device]]:
        """Plan assignments until tasks or free devices run out (or ``limit``).

        Each chosen task is out of the queue and its slot reserved
        (``device.running``); the caller moves it to ``assigned`` and sends it.
        """
        heads: list[tuple[int, int, ClassKey]] = []
        for cls in list(self._active.values()):
            task = self._head(cls)
            if task is not None:
                heads.append((-task.priority, task.seq, cls.key))
        heapq.heapify(heads)
        plan: list[tuple[Task, Device]] = []
        while heads and (limit is None or len(plan) < limit):
            _, _, key = heapq.heappop(heads)
            cls = self._classes[key]
            device = self._best_device(cls, now)
            if device is None:
                continue
            _, _, task = heapq.heappop(cls.tasks)
            self._pending -= 1
            device.running.add(task.task_id)
            device.stats.requests += 1
            device.breaker.on_assign()
            self.strategy.on_assign(device)
            self.update_device(device, now)
            plan.append((task, device))
            nxt = self._head(cls)
            if nxt is not None:
                heapq.heappush(heads, (-nxt.priority, nxt.seq, key))
        return plan

    # -- explaining a wait ---------------------------------------------------

    def explain(self, task: Task, now: float) -> str | None:
        """Why a pending task has no device yet, in one sentence (None if it is not queued here).

        Every task of a class waits for the same reason, found in O(devices that
        match), or O(devices) when none match; it is reused for EXPLAIN_TTL_S.
        """
        cls = self._classes.get(class_key(task))
        if cls is None or task.status is not TaskStatus.PENDING:
            return None
        return self._why(cls, now)

    def _why(self, cls: _Class, now: float) -> str:
        matched = bool(cls.eligible)
        why = cls.why
        if why is None or why[1] is not matched or not 0 <= now - why[0] < EXPLAIN_TTL_S:
            why = cls.why = (now, matched, self._none_free(cls, now) if matched else self._no_match(cls))
        return why[2]

    def stuck(self, now: float) -> list[dict[str, Any]]:
        """Queued classes that no known device can run: type, requirements, tasks waiting, why."""
        out = []
        for cls in self._active.values():
            if cls.eligible:
                continue
            waiting = sum(1 for _, _, t in cls.tasks if t.status is TaskStatus.PENDING)
            if waiting:
                out.append({"task_type": cls.task_type, "requirements": cls.requirements,
                            "tasks": waiting, "reason": self._why(cls, now)})
        return out

    def _no_match(self, cls: _Class) -> str:
        devices = list(self._devices.values())
        if not devices:
            return "no device has joined yet; start `retire-cluster worker --main ... --token ...` on one."
        kind = cls.task_type
        runners = [d for d in devices if kind in d.task_types]
        if not runners:
            offered = sorted({t for d in devices for t in d.task_types})
            typo = did_you_mean(kind, offered)
            if kind in ("python_eval", "command"):
                hint = f"its owner must allow it with `retire-cluster worker --allow {kind}`"
            elif typo:
                hint = f"{typo}Otherwise start a worker that offers it"
            else:
                hint = "start a worker that offers it"
            return (f"no device runs {kind!r} tasks (they run {', '.join(offered) or 'nothing'}); "
                    f"{hint}.")
        unmet = [_pair(key, value) for key, value in sorted(cls.requirements.items())
                 if not any(device_matches(d, kind, {key: value}) for d in runners)]
        if unmet:
            n, needs = len(runners), ", ".join(unmet)
            who = (f"the one device that runs {kind!r} does not meet {needs}" if n == 1
                   else f"none of the {n} devices that run {kind!r} meets {needs}")
            return f"{who}; `retire-cluster devices` shows what each has."
        return (f"no single device that runs {kind!r} meets all of the requirements together "
                f"({', '.join(_pair(k, v) for k, v in sorted(cls.requirements.items()))}).")

    def _none_free(self, cls: _Class, now: float) -> str:
        reasons: dict[str, int] = {}
        for device_id in cls.eligible:
            device = self._devices[device_id]
            breaker = device.breaker
            if not device.online:
                why = "offline"
            elif device.conn is None:
                why = "reconnecting"
            elif not device.accepting:
                why = f"paused by its owner's policy ({device.reason})" if device.reason else "paused by its owner"
            elif device.free_slots <= 0:
                why = "busy"
            elif breaker.state == "open" and now < breaker.opened_at + breaker.reset_s:
                why = "resting after failures (circuit breaker open)"
            elif breaker.state != "closed" and breaker.trial_running:
                why = "running a trial task after failures"
            else:
                return "a device that can run it is free; it goes out at the next scheduling pass."
            reasons[why] = reasons.get(why, 0) + 1
        parts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        n = len(cls.eligible)
        return f"{n} device{'s' if n > 1 else ''} can run it and none is free: {parts}."


def _pair(key: str, value: Any) -> str:
    """A requirement as key=value, 64 rather than 64.0, lists comma-separated."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return f"{key}={value}"

