"""Settings of the main node, in one dataclass.

The CLI builds a :class:`MainConfig` from, in increasing precedence: the
defaults below, a JSON file (``--config``), ``RETIRE_CLUSTER_*`` environment
variables and command-line flags; tests build one directly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from ..protocol.errors import did_you_mean
from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES

__all__ = ["DEFAULT_PORT", "ConfigError", "MainConfig"]

DEFAULT_PORT = 8080
STRATEGY_NAMES = ("least_loaded", "round_robin", "weighted_round_robin", "least_connections", "response_time")


#: The setting's name as users write it (flag or config key), where it is not the field's.
_KEY_NAMES = {"heartbeat_interval_s": "heartbeat_interval", "offline_timeout_s": "offline_timeout"}
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("a whole number", lambda v: type(v) is int),
    "float": ("a number", lambda v: type(v) in (int, float) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "Path": ("a path", lambda v: isinstance(v, (str, os.PathLike))),
}


def _check_types(config: Any) -> None:
    for f in fields(config):
        _check_type(f.name, f.type, getattr(config, f.name))


def _check_type(name: str, annotation: Any, value: Any) -> None:
    """Refuse a setting of the wrong JSON type (a config file is not checked by click).

    ``"insecure": "false"`` used to be true (a non-empty string) and turned token auth off;
    ``"port": 18482.7`` ended in a traceback.
    """
    kind = str(annotation)
    optional = kind.endswith(" | None")
    entry = _KINDS.get(kind[: -len(" | None")] if optional else kind)
    if entry is None or (optional and value is None):
        return
    what, ok = entry
    if not ok(value):
        shown = _KEY_NAMES.get(name, name)
        try:
            given = json.dumps(value)
        except (TypeError, ValueError):
            given = repr(value)
        raise ConfigError(f"{shown} must be {what}{' or null' if optional else ''}, not {given}.")


class ConfigError(ValueError):
    """A setting is invalid; the message says which and what to do."""


@dataclass(frozen=True)
class MainConfig:
    """Everything the main node can be told.

    Attributes:
        host: address to listen on; ``0.0.0.0`` for every interface.
        port: TCP port; 0 picks a free one (tests).
        data_dir: holds the database and the token.
        heartbeat_interval_s: what workers are told to use.
        offline_timeout_s: a device silent for this long is offline and loses
            its tasks to the queue.
        insecure: no token auth (listens on 127.0.0.1 unless host is set).
        max_frame_bytes: the largest accepted frame.
        monitor_interval_s: how often the monitor looks for late devices and
            expired tasks.
        synchronous: SQLite ``synchronous`` pragma, ``full`` or ``normal``.
        default_max_retries: used when a submission gives none.
        strategy: how a device is chosen among those that match a task:
            least_loaded, round_robin, weighted_round_robin,
            least_connections or response_time.
        lease_grace_s: how long past a task's timeout the main node waits for
            the worker's own timeout result before it expires the lease.
        breaker_failures: consecutive failed tasks that open a device's
            circuit breaker (it gets no work while open).
        breaker_reset_s: how long the breaker stays open before one trial
            task is allowed (half-open).
        log_level, log_file: logging.
        max_preauth_frame_bytes: the largest frame accepted before the
            connection authenticated (a stranger cannot make us buffer 1 MiB);
            never more than max_frame_bytes.
        max_json_depth: the deepest nesting of JSON arrays and objects in a
            frame (the frame itself is level 1); checked before parsing.
        max_connections: open connections in total; one more gets
            ``overloaded`` and is closed.
        max_connections_per_address: open connections from one source
            address; one more gets ``overloaded`` and is closed.
        auth_timeout_s: a connection that has not authenticated within this
            long is closed (also the TLS handshake timeout).
        max_send_queue_bytes: how much more may be queued to a peer that
            stopped reading (its kernel buffer is full) before it is dropped.
        drain_timeout_s: a peer that stopped reading is dropped when its send
            buffer has not shrunk for this long.
        client_rate_per_s, client_burst: the request rate limit of a
            connection that has not registered as a worker (token bucket:
            ``client_burst`` at once, refilled at ``client_rate_per_s``); a
            frame over it is answered ``overloaded``. Registered workers are
            exempt.
        tls_cert, tls_key: PEM certificate and private key; when both are set
            the main node speaks TLS only (workers and clients pin the
            certificate's SHA-256 fingerprint).
        http_host: where the HTTP API and dashboard listen; None means ``host``.
        http_port: their TCP port (5000); 0 picks a free one (tests).
        http_enabled: serve HTTP at all (``--no-http`` turns it off).
        device_weights: device id -> weight for the weighted round robin
            strategy; overrides the worker's own ``--weight``.
        forget_offline_after_s: an offline device last heard from this long ago is forgotten:
            no longer listed, its row and statistics deleted (it registers
            afresh if it comes back). 0 keeps offline devices for good.
        forget_finished_after_s: a task that ended (completed, failed,
            cancelled, timed out) this long ago is deleted from the store,
            with its attempts and result, a batch at a time in the
            background, so that the database of a node that runs for years
            stays bounded. 0 (the default) keeps every task for good.
        max_unfinished_tasks, max_unfinished_bytes: how many tasks may be
            held unfinished (pending, assigned or running), and how many
            bytes of payload (as JSON text) they may carry; a submission
            beyond either is answered ``overloaded`` (clients retry it with
            backoff). Tasks recovered at start are never refused.
    """

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: Path("retire-cluster-data"))
    heartbeat_interval_s: float = 60.0
    offline_timeout_s: float = 300.0
    insecure: bool = False
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    monitor_interval_s: float = 1.0
    synchronous: str = "full"
    default_max_retries: int = 3
    strategy: str = "least_loaded"
    lease_grace_s: float = 5.0
    breaker_failures: int = 5
    breaker_reset_s: float = 60.0
    log_level: str = "info"
    log_file: Path | None = None
    max_preauth_frame_bytes: int = 16 * 1024
    max_json_depth: int = 32
    max_connections: int = 10_000
    max_connections_per_address: int = 64
    auth_timeout_s: float = 10.0
    max_send_queue_bytes: int = 8 * 1024 * 1024
    drain_timeout_s: float = 30.0
    client_rate_per_s: float = 5000.0
    client_burst: int = 10_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    http_host: str | None = None
    http_port: int = 5000
    http_enabled: bool = True
    device_weights: dict[str, float] = field(default_factory=dict)
    forget_offline_after_s: float = 7 * 86400.0
    forget_finished_after_s: float = 0.0
    max_unfinished_tasks: int = 200_000
    max_unfinished_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_types(self)
        if not isinstance(self.device_weights, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1000
            for w in self.device_weights.values()
        ):
            raise ConfigError("device_weights must map device ids to weights above 0 and at most 1000.")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("log_file", "tls_cert", "tls_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"port {self.port} is out of range; use 0-65535.")
        if not 0 <= int(self.http_port) <= 65535:
            raise ConfigError(f"http_port {self.http_port} is out of range; use 0-65535.")
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval must be greater than 0 seconds.")
        if self.offline_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "offline_timeout must be longer than heartbeat_interval, "
                "or every device would flap offline between heartbeats."
            )
        if self.max_frame_bytes < 1024:
            raise ConfigError("max_frame_bytes must be at least 1024.")
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}.")
        if self.breaker_failures < 1 or self.breaker_reset_s <= 0:
            raise ConfigError("breaker_failures must be at least 1 and breaker_reset_s more than 0.")
        if self.synchronous not in ("full", "normal"):
            raise ConfigError("synchronous must be 'full' or 'normal'.")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError("log_level must be debug, info, warning, error or critical.")
        self._check_limits()

    def _check_limits(self) -> None:
        """The hostile-input limits (see SECURITY.md)."""
        if self.max_preauth_frame_bytes < 256:
            raise ConfigError("max_preauth_frame_bytes must be at least 256.")
        if not 2 <= self.max_json_depth <= 128:
            raise ConfigError("max_json_depth must be from 2 to 128.")
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise ConfigError("max_connections and max_connections_per_address must be at least 1.")
        if self.auth_timeout_s <= 0 or self.drain_timeout_s <= 0:
            raise ConfigError("auth_timeout_s and drain_timeout_s must be more than 0 seconds.")
        if self.max_send_queue_bytes < 64 * 1024:
            raise ConfigError("max_send_queue_bytes must be at least 65536.")
        if self.forget_offline_after_s < 0:
            raise ConfigError("forget_offline_after_s must be 0 (never) or more seconds.")
        if self.forget_finished_after_s < 0:
            raise ConfigError("forget_finished_after_s must be 0 (never) or more seconds (86400 is a day).")
        if self.max_unfinished_tasks < 1 or self.max_unfinished_bytes < 1024 * 1024:
            raise ConfigError("max_unfinished_tasks must be at least 1 and max_unfinished_bytes at least 1048576.")
        if self.client_rate_per_s <= 0 or self.client_burst < 1:
            raise ConfigError("client_rate_per_s must be more than 0 and client_burst at least 1.")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both tls_cert and tls_key (or neither).")

    @property
    def http_bind_host(self) -> str:
        """Where HTTP listens: ``http_host``, else the TCP ``host``."""
        return self.http_host if self.http_host is not None else self.host

    @property
    def db_path(self) -> Path:
        return self.data_dir / "cluster.db"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Read settings from a JSON object file; returns the overrides found.

        Keys are the attribute names; the CLI spellings (``heartbeat_interval``,
        ``offline_timeout``, ``no_http``) are accepted too.
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}.") from None
        except ValueError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object.")
        return normalise_keys(raw, source=str(path))

    def with_overrides(self, overrides: dict[str, Any]) -> MainConfig:
        return replace(self, **overrides)


_ALIASES = {
    "heartbeat_interval": "heartbeat_interval_s",
    "offline_timeout": "offline_timeout_s",
    "monitor_interval": "monitor_interval_s",
}


#: Flags that turn a setting off, as file keys: ``"no_http": true`` is ``"http_enabled": false``
#: (file keys are the flag names with underscores, like ``insecure`` for ``--insecure``).
_NEGATIONS = {"no_http": "http_enabled"}


def normalise_keys(raw: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Map CLI-style keys to attribute names and refuse unknown ones."""
    names = set(MainConfig.field_names())
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        plain = key.replace("-", "_")
        if plain in _NEGATIONS:
            _check_type(plain, "bool", value)  # not "false": that would be true, negated
            name, value = _NEGATIONS[plain], not value
        else:
            name = _ALIASES.get(plain, plain)
        if name not in names:
            hint = did_you_mean(name, [*names, *_ALIASES])
            raise ConfigError(f"unknown setting {key!r} in {source}; {hint}known: {', '.join(sorted(names))}.")
        if name in out and out[name] != value:
            raise ConfigError(f"{given_as[name]!r} and {key!r} in {source} disagree; give only one of them.")
        out[name] = value
        given_as[name] = key
    return out
