"""The worker: agent (connection, heartbeat, reconnect), profiler, executor.

Standard library and click only; uvloop, orjson and psutil are used when
importable (psutil only where /proc does not answer: see profiler). Python 3.9
syntax.
"""

from __future__ import annotations

from .agent import Agent, FatalError
from .config import WorkerConfig, load_or_create_device_id, parse_main_address
from .executor import Executor, Outcome
from .profiler import Profiler
from .trampoline import Limits

__all__ = [
    "Agent",
    "Executor",
    "FatalError",
    "Limits",
    "Outcome",
    "Profiler",
    "WorkerConfig",
    "load_or_create_device_id",
    "parse_main_address",
]
