"""Devices the main node knows: what they are, whether they are alive, what they hold.

The registry is plain in-memory state with no I/O; the node persists what it
changes through the store. ``last_seen`` is epoch seconds from the node's
injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from ..protocol.messages import DeviceStatus, utc_timestamp
from .health import CircuitBreaker, DeviceStats

__all__ = ["Device", "Registry", "device_matches"]


@dataclass
class Device:
    """One worker device."""

    device_id: str
    device_info: dict[str, Any] = field(default_factory=dict)
    hardware_specs: dict[str, Any] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    task_types: frozenset[str] = frozenset()
    max_tasks: int = 1
    status: DeviceStatus = DeviceStatus.OFFLINE
    registered_at: float = 0.0
    last_seen: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    accepting: bool = True
    reason: str | None = None
    running: set[str] = field(default_factory=set)
    #: The live connection, or None while disconnected (kept online until
    #: offline_timeout so a phone that changed Wi-Fi keeps its tasks).
    conn: Any = None
    weight: float = 1.0
    stats: DeviceStats = field(default_factory=DeviceStats)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def online(self) -> bool:
        return self.status is DeviceStatus.ONLINE

    @property
    def free_slots(self) -> int:
        return self.max_tasks - len(self.running)

    @property
    def can_take_work(self) -> bool:
        """Connected, online, accepting and with a free slot (the breaker is checked apart)."""
        return self.online and self.conn is not None and self.accepting and self.free_slots > 0

    @property
    def cpu_load(self) -> float:
        value = self.metrics.get("cpu_usage")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def to_record(self) -> dict[str, Any]:
        """The wire form (``list_devices``)."""
        return {
            "device_id": self.device_id,
            "status": self.status.value,
            "connected": self.conn is not None,
            "device_info": self.device_info,
            "hardware_specs": self.hardware_specs,
            "capabilities": sorted(self.capabilities),
            "task_types": sorted(self.task_types),
            "max_concurrent_tasks": self.max_tasks,
            "active_tasks": len(self.running),
            "running_tasks": sorted(self.running),
            "accepting": self.accepting,
            "reason": self.reason,
            "system_metrics": self.metrics,
            "weight": self.weight,
            "statistics": self.stats.to_record(),
            "circuit_breaker": self.breaker.to_record(),
            "registered_at": utc_timestamp(self.registered_at) if self.registered_at else None,
            "last_seen": utc_timestamp(self.last_seen) if self.last_seen else None,
        }


def device_matches(device: Device, task_type: str, requirements: dict[str, Any]) -> bool:
    """Whether ``device`` can run a task of this type and these requirements.

    Requirement keys were checked against REQUIREMENT_KEYS at submission.
    """
    if task_type not in device.task_types:
        return False
    specs, info = device.hardware_specs, device.device_info
    cores = requirements.get("min_cpu_cores")
    if cores is not None and int(specs.get("cpu_cores") or 0) < cores:
        return False
    mem_gb = requirements.get("min_memory_gb")
    if mem_gb is not None and int(specs.get("memory_total") or 0) / 2**30 < mem_gb:
        return False
    for key in ("platform", "architecture", "role"):
        want = requirements.get(key)
        if want is not None and info.get(key) != want:
            return False
    caps = requirements.get("capabilities")
    return not caps or all(c in device.capabilities for c in caps)


class Registry:
    """All devices by id."""

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices.values()))

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def remove(self, device_id: str) -> None:
        self._devices.pop(device_id, None)

    def add(self, device: Device) -> Device:
        self._devices[device.device_id] = device
        return device

    def get_or_create(self, device_id: str) -> Device:
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = Device(device_id)
        return device

    def online(self) -> list[Device]:
        return [d for d in self._devices.values() if d.online]

    def available(self) -> list[Device]:
        """Devices that can be given a task right now."""
        return [d for d in self._devices.values() if d.can_take_work]

    def late(self, now: float, offline_timeout_s: float) -> list[Device]:
        """Online devices silent for longer than ``offline_timeout_s``."""
        cutoff = now - offline_timeout_s
        return [d for d in self._devices.values() if d.online and d.last_seen < cutoff]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in DeviceStatus}
        for d in self._devices.values():
            out[d.status.value] += 1
        return out
