"""How well each device has done: statistics, response-time averages, circuit breaker.

No I/O and no clock of its own: every method that needs the time takes ``now``.

Circuit breaker (per device), as in the seed's load balancer:

    closed --N consecutive failures--> open --reset_s elapsed--> half_open
    half_open --success--> closed            half_open --failure--> open

While open the device gets no work; half-open lets exactly one trial task
through. A success is a ``completed`` result. The breaker is for devices that
are broken, not for bad tasks, so a failure counts only when it is the
device's doing (:func:`device_at_fault`):

- counts: the device was lost with the task (offline, or it re-registered
  without it); the main node expired the lease (no result by the task's
  ``timeout`` plus ``lease_grace_s``); a ``failed`` result that says the
  worker could not run the task: ``"fault": "device"`` in its result (what
  workers send since that field exists), or, from a worker without the
  field, no exit code and an ``error`` that begins
  as one of :data:`DEVICE_ERRORS` or ends as :data:`DEVICE_ERROR_ENDS` (it
  offered a type it cannot run, could not start the process or make its
  scratch directory, the python_eval sandbox ended without an answer, the
  worker itself raised), or exit code 0 (the task succeeded, the worker failed);
- does not count (the task's own doing): ``"fault": "task"``, a ``failed`` result with a non-zero
  exit code (a ``command`` that exited non-zero or was killed at a resource
  limit, a python_eval expression that raised, a plug-in's non-zero exit), a
  ``failed`` result without an exit code for any other reason (an invalid
  payload, an exception in a plug-in), and a ``timeout`` the worker reports
  (it stopped the task at the task's own ``timeout``, as it should: the task
  needed more time than it asked for).

A result that does not count changes neither the breaker's count nor its
state (a half-open device's trial simply ends, and the next task is the next
trial). Device statistics still count every failed, timed-out or lost task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEVICE_ERRORS", "DEVICE_ERROR_ENDS", "EWMA_ALPHA", "CircuitBreaker", "DeviceStats", "device_at_fault"]

#: How the worker's ``error`` begins when it could not run a task at all (an
#: exit code is then null): retire_cluster/worker/executor.py and agent.py.
#: Only for workers that do not send ``result.fault`` yet.
#: tests/test_health_breaker.py runs the worker's executor to keep these in step.
DEVICE_ERRORS = (
    "cannot start the task process",  # fork/exec of the sandbox failed (no memory, no processes left)
    "cannot create a scratch directory",  # its disk is full or read-only
    "python_eval child ended with",  # the sandboxed Python died without an answer
    "worker error:",  # a bug in the worker
)
#: ... or ends: "task type 'x' is not enabled on this worker" (it offered a type it cannot run).
DEVICE_ERROR_ENDS = ("is not enabled on this worker",)


def device_at_fault(status: str, result: Mapping[str, Any] | None) -> bool:
    """Whether a worker's ``task_result`` of ``status`` and ``result`` counts against its device.

    Only ``failed`` can: see the module docstring for the rule.
    """
    if status != "failed":
        return False
    if not isinstance(result, Mapping):
        return False
    fault = result.get("fault")
    if fault == "device" or fault == "task":  # the worker says so (the executor's DeviceFault)
        return bool(fault == "device")
    code = result.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code == 0  # non-zero: the task's process or expression said it failed
    error = result.get("error")
    return isinstance(error, str) and (error.startswith(DEVICE_ERRORS) or error.endswith(DEVICE_ERROR_ENDS))


#: Weight of the newest sample in the response-time average.
EWMA_ALPHA = 0.3


@dataclass
class CircuitBreaker:
    """One device's breaker. ``failures`` and ``reset_s`` come from the main config."""

    failures: int = 5
    reset_s: float = 60.0
    state: str = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_running: bool = False

    def allows(self, now: float) -> bool:
        """Whether the device may be given a task at ``now`` (half-open: one trial)."""
        if self.state == "closed":
            return True
        if self.state == "open" and now >= self.opened_at + self.reset_s:
            self.state = "half_open"
        return self.state == "half_open" and not self.trial_running

    def reopens_at(self) -> float | None:
        """When an open breaker turns half-open (the node schedules then)."""
        return self.opened_at + self.reset_s if self.state == "open" else None

    def on_assign(self) -> None:
        if self.state == "half_open":
            self.trial_running = True

    def on_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.trial_running = False

    def on_failure(self, now: float) -> bool:
        """Record a failure; returns True when this opened the breaker."""
        self.consecutive_failures += 1
        self.trial_running = False
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive_failures >= self.failures
        ):
            self.state = "open"
            self.opened_at = now
            return True
        return False

    def to_record(self) -> dict[str, Any]:
        return {"state": self.state, "consecutive_failures": self.consecutive_failures}


@dataclass
class DeviceStats:
    """Counters kept across restarts (persisted with the device)."""

    requests: int = 0
    successes: int = 0
    failures: int = 0
    total_time_s: float = 0.0
    #: task type -> exponentially weighted average execution time
    ewma_s: dict[str, float] = field(default_factory=dict)

    @property
    def average_time_s(self) -> float | None:
        return self.total_time_s / self.successes if self.successes else None

    def expected_time_s(self, task_type: str) -> float:
        """The response-time estimate for ``task_type`` (0 when unknown: try new devices)."""
        if task_type in self.ewma_s:
            return self.ewma_s[task_type]
        if self.ewma_s:
            return sum(self.ewma_s.values()) / len(self.ewma_s)
        return 0.0

    def record_success(self, task_type: str, execution_time_s: float | None) -> None:
        self.successes += 1
        if execution_time_s is not None and execution_time_s >= 0:
            self.total_time_s += execution_time_s
            old = self.ewma_s.get(task_type)
            self.ewma_s[task_type] = (
                execution_time_s if old is None else EWMA_ALPHA * execution_time_s + (1 - EWMA_ALPHA) * old
            )

    def to_record(self) -> dict[str, Any]:
        avg = self.average_time_s
        return {
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "average_time": None if avg is None else round(avg, 6),
            "ewma_time": {k: round(v, 6) for k, v in sorted(self.ewma_s.items())},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "total_time_s": self.total_time_s,
            "ewma_s": self.ewma_s,
        }

    @classmethod
    def from_json(cls, data: Any) -> DeviceStats:
        if not isinstance(data, dict):
            return cls()
        return cls(
            requests=int(data.get("requests", 0)),
            successes=int(data.get("successes", 0)),
            failures=int(data.get("failures", 0)),
            total_time_s=float(data.get("total_time_s", 0.0)),
            ewma_s={str(k): float(v) for k, v in (data.get("ewma_s") or {}).items()},
        )
