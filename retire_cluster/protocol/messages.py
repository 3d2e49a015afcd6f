"""Messages as they appear on the wire, and the enumerations they use.

A :class:`Message` is the envelope of DESIGN.md: ``message_type``,
``message_id``, ``sender_id``, optional ``target_id``, ``timestamp``, ``data``
and ``auth_token``. The content of ``data`` is checked against the JSON Schema
of its message type (see :mod:`retire_cluster.protocol.validation`) and kept as
a plain dict: the schemas are the one description of every field, and a second
description as dataclasses would drift from them.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "STOPPING_REASON",
    "ACTIVE_STATUSES",
    "CLIENT_MESSAGE_TYPES",
    "DEFAULT_TASK_TIMEOUT_S",
    "PRIORITY_NAMES",
    "REPLY_TYPES",
    "REQUIREMENT_KEYS",
    "TERMINAL_STATUSES",
    "WORKER_MESSAGE_TYPES",
    "DeviceStatus",
    "Message",
    "MessageType",
    "TaskStatus",
    "ack",
    "error_reply",
    "new_message_id",
    "parse_priority",
    "utc_timestamp",
]


class MessageType(str, Enum):
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    TASK_ASSIGN = "task_assign"
    TASK_RESULT = "task_result"
    TASK_PROGRESS = "task_progress"
    TASK_CANCEL = "task_cancel"
    TASK_SUBMIT = "task_submit"
    TASK_STATUS = "task_status"
    TASK_LIST = "task_list"
    LIST_DEVICES = "list_devices"
    CLUSTER_STATUS = "cluster_status"
    SUBSCRIBE = "subscribe"
    TASK_UPDATE = "task_update"
    ACK = "ack"
    ERROR = "error"


#: Replies: they answer a request and never get a reply themselves.
REPLY_TYPES = frozenset({MessageType.ACK.value, MessageType.ERROR.value})
#: What a worker sends after ``register``.
WORKER_MESSAGE_TYPES = frozenset(
    {"register", "heartbeat", "task_result", "task_progress", "ack", "error"}
)
#: What a client sends.
CLIENT_MESSAGE_TYPES = frozenset(
    {
        "task_submit",
        "task_status",
        "task_cancel",
        "task_list",
        "list_devices",
        "cluster_status",
        "subscribe",
    }
)


class TaskStatus(str, Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT}
)
#: Held by a device right now.
ACTIVE_STATUSES = frozenset({TaskStatus.ASSIGNED, TaskStatus.RUNNING})


class DeviceStatus(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


PRIORITY_NAMES: dict[str, int] = {"low": 1, "normal": 5, "high": 10, "urgent": 20}
REQUIREMENT_KEYS = frozenset(
    {"min_cpu_cores", "min_memory_gb", "platform", "architecture", "role", "capabilities"}
)
DEFAULT_TASK_TIMEOUT_S = 3600.0
#: The ``reason`` of the heartbeat a worker sends when its owner stops it, before it hands its
#: tasks back: the main node gives it nothing more and marks it offline once it has gone.
STOPPING_REASON = "stopping"


def parse_priority(value: Any) -> int:
    """Turn ``low|normal|high|urgent`` or an integer 0-100 into an integer.

    Raises:
        ValueError: with a sentence saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError("priority must be low, normal, high, urgent or an integer 0-100")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema counts 5.0 as an integer too
    if isinstance(value, int):
        if 0 <= value <= 100:
            return value
    elif isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        if name.isascii() and name.isdigit() and 0 <= int(name) <= 100:
            return int(name)
    raise ValueError(
        f"priority {value!r} is not valid; use low, normal, high, urgent or an integer 0-100"
    )


_SECOND_PREFIXES: dict[int, str] = {}
#: The last stamp made, by its millisecond (one tuple: rebinding it is atomic across threads).
_last_stamp: tuple[int, str] = (-1, "")


def utc_timestamp(epoch_s: float | None = None) -> str:
    """RFC 3339 UTC timestamp with milliseconds (``2024-01-15T10:30:00.000Z``).

    The date-and-seconds part is cached per second: formatting it is the one
    expensive step, and a busy node stamps thousands of frames a second. The
    whole stamp of the last millisecond is kept too: a burst of replies shares it.
    """
    global _last_stamp
    if epoch_s is None:
        epoch_s = time.time()
    second = math.floor(epoch_s)
    micros = round((epoch_s - second) * 1_000_000)  # as datetime rounds
    if micros >= 1_000_000:
        second, micros = second + 1, 0
    millis = second * 1000 + micros // 1000
    last = _last_stamp
    if last[0] == millis:
        return last[1]
    prefix = _SECOND_PREFIXES.get(second)
    if prefix is None:
        if len(_SECOND_PREFIXES) > 4096:
            _SECOND_PREFIXES.clear()
        prefix = _SECOND_PREFIXES[second] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    stamp = f"{prefix}{micros // 1000:03d}Z"
    _last_stamp = (millis, stamp)
    return stamp


_ID_PREFIX = os.urandom(4).hex()
_id_counter = itertools.count(1)


def new_message_id() -> str:
    """A message id unique within this process (and very likely beyond it)."""
    return f"{_ID_PREFIX}-{next(_id_counter)}"


@dataclass(frozen=True)
class Message:
    """One frame's envelope. ``data`` is the type-specific content."""

    message_type: str
    message_id: str
    sender_id: str
    data: dict[str, Any] = field(default_factory=dict)
    target_id: str | None = None
    timestamp: str | None = None
    auth_token: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object for this message (optional fields left out when unset)."""
        out: dict[str, Any] = {
            "message_type": self.message_type,
            "message_id": self.message_id,
            "sender_id": self.sender_id,
            "data": self.data,
        }
        if self.target_id is not None:
            out["target_id"] = self.target_id
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        if self.auth_token is not None:
            out["auth_token"] = self.auth_token
        return out


def ack(
    original_message_id: str | None,
    result: Any = None,
    *,
    sender_id: str = "main-node",
    timestamp: str | None = None,
) -> Message:
    """The ``ack`` reply to a request."""
    return Message(
        message_type="ack",
        message_id=new_message_id(),
        sender_id=sender_id,
        data={
            "original_message_id": original_message_id,
            "result": {} if result is None else result,
        },
        timestamp=timestamp,
    )


def error_reply(
    original_message_id: str | None,
    code: str,
    error: str,
    *,
    path: str | None = None,
    sender_id: str = "main-node",
    timestamp: str | None = None,
) -> Message:
    """The ``error`` reply to a request."""
    data: dict[str, Any] = {
        "original_message_id": original_message_id,
        "code": code,
        "error": error,
    }
    if path is not None:
        data["path"] = path
    return Message(
        message_type="error",
        message_id=new_message_id(),
        sender_id=sender_id,
        data=data,
        timestamp=timestamp,
    )
