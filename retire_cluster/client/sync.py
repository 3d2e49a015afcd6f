"""A blocking client over one TCP connection (standard library sockets).

    with Client("nas.local:8080", token=...) as c:
        task_id = c.submit("python_eval", {"expression": "sum(range(100000))"})
        print(c.wait(task_id)["result"]["output"])

The same API as :class:`~retire_cluster.client.aio.AsyncClient`, without
asyncio: one request at a time, pushed ``task_update`` records read while
waiting are kept for :meth:`Client.wait`, :meth:`Client.as_completed` and
:meth:`Client.next_update`.

When the connection breaks, requests that are safe to repeat (reads,
``subscribe``, a submit with an ``idempotency_key``) are sent again on a new
connection opened with backoff; the new connection is subscribed again and the
status of the tasks being waited for is read again, since updates pushed while
away are lost. Other requests raise :class:`ConnectionLost`.

Every wire ``error`` is raised as its typed exception from
:mod:`retire_cluster.protocol.errors` (``NotFound``, ``Conflict``, ...).
Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import collections
import functools
import socket
import ssl as _ssl
import threading
import time
from typing import Any, Callable, Deque, Dict, Generator, Iterable, List, Optional, Set, TypeVar, cast

from ..address import parse_main_address
from ..protocol.codec import BadFrame, MessageStream
from ..protocol.errors import Conflict, FrameTooLarge, Overloaded
from ..protocol.messages import Message, new_message_id
from ..tls import check_fingerprint, client_context, normalise_fingerprint
from .common import (
    DEFAULT_MAX_REQUEST_BYTES,
    MANY_PER_REQUEST,
    MAX_WAIT_S,
    STATUSES_PER_REQUEST,
    TERMINAL,
    BusyNote,
    ClientError,
    ConnectionLost,
    NotAFrame,
    backoff_delays,
    bad_frame_error,
    check_fallback,
    chunks,
    encode_request,
    id_list,
    is_idempotent,
    keyed_submit,
    known_records,
    many_specs,
    not_ended_in_time,
    on_cluster,
    refused_at_first,
    reply_result,
    run_coroutine,
    run_locally,
    some_records,
    waited_submit,
)

__all__ = ["Client", "ClientError", "ConnectionLost"]

#: The receive buffer (a frame larger than this arrives in several reads).
_RECV_CHUNK = 64 * 1024
#: How far a socket timeout may be from the one a request asks for before it is set again.
TIMEOUT_SLACK_S = 0.01

_MAX_KEPT_UPDATES = 100_000

#: What a call on a closed Client raises (a ClientError, as AsyncClient raises).
_CLOSED = "this Client is closed; make a new one"
#: What a call raises while another thread's call on the same Client is in progress (a RuntimeError).
_IN_USE = ("this Client is in the middle of a call from another thread; a Client serves one thread at a "
           "time: make one Client per thread, or share an AsyncClient or a ClusterExecutor")

F = TypeVar("F", bound=Callable[..., Any])


def _one_call(method: F) -> F:
    """A public method that refuses a closed client, and a call while another thread's is in progress.

    Before, a closed client silently opened a new connection, and two threads
    calling at once interleaved their frames and took each other's replies.
    The claim is a non-blocking acquire of a reentrant lock (0.1 µs; 0.4-0.5 µs
    a call with this wrapper, against 100 µs or more for a round trip): a method
    may call another on the same thread, and threads taking turns (one call
    after another, not overlapping) stay allowed.
    """

    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        if not self._calling.acquire(False):
            raise RuntimeError(_IN_USE)
        try:
            if self._closed:
                raise ClientError(_CLOSED)
            return method(self, *args, **kwargs)
        finally:
            self._calling.release()

    return cast(F, call)


class Client:
    """Blocking client of the main node, for one thread at a time.

    A call while another thread's call on the same client is in progress raises
    RuntimeError (it would mix the two threads' frames and replies): make one
    Client per thread, or share an :class:`AsyncClient` or a ``ClusterExecutor``.
    Threads taking turns (one call after another) are fine.

    Once closed (:meth:`close`, or the end of its ``with`` block) it stays closed:
    every call raises :class:`ClientError`, as :class:`AsyncClient` does.

    Args:
        main: ``HOST[:PORT]`` of the main node.
        token: the cluster token (None against an ``--insecure`` main node).
        timeout_s: how long to wait for one reply (and to reconnect for it).
        client_id: ``sender_id`` of the requests.
        reconnect: open a new connection after the connection broke.
        reconnect_timeout_s: how long waiting calls keep trying to reconnect.
        backoff_initial_s, backoff_max_s: the delays between connection attempts.
        ssl: an SSL context for a main node started with TLS (made for you with tls_fingerprint).
        tls_fingerprint: the SHA-256 fingerprint of the main node's certificate (as
            ``retire-cluster main`` prints it); checked before anything is sent.
        max_frame_bytes: the largest frame accepted from the main node.
        max_request_bytes: the largest request sent (the main node's max_frame_bytes);
            a larger one raises FrameTooLarge with nothing sent.
    """

    def __init__(self, main: str = "127.0.0.1:8080", token: Optional[str] = None, *,
                 timeout_s: float = 30.0, client_id: Optional[str] = None, reconnect: bool = True,
                 reconnect_timeout_s: float = 300.0, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 5.0, ssl: Optional[_ssl.SSLContext] = None,
                 tls_fingerprint: Optional[str] = None, max_frame_bytes: int = 64 * 1024 * 1024,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.host, self.port = parse_main_address(main)
        self.token = token
        self.timeout_s = timeout_s
        self.client_id = client_id or f"client-{socket.gethostname()}"
        self.reconnect = reconnect
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.tls_fingerprint = None if tls_fingerprint is None else normalise_fingerprint(tls_fingerprint)
        self.ssl = client_context() if ssl is None and tls_fingerprint is not None else ssl
        self.max_frame_bytes = max_frame_bytes
        self.max_request_bytes = max_request_bytes
        #: How many connections were opened so far (1 after the first connect).
        self.connections_opened = 0
        self._sock: Optional[socket.socket] = None
        self._sock_timeout: Optional[float] = None  # what settimeout() was last given
        self._stream = MessageStream(max_frame_bytes)
        # One receive buffer for the connection's life: recv(256 KiB) would map,
        # shrink and unmap a fresh 256 KiB block at every read.
        self._buffer = bytearray(_RECV_CHUNK)
        self._view = memoryview(self._buffer)
        self._inbox: Deque[Message] = collections.deque()
        self._updates: Deque[Dict[str, Any]] = collections.deque(maxlen=_MAX_KEPT_UPDATES)
        self._subscribed_all = False
        self._subscribed: Set[str] = set()
        self._watching: Dict[str, int] = {}
        self._closed = False
        self._busy = BusyNote()
        # Held by the thread whose call is in progress (reentrant: a method may call another).
        self._calling = threading.RLock()

    def __enter__(self) -> Client:
        """The connection opens with the first request."""
        if self._closed:
            raise ClientError(_CLOSED)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- connection ---------------------------------------------------------

    @_one_call
    def connect(self) -> None:
        """Open the connection now (requests open it too).

        Raises:
            ClientError: the main node cannot be reached, or this client is closed.
        """
        if self._sock is None:
            self._connect(time.monotonic() + self.timeout_s)

    def close(self) -> None:
        """Close the connection for good: any later call raises ClientError. Closing again does nothing.

        Raises:
            RuntimeError: another thread's call on this client is in progress.
        """
        if not self._calling.acquire(False):
            raise RuntimeError(_IN_USE)
        try:
            self._closed = True
            self._drop()
            self._updates.clear()
        finally:
            self._calling.release()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        self._inbox.clear()

    def _connect(self, deadline: float) -> None:
        """Open a connection; after the first one, keep trying with backoff until ``deadline``."""
        delays = backoff_delays(self.backoff_initial_s, self.backoff_max_s)
        while True:
            try:
                self._open(deadline)
                return
            except NotAFrame:  # the dashboard's port, say: another try gets the same answer
                self._drop()
                raise
            except ClientError:
                self._drop()
                remaining = deadline - time.monotonic()
                if not (self.reconnect and self.connections_opened) or remaining <= 0:
                    raise
                time.sleep(min(next(delays), remaining))

    def _open(self, deadline: float) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=max(deadline - time.monotonic(), 0.001))
        except OSError as exc:
            raise ClientError(
                f"cannot connect to the main node at {self.host}:{self.port} "
                f"({exc.strerror or exc}); is `retire-cluster main` running there?"
            ) from None
        if self.ssl is not None:
            try:
                sock = self.ssl.wrap_socket(sock, server_hostname=self.host)
                if self.tls_fingerprint is not None:
                    check_fingerprint(sock, self.tls_fingerprint)
            except OSError as exc:  # ssl.SSLError, FingerprintMismatch among them
                sock.close()
                raise ClientError(f"TLS with the main node at {self.host}:{self.port} failed: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._sock_timeout = sock.gettimeout()
        self._stream = MessageStream(self.max_frame_bytes)
        self._inbox.clear()
        self.connections_opened += 1
        if self.token is not None:
            # Authenticate with a tiny frame: before that the main node takes frames of
            # 16 KiB at most, and closes a connection that stays silent.
            try:
                reply_result(self._roundtrip("subscribe", {"task_ids": []}, deadline))
            except ConnectionLost as exc:
                if self.connections_opened == 1:  # never got in: not a connection to come back to
                    self.connections_opened = 0
                    raise refused_at_first(exc, self.ssl is not None) from None
                raise ClientError(str(exc)) from None
        if self.connections_opened > 1:
            self._restore(deadline)

    def _restore(self, deadline: float) -> None:
        """On a new connection: subscribe again, and re-read what is waited for."""
        try:
            if self._subscribed_all:
                reply_result(self._roundtrip("subscribe", {}, deadline))
            else:
                for chunk in chunks(sorted(self._subscribed | set(self._watching))):
                    reply_result(self._roundtrip("subscribe", {"task_ids": chunk}, deadline))
            for task_id in list(self._watching):
                reply = self._roundtrip("task_status", {"task_id": task_id}, deadline)
                if reply.message_type == "ack":
                    self._updates.append(dict(reply_result(reply)["task"]))
        except ConnectionLost as exc:
            raise ClientError(str(exc)) from None

    # -- plumbing ---------------------------------------------------------

    def _recv_message(self, deadline: Optional[float]) -> Message:
        """The next message. Raises ConnectionLost or TimeoutError."""
        while not self._inbox:
            if self._sock is None:
                raise ConnectionLost("not connected to the main node")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no reply from the main node in time")
            self._set_timeout(remaining)
            try:
                data = bytes(self._view[: self._sock.recv_into(self._buffer)])
            except socket.timeout:
                continue  # the deadline decides (the socket's timeout may be a little short of it)
            except OSError as exc:
                self._drop()
                raise ConnectionLost(f"connection to the main node broke ({exc})") from None
            for event in self._stream.feed(data):
                if isinstance(event, BadFrame):
                    self._drop()
                    raise bad_frame_error(event.error, self.host, self.port, self.max_frame_bytes)
                self._inbox.append(event)
            if not data and not self._inbox:
                self._drop()
                raise ConnectionLost("the main node closed the connection")
        return self._inbox.popleft()

    def _set_timeout(self, seconds: Optional[float]) -> None:
        """The socket's timeout, left as it is when within TIMEOUT_SLACK_S of ``seconds``.

        Each settimeout() is an ioctl() system call, and back-to-back requests
        ask for nearly the same timeout. A timeout left a little short of the
        deadline makes the caller look at the deadline and read again; one
        left a little beyond it overshoots by at most TIMEOUT_SLACK_S.
        """
        current = self._sock_timeout
        if seconds is None or current is None or abs(current - seconds) > TIMEOUT_SLACK_S:
            assert self._sock is not None
            self._sock.settimeout(seconds)
            self._sock_timeout = seconds

    def _route(self, msg: Message) -> None:
        """Keep a pushed task record if anyone here wants it; drop anything else."""
        if msg.message_type != "task_update":
            return
        record = msg.data.get("task")
        if not isinstance(record, dict):
            return
        task_id = str(record.get("task_id"))
        if self._subscribed_all or task_id in self._subscribed or task_id in self._watching:
            self._updates.append(record)
        if record.get("status") in TERMINAL:
            self._subscribed.discard(task_id)

    def _roundtrip(self, message_type: str, data: Dict[str, Any], deadline: float) -> Message:
        if self._sock is None:
            raise ConnectionLost("not connected to the main node")
        msg = Message(message_type, new_message_id(), self.client_id, data, auth_token=self.token)
        frame = encode_request(msg, self.max_request_bytes)
        try:
            self._set_timeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(frame)
        except socket.timeout:
            raise TimeoutError(f"could not send {message_type} to the main node in time") from None
        except OSError as exc:
            self._drop()
            raise ConnectionLost(f"connection to the main node broke ({exc})") from None
        while True:
            try:
                reply = self._recv_message(deadline)
            except TimeoutError:
                raise TimeoutError(
                    f"no reply to {message_type} from the main node within {self.timeout_s:g} s"
                ) from None
            if reply.message_type in ("ack", "error") and reply.data.get("original_message_id") == msg.message_id:
                return reply
            if reply.message_type == "error" and reply.data.get("original_message_id") is None:
                # A frame the main node could not read (too large for its limit, say): ours,
                # the only one in flight. It closes the connection after this answer.
                self._drop()
                return reply
            self._route(reply)

    @_one_call
    def request(self, message_type: str, data: Optional[Dict[str, Any]] = None, *,
                idempotent: Optional[bool] = None, extra_s: float = 0.0,
                until: Optional[float] = None) -> Dict[str, Any]:
        """Send one request and return its ``ack`` result.

        Args:
            idempotent: whether it may be sent again on a new connection when the
                first one broke before the reply (default: see :func:`is_idempotent`).
            extra_s: how much longer than ``timeout_s`` the reply may take (a
                ``task_submit`` with ``wait``).
            until: a ``time.monotonic()`` deadline of the caller's, when sooner.

        An ``overloaded`` reply (the main node refused the request before acting
        on it) is retried with backoff until ``timeout_s``.

        Raises:
            ProtocolError: the typed ``error`` reply (NotFound, Conflict, ...).
            ClientError: the main node cannot be reached, or this client is closed;
                ConnectionLost when it broke before a non-repeatable request was answered.
            TimeoutError: no reply within ``timeout_s``.
        """
        return self._request(message_type, data, idempotent=idempotent, extra_s=extra_s, until=until)

    def _request(self, message_type: str, data: Optional[Dict[str, Any]] = None, *,
                 idempotent: Optional[bool] = None, extra_s: float = 0.0,
                 until: Optional[float] = None) -> Dict[str, Any]:
        body = data or {}
        if idempotent is None:
            idempotent = is_idempotent(message_type, body)
        deadline = time.monotonic() + self.timeout_s + extra_s
        if until is not None:
            deadline = min(deadline, until)
        delays = backoff_delays(self.backoff_initial_s, self.backoff_max_s)
        while True:
            if self._sock is None:
                self._connect(deadline)
            try:
                return reply_result(self._roundtrip(message_type, body, deadline))
            except ConnectionLost as exc:
                self._drop()
                if not (idempotent and self.reconnect) or time.monotonic() >= deadline:
                    raise ConnectionLost(
                        f"{exc}; {message_type} was sent but not answered, check whether it took effect"
                    ) from None
            except Overloaded as exc:  # refused before it was acted on: any request may be sent again
                pause, now = next(delays), time.monotonic()
                if now + pause >= deadline:
                    raise  # no time for another try: its sentence says why, not a timeout
                self._busy.say(message_type, exc.message, deadline - now, now)
                time.sleep(pause)
                continue
            time.sleep(min(next(delays), max(deadline - time.monotonic(), 0)))

    def _pull_update(self, wanted: Optional[Set[str]], deadline: Optional[float]) -> Optional[Dict[str, Any]]:
        """The next kept record for one of ``wanted`` (any when None); None at the deadline."""
        while True:
            for i, record in enumerate(self._updates):
                if wanted is None or record.get("task_id") in wanted:
                    del self._updates[i]
                    return dict(record)
            try:
                if self._sock is None:
                    self._reconnect(deadline)  # may keep fresh records in _updates: look again
                    continue
                msg = self._recv_message(deadline)
            except TimeoutError:
                return None
            except ConnectionLost:
                self._drop()
                if not self.reconnect:
                    raise
                continue
            self._route(msg)

    def _reconnect(self, deadline: Optional[float]) -> None:
        until = time.monotonic() + self.reconnect_timeout_s
        if deadline is not None and deadline < until:
            try:
                self._connect(deadline)
            except ClientError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("could not reconnect to the main node in time") from None
                raise
            return
        try:
            self._connect(until)
        except ClientError as exc:
            raise ClientError(f"lost the connection to the main node and could not reconnect within "
                              f"{self.reconnect_timeout_s:g} s ({exc})") from None

    def _by(self, deadline: Optional[float], late: Callable[[], TimeoutError], message_type: str,
            data: Dict[str, Any]) -> Dict[str, Any]:
        """A request that must be answered by the caller's ``deadline``, else ``late()`` is raised.

        Before, a main node that was down made ``wait(id, timeout_s=2)`` wait out
        the client's own ``timeout_s`` (30 s) reconnecting, then raise ClientError.
        """
        try:
            return self._request(message_type, data, until=deadline)
        except (ClientError, TimeoutError):
            if deadline is not None and time.monotonic() >= deadline:
                raise late() from None
            raise

    def _watch(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            self._watching[task_id] = self._watching.get(task_id, 0) + 1

    def _unwatch(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            left = self._watching.get(task_id, 0) - 1
            if left > 0:
                self._watching[task_id] = left
            else:
                self._watching.pop(task_id, None)

    # -- API --------------------------------------------------------------

    @_one_call
    def submit(self, task_type: str, payload: Optional[Dict[str, Any]] = None, **options: Any) -> str:
        """Submit a task; return its id once the main node has it on disk.

        Options: ``priority`` (low, normal, high, urgent or 0-100), ``timeout`` (s),
        ``requirements`` (dict), ``max_retries``, ``retry_on_timeout``, ``idempotency_key``.
        Without an ``idempotency_key`` it gets one of its own, so a connection lost
        before the answer is retried on a new one and finds the same task.
        """
        return str(self._request("task_submit", keyed_submit(task_type, payload, options))["task_id"])

    @_one_call
    def submit_many(self, tasks: Iterable[Dict[str, Any]]) -> List[str]:
        """Submit many tasks, a few hundred per request; return their ids in order (see AsyncClient.submit_many)."""
        ids: List[str] = []
        specs = many_specs(tasks)
        for start in range(0, len(specs), MANY_PER_REQUEST):
            ids += self._submit_specs(specs[start : start + MANY_PER_REQUEST])
        return ids

    def _submit_specs(self, specs: List[Dict[str, Any]]) -> List[str]:
        try:
            result = self._request("task_submit", {"tasks": specs})
        except FrameTooLarge:  # refused here, before sending: in halves
            if len(specs) == 1:
                raise
            half = len(specs) // 2
            return self._submit_specs(specs[:half]) + self._submit_specs(specs[half:])
        return [str(task_id) for task_id in result["task_ids"]]

    @_one_call
    def run(self, task_type: str, payload: Optional[Dict[str, Any]] = None, *,
            wait_s: float = MAX_WAIT_S, **options: Any) -> Dict[str, Any]:
        """Submit a task and return its record once it has ended, in one request.

        As :meth:`AsyncClient.run <retire_cluster.client.aio.AsyncClient.run>`:
        a ``status`` that is not terminal means ``wait_s`` ran out. Without an
        ``idempotency_key`` the task gets one of its own (a lost connection is retried).
        """
        body = waited_submit(task_type, payload, options, wait_s)
        return dict((self._request("task_submit", body, extra_s=wait_s))["task"])

    @_one_call
    def status(self, task_id: str) -> Dict[str, Any]:
        """The whole task record (status, attempts, result, times)."""
        return dict(self._request("task_status", {"task_id": task_id})["task"])

    @_one_call
    def statuses(self, task_ids: Iterable[str]) -> List[Optional[Dict[str, Any]]]:
        """The records of many tasks, in order (None for a task the main node does not know); 100 per request."""
        ids = list(task_ids)
        records: List[Optional[Dict[str, Any]]] = []
        while len(records) < len(ids):  # a reply holds as many as fit in a frame: the rest is asked again
            start = len(records)
            result = self._request("task_status", {"task_ids": ids[start : start + STATUSES_PER_REQUEST]})
            records += [None if r is None else dict(r) for r in some_records(result)]
        return records

    @_one_call
    def cancel(self, task_id: str) -> Dict[str, Any]:
        """Cancel a pending or running task. Raises Conflict when it already ended."""
        return self._request("task_cancel", {"task_id": task_id})

    @_one_call
    def tasks(self, *, status: Optional[str] = None, device_id: Optional[str] = None,
              task_type: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Task records, newest first (100 unless ``limit`` says otherwise)."""
        query = {"status": status, "device_id": device_id, "task_type": task_type, "limit": limit}
        return list(self._request("task_list", {k: v for k, v in query.items() if v is not None})["tasks"])

    @_one_call
    def devices(self, status: Optional[str] = None) -> List[Dict[str, Any]]:
        """Device records; ``status`` "online" or "offline" filters."""
        return list(self._request("list_devices", {} if status is None else {"status": status})["devices"])

    @_one_call
    def cluster_status(self) -> Dict[str, Any]:
        """Devices and tasks counted by state, queue length, slots, uptime."""
        return self._request("cluster_status")

    @_one_call
    def subscribe(self, task_ids: Optional[Iterable[str]] = None) -> None:
        """Have ``task_update`` pushed for these tasks (all when None); read them with :meth:`next_update`."""
        if task_ids is None:
            self._subscribed_all = True
            self._request("subscribe", {})
            return
        ids = id_list(task_ids)
        self._subscribed.update(ids)
        for chunk in chunks(ids):
            self._request("subscribe", {"task_ids": chunk})

    @_one_call
    def next_update(self, timeout_s: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The next pushed task record after :meth:`subscribe`; None after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return self._pull_update(None, deadline)

    @_one_call
    def wait(self, task_id: str, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Block until the task ends (pushed ``task_update``, no polling); return its record.

        Raises:
            TimeoutError: it did not end within ``timeout_s``.
            NotFound: no such task.
        """
        records = self.as_completed([task_id], timeout_s=timeout_s)
        try:
            return next(records)
        finally:
            records.close()

    @_one_call
    def as_completed(self, task_ids: Iterable[str],
                     timeout_s: Optional[float] = None) -> Generator[Dict[str, Any], None, None]:
        """Yield each task's final record as it ends (those already ended first).

        Raises:
            TimeoutError: not all of them ended within ``timeout_s`` (counted from the call).
        """
        return self._stepped(self._as_completed(task_ids, timeout_s))

    def _stepped(self, records: Generator[Dict[str, Any], None, None]) -> Generator[Dict[str, Any], None, None]:
        """``records``, each step of it a call of its own (see :func:`_one_call`).

        Between steps the client is free: the loop body may make other calls,
        and another thread may take the generator over.
        """
        try:
            while True:
                if not self._calling.acquire(False):
                    raise RuntimeError(_IN_USE)
                try:
                    if self._closed:
                        raise ClientError(_CLOSED)
                    record = next(records)
                except StopIteration:
                    return
                finally:
                    self._calling.release()
                yield record
        finally:
            records.close()

    def _as_completed(self, task_ids: Iterable[str],
                      timeout_s: Optional[float]) -> Generator[Dict[str, Any], None, None]:
        ids = id_list(task_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        remaining = set(ids)

        def late() -> TimeoutError:
            return not_ended_in_time(ids, len(remaining), timeout_s)

        self._watch(ids)
        try:
            # Subscribe first, then read the status: an update cannot fall in between.
            for chunk in chunks(ids):
                self._by(deadline, late, "subscribe", {"task_ids": chunk})
            start = 0
            while start < len(ids):
                batch = ids[start : start + STATUSES_PER_REQUEST]
                result = self._by(deadline, late, "task_status", {"task_ids": batch})
                start += len(some_records(result))  # as many as fit in a frame: the rest is asked again
                for record in known_records(batch, result):
                    task_id = str(record.get("task_id"))
                    if record.get("status") in TERMINAL and task_id in remaining:
                        remaining.discard(task_id)
                        yield record
            while remaining:
                update = self._pull_update(remaining, deadline)
                if update is None:
                    raise late()
                task_id = str(update.get("task_id"))
                if update.get("status") in TERMINAL and task_id in remaining:
                    remaining.discard(task_id)
                    yield update
        finally:
            self._unwatch(ids)

    @_one_call
    def execute(self, task_type: str, payload: Optional[Dict[str, Any]] = None, *,
                fallback: Optional[str] = None, fallback_after_s: float = 10.0,
                timeout_s: Optional[float] = None, **options: Any) -> Dict[str, Any]:
        """Run a task and return its final record, with ``ran_on`` saying where it ran.

        With ``fallback="local"`` (echo, sleep, python_eval only), a task that no
        device has taken within ``fallback_after_s`` is cancelled on the cluster
        and run in this process (python_eval in a child process, as a worker
        does); ``ran_on`` is then ``"local"``, else ``"cluster:<device_id>"``. If
        the task ended on the cluster while being cancelled, that result is used.

        Raises:
            ValueError: a fallback this process cannot do.
            TimeoutError: no final record within ``timeout_s``.
        """
        check_fallback(fallback, task_type)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        task_id = self.submit(task_type, payload, **options)
        wanted = {task_id}

        def late() -> TimeoutError:
            return TimeoutError(f"task {task_id} did not end within {timeout_s:g} s")

        self._watch(wanted)
        try:
            self._by(deadline, late, "subscribe", {"task_ids": [task_id]})
            record = dict(self._by(deadline, late, "task_status", {"task_id": task_id})["task"])
            if fallback == "local":
                taken_by = time.monotonic() + fallback_after_s
                if deadline is not None:
                    taken_by = min(taken_by, deadline)
                while record.get("status") == "pending":
                    update = self._pull_update(wanted, taken_by)
                    if update is None:
                        break
                    record = update
                if record.get("status") == "pending":
                    try:
                        self.cancel(task_id)
                    except Conflict:  # it ended meanwhile: use the cluster's result
                        record = self.status(task_id)
                    else:
                        return run_coroutine(run_locally(task_type, payload, options.get("timeout"), task_id),
                                             None if deadline is None else deadline - time.monotonic(), late)
            while record.get("status") not in TERMINAL:
                update = self._pull_update(wanted, deadline)
                if update is None:
                    raise late()
                record = update
            return on_cluster(record)
        finally:
            self._unwatch(wanted)
