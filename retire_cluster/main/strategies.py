"""How a device is chosen among those that match a task: one ordering per strategy.

A strategy gives each candidate device a sort key (smallest wins) and may
update its own bookkeeping when a device is chosen. The scheduler keeps
devices in heaps by these keys, so a choice costs O(log n) instead of a scan;
it re-keys a device whenever something the key reads changes.

- ``least_loaded`` (default): most free slots, then lowest CPU use.
- ``least_connections``: fewest running tasks.
- ``round_robin``: the device chosen least recently.
- ``weighted_round_robin``: smooth weighted rotation. nginx's smooth WRR is
  O(n) per pick; this is its stride-scheduling equivalent: each device's
  *pass* advances by 1/weight when chosen and the lowest pass wins, which
  interleaves devices in proportion to their weights (weights 5,1,1 give
  a a a b c a a) in O(log n). A device that joins starts at the current
  pass, so it cannot monopolise the queue to catch up.
- ``response_time``: lowest expected time, the per-task-type EWMA of the
  device's execution times times (running tasks + 1); devices with no
  history count as 0 and are tried first.
"""

from __future__ import annotations

import abc
from typing import Any

from .registry import Device

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]

Key = tuple[Any, ...]


class Strategy(abc.ABC):
    """Base: subclasses define key() and may override on_assign()."""

    name = "base"
    #: Whether key() depends on the task type (then keys are per class).
    per_task_type = False

    @abc.abstractmethod
    def key(self, device: Device, task_type: str) -> Key:
        """The sort key of ``device`` for a task of ``task_type``: smallest is chosen."""

    def on_assign(self, device: Device) -> None:
        """Called when ``device`` was chosen (before it is re-keyed)."""

    def forget(self, device_id: str) -> None:
        """Called when a device leaves the scheduler."""


class LeastLoaded(Strategy):
    name = "least_loaded"

    def key(self, device: Device, task_type: str) -> Key:
        return (-device.free_slots, device.cpu_load, device.device_id)


class LeastConnections(Strategy):
    name = "least_connections"

    def key(self, device: Device, task_type: str) -> Key:
        return (len(device.running), device.device_id)


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0
        self._last: dict[str, int] = {}

    def key(self, device: Device, task_type: str) -> Key:
        return (self._last.get(device.device_id, 0), device.device_id)

    def on_assign(self, device: Device) -> None:
        self._turn += 1
        self._last[device.device_id] = self._turn

    def forget(self, device_id: str) -> None:
        self._last.pop(device_id, None)


class WeightedRoundRobin(Strategy):
    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._pass: dict[str, float] = {}
        self._now = 0.0  # the pass of the last choice: where newcomers start

    @staticmethod
    def _stride(device: Device) -> float:
        return 1.0 / max(device.weight, 1e-6)

    def key(self, device: Device, task_type: str) -> Key:
        current = self._pass.get(device.device_id)
        if current is None:
            current = self._pass[device.device_id] = self._now + self._stride(device) / 2
        return (current, device.device_id)

    def on_assign(self, device: Device) -> None:
        current = self._pass.get(device.device_id, self._now + self._stride(device) / 2)
        self._now = max(self._now, current)
        self._pass[device.device_id] = current + self._stride(device)

    def forget(self, device_id: str) -> None:
        self._pass.pop(device_id, None)


class ResponseTime(Strategy):
    name = "response_time"
    per_task_type = True

    def key(self, device: Device, task_type: str) -> Key:
        running = len(device.running)
        return (device.stats.expected_time_s(task_type) * (running + 1), running, device.device_id)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (LeastLoaded, LeastConnections, RoundRobin, WeightedRoundRobin, ResponseTime)
}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
