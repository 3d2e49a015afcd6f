"""What the asyncio and the blocking client share: errors, the task spec, which
requests may be sent again after a broken connection, backoff, local fallback.

Errors a client raises::

    retire_cluster.protocol.errors.ProtocolError   the main node answered `error`
     +-- NotFound, Conflict, Unauthorized, ...      one class per wire code (re-exported here)
    ClientError (ConnectionError)                   the main node could not be reached
     +-- ConnectionLost                             the connection broke with a request in flight
    TaskFailed                                      a task ended failed / timeout (ClusterExecutor)
    TimeoutError                                    no reply, or the task did not end, in time

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import random
import time
from typing import Any, Awaitable, Callable, Coroutine, Dict, Iterable, Iterator, List, Optional, TypeVar

from ..protocol.codec import encode
from ..protocol.errors import FrameTooLarge, error_from_code
from ..protocol.messages import TERMINAL_STATUSES, Message

T = TypeVar("T")

__all__ = [
    "IDEMPOTENT_TYPES",
    "LOCAL_TASK_TYPES",
    "SUBMIT_OPTIONS",
    "TERMINAL",
    "ClientError",
    "ConnectionLost",
    "DEFAULT_MAX_REQUEST_BYTES",
    "NotAFrame",
    "TaskFailed",
    "backoff_delays",
    "bad_frame_error",
    "check_fallback",
    "chunks",
    "encode_request",
    "id_list",
    "is_idempotent",
    "local_record",
    "many_specs",
    "STATUSES_PER_REQUEST",
    "known_records",
    "some_records",
    "MANY_PER_REQUEST",
    "not_ended_in_time",
    "on_cluster",
    "MAX_WAIT_S",
    "refused_at_first",
    "reply_result",
    "run_coroutine",
    "run_locally",
    "task_spec",
    "waited_submit",
    "within",
]


#: The main node's default max_frame_bytes. A bigger request would make it close the
#: connection, failing every other request on it, so the clients refuse it before sending.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


def encode_request(msg: Message, limit: int) -> bytes:
    """The frame of a request. Raises FrameTooLarge, with nothing sent, when it is over ``limit`` bytes."""
    frame = encode(msg)
    if len(frame) - 1 > limit:  # the newline does not count
        raise FrameTooLarge(
            f"The {msg.message_type} request is {len(frame) - 1} bytes, more than the main node's limit of "
            f"{limit}; nothing was sent. Send less (a smaller payload), or pass max_request_bytes= when the "
            "main node's max_frame_bytes is larger."
        )
    return frame


#: Task statuses that never change again.
TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)
#: Requests whose repetition changes nothing: sent again after a reconnect.
IDEMPOTENT_TYPES = frozenset({"task_status", "task_list", "list_devices", "cluster_status", "subscribe"})
#: ``task_submit.data.task`` fields besides task_type and payload.
SUBMIT_OPTIONS = frozenset(
    {"priority", "timeout", "requirements", "max_retries", "retry_on_timeout", "idempotency_key"}
)
#: Task types ``execute(..., fallback="local")`` can run in this process.
LOCAL_TASK_TYPES = ("echo", "python_eval", "sleep")
#: The longest ``wait`` of one task_submit (schemas/task_submit.json).
MAX_WAIT_S = 3600.0
#: The subscribe schema takes at most this many task ids per frame.
SUBSCRIBE_CHUNK = 10000


class ClientError(ConnectionError):
    """The main node could not be reached, or the connection broke."""


class ConnectionLost(ClientError):
    """The connection broke before the reply came; the request may or may not have taken effect."""


def refused_at_first(exc: Exception, tls: bool) -> ClientError:
    """The first connection closed before the main node answered: what to tell the user.

    A TLS main node closes a plain connection at once; without this the client
    retried until its timeout and then said "no reply within 30 s".
    """
    hint = "" if tls else ("; if the main node speaks TLS (it printed a certificate fingerprint), "
                           "pass --tls-fingerprint (tls_fingerprint= in Python).")
    return ClientError(f"{exc}{hint}")


class NotAFrame(ClientError):
    """The peer sent what the codec refused (not a main node, or a reply too large): retrying will not help."""


def bad_frame_error(error: Exception, host: str, port: int, max_frame_bytes: int) -> ClientError:
    """What a frame from the main node that the codec refused means, as an error not worth retrying.

    Retried, a reply too large for ``max_frame_bytes`` came back too large until the
    timeout, and the caller saw only "no reply within 30 s".
    """
    if isinstance(error, FrameTooLarge):
        return NotAFrame(f"a reply from the main node is larger than this client's max_frame_bytes "
                           f"({max_frame_bytes}); pass a larger max_frame_bytes=, or ask for less (a smaller limit=)")
    return NotAFrame(f"{host}:{port} sent something that is not a retire-cluster frame ({error}); is it the "
                       "main node's TCP port (8080 by default), not its dashboard's?")


class TaskFailed(Exception):
    """A task ended ``failed`` or ``timeout``. ``record`` is its whole task record."""

    def __init__(self, record: Dict[str, Any]) -> None:
        self.record = record
        self.task_id = str(record.get("task_id"))
        self.status = str(record.get("status"))
        result = record.get("result") or {}
        reason = record.get("error") or result.get("error") or "no details"
        super().__init__(f"task {self.task_id} {self.status}: {reason}")


def not_ended_in_time(ids: List[str], remaining: int, timeout_s: Optional[float]) -> TimeoutError:
    """The error of ``wait()`` / ``as_completed()`` when ``timeout_s`` ran out with ``remaining`` not ended."""
    if len(ids) == 1:
        return TimeoutError(f"task {ids[0]} did not end within {timeout_s:g} s")
    return TimeoutError(f"{remaining} of {len(ids)} tasks did not end within {timeout_s:g} s")


async def within(aw: Awaitable[T], timeout_s: Optional[float]) -> T:
    """``await aw`` for at most ``timeout_s`` seconds (None: no limit), else cancel it and raise asyncio.TimeoutError.

    Unlike ``asyncio.wait_for`` on Python 3.11, a cancel of the caller is
    never lost: ``wait_for`` returns what ``aw`` ended with when the cancel
    comes in the same step, and the caller goes on as if not cancelled (a
    ``wait()`` past its deadline, a queue item handed to a caller going away).
    """
    if timeout_s is None:
        return await aw
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=max(timeout_s, 0))
    except asyncio.CancelledError:
        _abandon(fut)
        raise
    if not done:
        _abandon(fut)
        raise asyncio.TimeoutError()
    return fut.result()


def _abandon(fut: "asyncio.Future[Any]") -> None:
    """A future nobody waits for any more: cancelled, and what it ended with retrieved (no "never retrieved")."""
    fut.cancel()
    fut.add_done_callback(_retrieve)


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()


def run_coroutine(coro: Coroutine[Any, Any, T], timeout_s: Optional[float],
                  late: Callable[[], TimeoutError]) -> T:
    """Run ``coro`` to its end from blocking code, within ``timeout_s`` (``late()`` is raised after).

    In a thread of its own when this thread already runs an event loop (a
    Jupyter notebook, async code calling the blocking client): asyncio.run()
    cannot run there.
    """
    async def bounded() -> T:
        try:
            return await within(coro, timeout_s)
        except asyncio.TimeoutError:
            raise late() from None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retire-cluster-local") as pool:
        return pool.submit(asyncio.run, bounded()).result()


def is_idempotent(message_type: str, data: Dict[str, Any]) -> bool:
    """Whether sending this request twice is harmless (so it is retried on a new connection).

    A ``task_submit`` is, when it carries an ``idempotency_key``: the main node
    answers a repeat with the first task's id.
    """
    if message_type in IDEMPOTENT_TYPES:
        return True
    if message_type != "task_submit":
        return False
    tasks = data["tasks"] if "tasks" in data else [data.get("task") or {}]
    return all(isinstance(task, dict) and task.get("idempotency_key") for task in tasks)


def id_list(task_ids: Iterable[str]) -> List[str]:
    """The distinct ids, in order. Raises TypeError for one id given as a string (it is iterable too)."""
    if isinstance(task_ids, (str, bytes)):
        raise TypeError(f"task_ids is a list of task ids, not one id: pass [{task_ids!r}] (or call wait(task_id))")
    return list(dict.fromkeys(task_ids))


def task_spec(task_type: str, payload: Optional[Dict[str, Any]], options: Dict[str, Any]) -> Dict[str, Any]:
    """``task_submit.data.task`` from ``submit()`` arguments; options set to None are left out.

    Raises:
        TypeError: an option the protocol does not know (a typo would otherwise be refused
            by the main node with a less direct message).
    """
    unknown = sorted(set(options) - SUBMIT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown submit option {unknown[0]!r}; use {', '.join(sorted(SUBMIT_OPTIONS))}")
    task: Dict[str, Any] = {"task_type": task_type, "payload": payload or {}}
    task.update({k: v for k, v in options.items() if v is not None})
    where = _non_finite_at(task)
    if where is not None:
        *keys, number = where
        path = "task" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)
        raise ValueError(f"{path} is {number!r}, which JSON cannot carry; send a finite number or a string")
    return task


def _non_finite_at(value: Any) -> Optional[List[Any]]:
    """Where a NaN or infinity is in ``value`` (keys and indexes, then the number), or None.

    JSON has no such numbers, and orjson would send them as null. Nothing is
    formatted unless one is found: this runs on every submission.
    """
    if type(value) is float:
        return None if math.isfinite(value) else [value]
    if isinstance(value, dict):
        items: Iterable[Any] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = _non_finite_at(item)
        if where is not None:
            return [key, *where]
    return None


def fresh_key(prefix: str) -> str:
    """A new idempotency key: ``prefix-``, then the time in microseconds (13 hex digits), then 44 random bits.

    Time first, so that keys made one after the other sort together: the main
    node's unique index of keys then grows at one end, a page or two per group
    commit, instead of a random page for each key.
    """
    return f"{prefix}-{time.time_ns() // 1000:013x}{os.urandom(6).hex()[:11]}"


def keyed_submit(task_type: str, payload: Optional[Dict[str, Any]], options: Dict[str, Any]) -> Dict[str, Any]:
    """``task_submit.data`` for ``submit()``: the task, with a key of its own unless one was given.

    Without a key a submission whose connection broke before the answer could not be
    sent again (it might have been stored: "check whether it took effect"); with one,
    the client sends it again on a new connection and the main node answers with the
    task it already has (README: "What the cluster promises").
    """
    spec = task_spec(task_type, payload, options)
    spec.setdefault("idempotency_key", fresh_key("sub"))
    return {"task": spec}


#: Tasks per ``task_submit`` request of ``submit_many()`` (the protocol allows 1,000 per request; a request
#: that would be larger than the main node's frame limit is split in two, and so on).
MANY_PER_REQUEST = 500


#: Task records per ``task_status`` request of ``statuses()`` and ``as_completed()`` (the protocol's most).
STATUSES_PER_REQUEST = 100


def some_records(result: Dict[str, Any]) -> List[Optional[Dict[str, Any]]]:
    """The records of a ``task_status`` reply with ``task_ids``: at least one (the main node sends as many as
    fit in a frame; the caller asks again for the rest).

    Raises:
        ClientError: a reply with none, which would make the caller ask again for ever.
    """
    records = result.get("tasks")
    if not isinstance(records, list) or not records:
        raise ClientError("the main node answered task_status without any record; is it older than this client?")
    return records


def known_records(task_ids: List[str], result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The records of a ``task_status`` reply for ``task_ids``.

    Raises:
        NotFound: a task the main node does not know (as ``status()`` raises for it).
    """
    records = []
    for task_id, record in zip(task_ids, some_records(result)):  # the reply may hold fewer: those first
        if record is None:
            raise error_from_code("not_found", f"No task {task_id!r}; `retire-cluster tasks` lists them.")
        records.append(dict(record))
    return records


def many_specs(tasks: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``task_submit.data.tasks`` entries for ``submit_many()``: each checked as ``submit()`` checks its task,
    and given a key of its own unless it has one (so a request is sent again safely on a new connection).

    Raises:
        TypeError, ValueError: what is wrong with which task (``tasks[N]: ...``).
    """
    specs: List[Dict[str, Any]] = []
    for n, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("task_type"), str):
            raise TypeError(f"tasks[{n}] is not a task: give dicts such as "
                            '{"task_type": "echo", "payload": {"message": "hi"}} (options as for submit())')
        options = {k: v for k, v in task.items() if k not in ("task_type", "payload")}
        try:
            spec = task_spec(task["task_type"], task.get("payload"), options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"tasks[{n}]: {exc}") from None
        spec.setdefault("idempotency_key", fresh_key("sub"))
        specs.append(spec)
    return specs


def waited_submit(task_type: str, payload: Optional[Dict[str, Any]], options: Dict[str, Any],
                  wait_s: float) -> Dict[str, Any]:
    """``task_submit.data`` for ``run()``: the task and how long the main node may wait before replying.

    Raises:
        ValueError: ``wait_s`` is not more than 0 and at most :data:`MAX_WAIT_S`.
    """
    if not 0 < wait_s <= MAX_WAIT_S:
        raise ValueError(f"wait_s must be more than 0 and at most {MAX_WAIT_S:g} s; "
                         "for longer, call wait(task_id) with the record's task_id")
    spec = task_spec(task_type, payload, options)
    # A key of its own unless one was given: a connection lost before the one reply (a main node
    # restart, a Wi-Fi drop) is then retried on a new connection and finds the same task.
    spec.setdefault("idempotency_key", fresh_key("run"))
    return {"task": spec, "wait": wait_s}


def reply_result(reply: Message) -> Dict[str, Any]:
    """The ``ack`` result of a reply, or raise the typed error of an ``error`` reply."""
    if reply.message_type == "error":
        data = reply.data
        path = data.get("path")
        raise error_from_code(str(data.get("code")), str(data.get("error")),
                              path=path if isinstance(path, str) else None)
    result = reply.data.get("result")
    return result if isinstance(result, dict) else {}


#: At most one "the main node is busy" note per client in this many seconds (a batch has many requests).
BUSY_NOTE_EVERY_S = 10.0


class BusyNote:
    """Says that the main node refused a request as overloaded and that it is being sent again.

    A warning on the ``retire_cluster.client`` logger, at most every
    :data:`BUSY_NOTE_EVERY_S` per client: without it a CLI user waited up to
    its whole timeout in silence (Python prints such a warning on stderr when
    the application set up no logging).
    """

    def __init__(self) -> None:
        self._said_at = -math.inf

    def say(self, message_type: str, reason: str, remaining_s: float, now: float) -> None:
        if now - self._said_at >= BUSY_NOTE_EVERY_S:
            self._said_at = now
            logging.getLogger("retire_cluster.client").warning(
                "the main node is busy; sending %s again for up to %.0f s (%s)", message_type, remaining_s, reason)


def backoff_delays(initial_s: float, maximum_s: float) -> Iterator[float]:
    """Exponential delays from ``initial_s`` to ``maximum_s``, each jittered to 50-100 %."""
    delay = initial_s
    while True:
        yield delay * (0.5 + random.random() / 2)
        delay = min(delay * 2, maximum_s)


def chunks(items: List[str], size: int = SUBSCRIBE_CHUNK) -> Iterable[List[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- local fallback -------------------------------------------------------------


def check_fallback(fallback: Optional[str], task_type: str) -> None:
    """Raise ValueError unless ``fallback`` is None, or "local" for a type this process can run."""
    if fallback is None:
        return
    if fallback != "local":
        raise ValueError(f"fallback must be None or 'local', not {fallback!r}")
    if task_type not in LOCAL_TASK_TYPES:
        raise ValueError(f"fallback='local' runs only {', '.join(LOCAL_TASK_TYPES)}, not {task_type!r}")


async def run_locally(task_type: str, payload: Optional[Dict[str, Any]], timeout_s: Optional[float],
                      task_id: Optional[str] = None) -> Dict[str, Any]:
    """Run a task in this process with the worker's executor; return a task record.

    ``python_eval`` runs in a child Python process with the task timeout, exactly
    as on a worker (never a bare ``eval`` here).
    """
    from ..worker.executor import Executor

    executor = Executor(frozenset(LOCAL_TASK_TYPES), plugins={})  # built-ins only, no plug-in code
    task = {"task_id": task_id or "local", "task_type": task_type, "payload": payload or {},
            "timeout": timeout_s or 3600.0}
    outcome = await executor.run(task, lambda _pct, _msg: None)
    return local_record(task_id, task_type, payload, outcome.status, outcome.result(), outcome.error,
                        outcome.execution_time_s)


def local_record(task_id: Optional[str], task_type: str, payload: Optional[Dict[str, Any]], status: str,
                 result: Dict[str, Any], error: Optional[str], execution_time_s: float) -> Dict[str, Any]:
    """A task record for a run in this process. ``task_id`` is the cluster task it replaced."""
    return {
        "task_id": task_id, "task_type": task_type, "payload": payload or {}, "status": status,
        "result": result, "error": error, "execution_time": execution_time_s,
        "assigned_device": None, "attempts": [], "ran_on": "local",
    }  # fmt: skip


def on_cluster(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record with ``ran_on`` = ``cluster:<device_id>``."""
    out = dict(record)
    device = record.get("assigned_device")
    if device is None and record.get("attempts"):
        device = record["attempts"][-1].get("device_id")
    out["ran_on"] = f"cluster:{device}" if device else "cluster"
    return out
