"""The task record and its state machine.

Theory of operation: a task is ``pending`` in the queue, ``assigned`` once a
device was chosen and told, ``running`` once the device accepted it (or
reported progress), then ends in one terminal state. A task taken back from a
device (device lost, handed back, lease expired with retries left) goes back
to ``pending``. Every legal move is in :data:`TRANSITIONS`; :meth:`Task.move`
refuses anything else, so a bug cannot quietly resurrect a finished task.

``attempt`` counts assignments and only grows; ``handbacks`` counts the ones a
worker refused or gave back without running, which do not use up a retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..protocol.errors import LocalProtocolError
from ..protocol.messages import TERMINAL_STATUSES, TaskStatus, utc_timestamp

__all__ = ["TRANSITIONS", "Attempt", "Task"]

P, A, R = TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.RUNNING
C, F, X, T = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT

#: status -> the statuses it may move to. Terminal statuses move nowhere.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    P: frozenset({A, X, F}),
    A: frozenset({R, P, C, F, X, T}),
    R: frozenset({P, C, F, X, T}),
    C: frozenset(),
    F: frozenset(),
    X: frozenset(),
    T: frozenset(),
}


@dataclass(slots=True)
class Attempt:
    """One assignment of a task to a device."""

    attempt: int
    device_id: str
    assigned_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "device_id": self.device_id,
            "assigned_at": _ts(self.assigned_at),
            "started_at": _ts(self.started_at),
            "finished_at": _ts(self.finished_at),
            "outcome": self.outcome,
        }


#: Formatted timestamps by value: a task's few times are formatted again at
#: each record (its updates, a waited reply, task_status), an attempt's are
#: its task's. Cleared when full (at most ~0.5 MB).
_STAMPS: dict[float, str] = {}
_MAX_STAMPS = 4096


def _ts(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    text = _STAMPS.get(epoch_s)
    if text is None:
        if len(_STAMPS) >= _MAX_STAMPS:
            _STAMPS.clear()
        text = _STAMPS[epoch_s] = utc_timestamp(epoch_s)
    return text


@dataclass(slots=True)
class Task:
    """A task as the main node holds it. Times are epoch seconds."""

    task_id: str
    task_type: str
    payload: dict[str, Any]
    priority: int
    timeout_s: float
    requirements: dict[str, Any]
    max_retries: int
    created_at: float
    seq: int
    retry_on_timeout: bool = False
    idempotency_key: str | None = None
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 0
    handbacks: int = 0
    assigned_device: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    progress: float | None = None
    execution_time_s: float | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    #: Bumped at each write of this task (memory only): a state is published
    #: after its commit only if no newer state was queued in the meantime.
    version: int = field(default=0, compare=False)
    #: The store batch that carries this task's insert while it is still
    #: queued (memory only): an assignment joining that same batch may be
    #: sent before the commit (MainNode._send_assignments says why).
    insert_batch: int | None = field(default=None, compare=False)
    #: The size of its payload as stored (JSON text, memory only): what the
    #: main node's max_unfinished_bytes counts.
    payload_bytes: int = field(default=0, compare=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def attempts_used(self) -> int:
        """Assignments that count against ``max_retries``."""
        return self.attempt - self.handbacks

    @property
    def retries_left(self) -> bool:
        return self.attempts_used <= self.max_retries

    def move(self, new: TaskStatus) -> None:
        """Change status, refusing moves that are not in :data:`TRANSITIONS`."""
        if new not in TRANSITIONS[self.status]:
            raise LocalProtocolError(f"task {self.task_id}: illegal move {self.status.value} -> {new.value}")
        self.status = new

    def held_by(self, device_id: str, attempt: int) -> bool:
        """Whether ``device_id`` holds ``attempt`` right now."""
        return (
            self.status in (A, R) and self.assigned_device == device_id and self.attempt == attempt
        )

    def ever_held_by(self, device_id: str) -> bool:
        return any(a.device_id == device_id for a in self.attempts)

    def current_attempt(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].attempt == self.attempt:
            return self.attempts[-1]
        return None

    def to_record(self) -> dict[str, Any]:
        """The wire form (``task_status`` ack, ``task_update``)."""
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "status": self.status.value,
            "priority": self.priority,
            "timeout": self.timeout_s,
            "payload": self.payload,
            "requirements": self.requirements,
            "max_retries": self.max_retries,
            "attempt": self.attempt,
            "assigned_device": self.assigned_device,
            "result": self.result,
            "error": self.error,
            "progress": self.progress,
            "execution_time": self.execution_time_s,
            "created_at": _ts(self.created_at),
            "assigned_at": _ts(self.assigned_at),
            "started_at": _ts(self.started_at),
            "finished_at": _ts(self.finished_at),
            "attempts": [a.to_record() for a in self.attempts],
        }

    def assignment(self) -> dict[str, Any]:
        """``task_assign.data.task``."""
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "priority": self.priority,
            "timeout": self.timeout_s,
            "payload": self.payload,
            "requirements": self.requirements,
            "attempt": self.attempt,
        }
