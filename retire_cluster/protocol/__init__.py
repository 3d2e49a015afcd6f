"""The wire protocol without sockets: framing, envelope, error codes.

Standard library only (orjson is used when importable); the worker and the
stdlib examples import this package. Schema validation lives in
:mod:`retire_cluster.protocol.validation`, which needs jsonschema.
"""

from __future__ import annotations

from .codec import BadFrame, Event, MessageStream, decode_message, dumps, encode, loads
from .errors import (
    ERROR_CODES,
    Conflict,
    Forbidden,
    FrameTooLarge,
    InternalError,
    InvalidJSON,
    InvalidMessage,
    LocalProtocolError,
    NotFound,
    NotRegistered,
    Overloaded,
    ProtocolError,
    RemoteProtocolError,
    Unauthorized,
    UnknownMessageType,
    error_from_code,
)
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder
from .messages import (
    ACTIVE_STATUSES,
    DEFAULT_TASK_TIMEOUT_S,
    PRIORITY_NAMES,
    REQUIREMENT_KEYS,
    TERMINAL_STATUSES,
    DeviceStatus,
    Message,
    MessageType,
    TaskStatus,
    ack,
    error_reply,
    new_message_id,
    parse_priority,
    utc_timestamp,
)

__all__ = [
    "ACTIVE_STATUSES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_TASK_TIMEOUT_S",
    "ERROR_CODES",
    "PRIORITY_NAMES",
    "REQUIREMENT_KEYS",
    "TERMINAL_STATUSES",
    "BadFrame",
    "Conflict",
    "DeviceStatus",
    "Event",
    "Forbidden",
    "FrameDecoder",
    "FrameTooLarge",
    "InternalError",
    "InvalidJSON",
    "InvalidMessage",
    "LocalProtocolError",
    "Message",
    "MessageStream",
    "MessageType",
    "NotFound",
    "NotRegistered",
    "Overloaded",
    "ProtocolError",
    "RemoteProtocolError",
    "TaskStatus",
    "Unauthorized",
    "UnknownMessageType",
    "ack",
    "decode_message",
    "dumps",
    "encode",
    "error_from_code",
    "error_reply",
    "loads",
    "new_message_id",
    "parse_priority",
    "utc_timestamp",
]
