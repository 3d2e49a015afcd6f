"""Settings of a worker, and its stable device id.

Python 3.9 syntax and the standard library only: this runs on old phones.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import FrozenSet, Optional, Tuple

from ..address import DEFAULT_MAIN_PORT, parse_main_address
from ..tls import normalise_fingerprint
from .policy import PolicyConfig
from .profiler import usable_cpus
from .trampoline import Limits

__all__ = [
    "BUILTIN_TYPES",
    "DEFAULT_MAIN_PORT",
    "OPT_IN_TYPES",
    "WorkerConfig",
    "default_data_dir",
    "load_or_create_device_id",
    "parse_main_address",
]

#: Always available.
BUILTIN_TYPES = frozenset({"echo", "sleep"})
#: Run code on the device: only where its owner allowed them with --allow.
OPT_IN_TYPES = frozenset({"python_eval", "command"})


def default_data_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".retire-cluster" / "worker"


def load_or_create_device_id(data_dir: Path) -> str:
    """The id saved in ``data_dir/device_id``; created from the hostname on first run.

    A short random suffix keeps two phones both called ``localhost`` apart.
    """
    path = data_dir / "device_id"
    try:
        saved = path.read_text(encoding="utf-8").strip()
    except OSError:
        saved = ""
    if saved:
        return saved
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-.") or "device"
    device_id = f"{host[:48]}-{os.urandom(3).hex()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(device_id + "\n", encoding="utf-8")
    return device_id


@functools.lru_cache(maxsize=1)
def _cpu_count() -> int:
    """The CPUs this worker may use (profiler.usable_cpus), read once: the slot count is checked at every
    assignment, and reading it opens a /sys file or makes a system call each time."""
    return usable_cpus()


@dataclass
class WorkerConfig:
    """Everything a worker can be told.

    Attributes:
        main_host, main_port: where the main node listens.
        token: the cluster token (None when the main node runs --insecure).
        device_id: None means the saved, hostname-based id.
        role: advertised in device_info (requirements can match it).
        allow: opt-in task types the owner enabled (python_eval, command).
        max_tasks: concurrent task slots; None means the CPUs it may use.
        data_dir: the device id and anything the worker keeps.
        heartbeat_interval_s: None means what the main node says at register.
        capabilities: extra capability strings to advertise.
        python_eval_timeout_s: cap on python_eval, whatever the task asks.
        output_limit_bytes: the most output text kept per task.
        reconnect_min_s, reconnect_max_s: reconnect backoff bounds.
        burst: exit once idle after running at least one task (tests, demos).
        policy: the owner's rules (charging, battery, temperature, CPU, hours).
        policy_interval_s: how often the rules are checked.
        weight: this device's share under the weighted round robin strategy.
        limits: resource limits of python_eval and command processes.
        scratch_dir: base of the per-task scratch directories (None:
            <tmp>/retire-cluster-<uid>).
        tls_fingerprint: SHA-256 fingerprint of the main node's TLS
            certificate; set, the worker speaks TLS and refuses any other
            certificate before sending anything (see retire_cluster/tls.py).
    """

    main_host: str = "127.0.0.1"
    main_port: int = DEFAULT_MAIN_PORT
    token: Optional[str] = None
    device_id: Optional[str] = None
    role: str = "worker"
    allow: FrozenSet[str] = frozenset()
    max_tasks: Optional[int] = None
    data_dir: Path = field(default_factory=default_data_dir)
    heartbeat_interval_s: Optional[float] = None
    capabilities: Tuple[str, ...] = ()
    python_eval_timeout_s: float = 3600.0
    output_limit_bytes: int = 1024 * 1024
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    burst: bool = False
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    policy_interval_s: float = 5.0
    weight: float = 1.0
    limits: Limits = field(default_factory=Limits)
    scratch_dir: Optional[Path] = None
    tls_fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.tls_fingerprint is not None:
            self.tls_fingerprint = normalise_fingerprint(self.tls_fingerprint)
        if isinstance(self.allow, str):  # a set of its letters would be refused in confusing words
            raise ValueError(f"allow must be a set of task types, like {{'python_eval'}}, not {self.allow!r}.")
        unknown = set(self.allow) - OPT_IN_TYPES
        if unknown:
            raise ValueError(
                f"--allow {', '.join(sorted(unknown))}: only {', '.join(sorted(OPT_IN_TYPES))} "
                "need allowing; other types are always on."
            )
        if self.device_id is not None and not self.device_id.strip():  # was taken as "not given"
            raise ValueError("--device-id is empty; give a name, or leave it out for the saved hostname-based id.")
        if self.max_tasks is not None and type(self.max_tasks) is not int:  # 3.5 is not 3 slots
            raise ValueError(f"max_tasks must be a whole number, not {self.max_tasks!r}.")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError("--max-tasks must be at least 1.")

    @property
    def task_types(self) -> FrozenSet[str]:
        return BUILTIN_TYPES | frozenset(self.allow)

    @property
    def slots(self) -> int:
        return self.max_tasks or _cpu_count()
