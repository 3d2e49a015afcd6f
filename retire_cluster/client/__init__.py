"""Python clients of the main node.

- :class:`AsyncClient` (asyncio) and :class:`Client` (blocking) with the same
  API: submit, status, cancel, tasks, devices, cluster_status, subscribe, wait,
  as_completed, execute (with a local fallback).
- :class:`ClusterExecutor`, a ``concurrent.futures.Executor`` whose futures
  resolve from pushed task updates.

Errors are the wire error classes of :mod:`retire_cluster.protocol.errors`,
re-exported here (``except NotFound:``), plus :class:`ClientError` for an
unreachable main node and :class:`TaskFailed` for a task that failed.
Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

from ..protocol.errors import (
    Conflict,
    Forbidden,
    FrameTooLarge,
    InternalError,
    InvalidJSON,
    InvalidMessage,
    NotFound,
    NotRegistered,
    Overloaded,
    ProtocolError,
    Unauthorized,
    UnknownMessageType,
)
from .aio import AsyncClient, UpdateStream
from .common import ClientError, ConnectionLost, TaskFailed
from .executor import ClusterExecutor, ClusterFuture
from .sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ClusterExecutor",
    "ClusterFuture",
    "Conflict",
    "ConnectionLost",
    "Forbidden",
    "FrameTooLarge",
    "InternalError",
    "InvalidJSON",
    "InvalidMessage",
    "NotFound",
    "NotRegistered",
    "Overloaded",
    "ProtocolError",
    "TaskFailed",
    "Unauthorized",
    "UnknownMessageType",
    "UpdateStream",
]
