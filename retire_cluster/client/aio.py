"""An asyncio client over one TCP connection to the main node.

    async with AsyncClient("nas.local:8080", token=...) as c:
        task_id = await c.submit("python_eval", {"expression": "sum(range(100000))"})
        record = await c.wait(task_id)
        print(record["result"]["output"])

Theory of operation: one connection, read in its protocol's callback
(:class:`~retire_cluster.link.Link`: no task wakes up per read). Each request
gets a fresh ``message_id`` and a future; the callback resolves the future from
the reply's ``original_message_id``, so any number of requests may be in flight
at once and replies may come in any order. ``task_update`` pushes go to whoever waits for
that task (:meth:`wait`, :meth:`as_completed`, :meth:`execute`) and to the
streams of :meth:`updates`.

When the connection breaks, requests in flight fail with :class:`ConnectionLost`.
The ones that are safe to repeat (reads, ``subscribe``, a submit carrying an
``idempotency_key``) are sent again on a new connection, opened with
exponential backoff and jitter; the others raise, since their outcome is
unknown. While anything is subscribed or waited for, a background task
reconnects by itself, subscribes again, and re-reads the status of the tasks
being waited for (updates pushed while disconnected are lost).

Every ``error`` reply is raised as its class from
:mod:`retire_cluster.protocol.errors` (``NotFound``, ``Conflict``, ...).

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
from typing import Any, AsyncGenerator, Awaitable, Callable, Dict, Iterable, List, Optional, Set, TypeVar

from ..address import parse_main_address
from ..link import BadFrameFromPeer, Link
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
    run_locally,
    some_records,
    waited_submit,
    within,
)

__all__ = ["AsyncClient", "UpdateStream"]

log = logging.getLogger("retire_cluster.client")



class _Connection:
    """One open connection and the requests in flight on it."""

    def __init__(self, number: int) -> None:
        # Set once connected (the Link's callback needs this object first); replies arrive in that callback.
        self.link: Optional[Link] = None
        self.number = number
        self.pending: Dict[str, asyncio.Future[Message]] = {}
        self.broken = False


def _reason(closed: "asyncio.Future[None]") -> str:
    """Why a connection ended, from its Link's ``closed`` future."""
    if closed.cancelled():
        return "closed"
    exc = closed.exception()
    return (str(exc) or type(exc).__name__) if exc is not None else "closed"


T = TypeVar("T")


async def _by(deadline: Optional[float], late: Callable[[], TimeoutError], aw: Awaitable[T]) -> T:
    """``await aw`` by the caller's loop-time ``deadline``, else cancel it and raise ``late()``.

    Before, a main node that was down made ``wait(id, timeout_s=2)`` wait out
    the client's own ``timeout_s`` (30 s) reconnecting, then raise ClientError.
    """
    if deadline is None:
        return await aw
    try:
        return await within(aw, max(deadline - asyncio.get_running_loop().time(), 0))
    except asyncio.TimeoutError:
        raise late() from None


def _drop(attempt: "asyncio.Future[Any]") -> None:
    """A connection attempt nobody waits for any more: stopped, or its connection closed, its error retrieved."""
    if not attempt.done():
        attempt.cancel()
    elif not attempt.cancelled():
        if attempt.exception() is None:
            attempt.result()[0].close()


def _time_out(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class UpdateStream:
    """Task records pushed by the main node, in arrival order (see :meth:`AsyncClient.updates`).

    ``async for record in stream`` or ``await stream.get()``; ``close()`` when done.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        client._streams.add(self._queue)

    async def get(self) -> Dict[str, Any]:
        """The next record. Raises ClientError when the client gave up reconnecting."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return dict(item)

    def close(self) -> None:
        self._client._streams.discard(self._queue)

    def __aiter__(self) -> UpdateStream:
        return self

    async def __anext__(self) -> Dict[str, Any]:
        return await self.get()


class AsyncClient:
    """asyncio client of the main node.

    Args:
        main: ``HOST[:PORT]`` of the main node.
        token: the cluster token (None against an ``--insecure`` main node).
        timeout_s: how long to wait for one reply (and to reconnect for it).
        client_id: ``sender_id`` of the requests.
        reconnect: reconnect by itself after the connection broke.
        reconnect_timeout_s: how long the background reconnection keeps trying
            before waiters get a :class:`ClientError`.
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
        self._conn: Optional[_Connection] = None
        self._lock: Optional[asyncio.Lock] = None  # made in the loop (3.9 binds it at creation)
        self._closed = False
        self._busy = BusyNote()
        self._subscribed_all = False
        self._subscribed: Set[str] = set()
        self._task_queues: Dict[str, Set[asyncio.Queue[Any]]] = {}
        self._streams: Set[asyncio.Queue[Any]] = set()
        self._background: Set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.broken

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (requests open it too).

        Raises:
            ClientError: the main node cannot be reached.
        """
        await self._connection(asyncio.get_running_loop().time() + self.timeout_s)

    async def close(self) -> None:
        """Close the connection; waiters get a ClientError."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and conn.link is not None:
            conn.link.close()
            try:
                await asyncio.wait_for(asyncio.shield(conn.link.closed), 5.0)
            except (Exception, asyncio.CancelledError):  # closed as it should (or it never says so)
                pass
            self._lost(conn, "closed")
        self._fail_waiters(ClientError("the client was closed"))

    async def _connection(self, deadline: float) -> _Connection:
        """The open connection, or a new one (with backoff after the first has been opened)."""
        if self._closed:
            raise ClientError("this AsyncClient is closed; make a new one")
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.broken:
                return conn
            delays = backoff_delays(self.backoff_initial_s, self.backoff_max_s)
            loop = asyncio.get_running_loop()
            while True:
                try:
                    return await self._open(deadline)
                except NotAFrame:  # the dashboard's port, say: another try gets the same answer
                    raise
                except ClientError:
                    if not (self.reconnect and self.connections_opened) or self._closed:
                        raise
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise
                    await asyncio.sleep(min(next(delays), remaining))

    async def _open(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self.connections_opened + 1)
        # asyncio.wait, not wait_for: on Python 3.11 wait_for returns (or raises) what the attempt
        # ended with when the caller's cancel comes in the same step, and the cancel is lost: the
        # caller's timeout_s then waited out this client's own, retrying.
        attempt = asyncio.ensure_future(loop.create_connection(
            lambda: Link(lambda msg: self._dispatch(conn, msg), self.max_frame_bytes, strict=True),
            self.host, self.port, ssl=self.ssl,
        ))
        try:
            done, _ = await asyncio.wait({attempt}, timeout=max(deadline - loop.time(), 0.001))
        except asyncio.CancelledError:
            _drop(attempt)
            raise
        try:
            if not done:
                _drop(attempt)
                raise asyncio.TimeoutError()
            _, link = attempt.result()
        except (OSError, asyncio.TimeoutError) as exc:
            errno = getattr(exc, "errno", None)
            reason = os.strerror(errno) if errno else str(exc) or "timed out"
            raise ClientError(
                f"cannot connect to the main node at {self.host}:{self.port} ({reason}); "
                "is `retire-cluster main` running there?"
            ) from None
        if self.tls_fingerprint is not None:
            try:
                check_fingerprint(link.get_extra_info("ssl_object"), self.tls_fingerprint)
            except _ssl.SSLError as exc:
                link.close()
                raise ClientError(f"TLS with the main node at {self.host}:{self.port} failed: {exc}") from None
        sock = link.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.connections_opened += 1
        conn.link = link
        link.closed.add_done_callback(lambda f: self._lost(conn, _reason(f), self._not_retried(f)))
        self._conn = conn
        try:
            if self.token is not None:
                # Authenticate with a tiny frame: before that the main node takes frames of
                # 16 KiB at most, and closes a connection that stays silent.
                reply_result(await self._roundtrip(conn, "subscribe", {"task_ids": []}, deadline))
            if conn.number > 1:
                log.info("reconnected to the main node at %s:%s", self.host, self.port)
                await self._resubscribe(conn, deadline)
        except ConnectionLost as exc:
            if conn.number == 1:  # never got in: not a connection to come back to
                self.connections_opened = 0
                raise refused_at_first(exc, self.ssl is not None) from None
            raise ClientError(str(exc)) from None
        if conn.number > 1 and self._task_queues:
            self._spawn(self._refresh_waited())
        return conn

    async def _resubscribe(self, conn: _Connection, deadline: float) -> None:
        if self._subscribed_all:
            reply_result(await self._roundtrip(conn, "subscribe", {}, deadline))
            return
        ids = sorted(self._subscribed | set(self._task_queues))
        for chunk in chunks(ids):
            reply_result(await self._roundtrip(conn, "subscribe", {"task_ids": chunk}, deadline))

    async def _refresh_waited(self) -> None:
        """After a reconnect: the updates sent while away are lost, so read the status again."""
        for task_id in list(self._task_queues):
            try:
                record = await self.status(task_id)
            except Exception as exc:  # NotFound, or the connection broke again (it retries then)
                log.debug("refreshing %s after reconnect: %s", task_id, exc)
                continue
            self._on_update(record)

    def _not_retried(self, closed: "asyncio.Future[None]") -> Optional[ClientError]:
        """The error for requests in flight when what ended the connection would happen again."""
        exc = None if closed.cancelled() else closed.exception()
        if isinstance(exc, BadFrameFromPeer):
            return bad_frame_error(exc.error, self.host, self.port, self.max_frame_bytes)
        return None

    def _lost(self, conn: _Connection, reason: str, final: Optional[ClientError] = None) -> None:
        if conn.broken:
            return
        conn.broken = True
        if conn.link is not None:
            conn.link.close()
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(final or ConnectionLost(f"connection to the main node broke ({reason})"))
        conn.pending.clear()
        if self._conn is conn:
            self._conn = None
        if self._closed:
            return
        log.info("connection to the main node lost: %s", reason)
        if self.reconnect and (self._subscribed_all or self._subscribed or self._task_queues or self._streams):
            self._spawn(self._reconnect_in_background())

    async def _reconnect_in_background(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._connection(loop.time() + self.reconnect_timeout_s)
        except Exception as exc:  # ClientError, TimeoutError, or a refusal such as Unauthorized
            self._fail_waiters(ClientError(
                f"lost the connection to the main node and could not reconnect within "
                f"{self.reconnect_timeout_s:g} s ({exc})"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- receiving ---------------------------------------------------------

    def _dispatch(self, conn: _Connection, msg: Message) -> None:
        if msg.message_type in ("ack", "error"):
            fut = conn.pending.pop(str(msg.data.get("original_message_id")), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif msg.message_type == "error":
                log.warning("main node: %s (%s)", msg.data.get("error"), msg.data.get("code"))
        elif msg.message_type == "task_update":
            record = msg.data.get("task")
            if isinstance(record, dict):
                self._on_update(record)

    def _on_update(self, record: Dict[str, Any]) -> None:
        task_id = record.get("task_id")
        if record.get("status") in TERMINAL:
            self._subscribed.discard(str(task_id))
        for queue in self._task_queues.get(str(task_id), ()):
            queue.put_nowait(record)
        for queue in self._streams:
            queue.put_nowait(record)

    def _fail_waiters(self, exc: ClientError) -> None:
        for queues in self._task_queues.values():
            for queue in queues:
                queue.put_nowait(exc)
        for queue in self._streams:
            queue.put_nowait(exc)

    def _watch(self, task_ids: Iterable[str]) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for task_id in task_ids:
            self._task_queues.setdefault(task_id, set()).add(queue)
        return queue

    def _unwatch(self, task_ids: Iterable[str], queue: asyncio.Queue[Any]) -> None:
        for task_id in task_ids:
            queues = self._task_queues.get(task_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._task_queues[task_id]

    # -- requests ---------------------------------------------------------

    async def _roundtrip(self, conn: _Connection, message_type: str, data: Dict[str, Any],
                         deadline: float) -> Message:
        loop = asyncio.get_running_loop()
        msg = Message(message_type, new_message_id(), self.client_id, data, auth_token=self.token)
        frame = encode_request(msg, self.max_request_bytes)
        fut: asyncio.Future[Message] = loop.create_future()
        conn.pending[msg.message_id] = fut
        try:
            try:
                assert conn.link is not None  # a _Connection is handed out only once connected
                conn.link.write(frame)
                await conn.link.drain()
            except (OSError, RuntimeError) as exc:  # RuntimeError: the transport is closing
                self._lost(conn, str(exc) or type(exc).__name__)
            # A timer on the future itself: cheaper than asyncio.wait_for, which wraps it.
            timer = loop.call_later(max(deadline - loop.time(), 0.001), _time_out, fut)
            try:
                return await fut
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"no reply to {message_type} from the main node within {self.timeout_s:g} s"
                ) from None
            finally:
                timer.cancel()
        finally:
            conn.pending.pop(msg.message_id, None)

    async def request(self, message_type: str, data: Optional[Dict[str, Any]] = None, *,
                      idempotent: Optional[bool] = None, extra_s: float = 0.0) -> Dict[str, Any]:
        """Send one request; return its ``ack`` result.

        Args:
            idempotent: whether it may be sent again on a new connection when the
                first one broke before the reply (default: see :func:`is_idempotent`).
            extra_s: how much longer than ``timeout_s`` the reply may take (a
                ``task_submit`` with ``wait``).

        An ``overloaded`` reply (the main node refused the request before acting
        on it) is retried with backoff until ``timeout_s``.

        Raises:
            ProtocolError: the typed ``error`` reply (NotFound, Conflict, ...).
            ClientError: the main node cannot be reached; ConnectionLost when it
                broke before a non-repeatable request was answered.
            TimeoutError: no reply within ``timeout_s``.
        """
        body = data or {}
        if idempotent is None:
            idempotent = is_idempotent(message_type, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s + extra_s
        delays = backoff_delays(self.backoff_initial_s, self.backoff_max_s)
        while True:
            conn = await self._connection(deadline)
            try:
                return reply_result(await self._roundtrip(conn, message_type, body, deadline))
            except ConnectionLost as exc:
                if not (idempotent and self.reconnect) or self._closed or loop.time() >= deadline:
                    raise ConnectionLost(
                        f"{exc}; {message_type} was sent but not answered, check whether it took effect"
                    ) from None
            except Overloaded as exc:  # refused before it was acted on: any request may be sent again
                pause, now = next(delays), loop.time()
                if now + pause >= deadline:
                    raise  # no time for another try: its sentence says why, not a timeout
                self._busy.say(message_type, exc.message, deadline - now, now)
                await asyncio.sleep(pause)
                continue
            await asyncio.sleep(min(next(delays), max(deadline - loop.time(), 0)))

    # -- API --------------------------------------------------------------

    async def submit(self, task_type: str, payload: Optional[Dict[str, Any]] = None, **options: Any) -> str:
        """Submit a task; return its id once the main node has it on disk.

        Options: ``priority`` (low, normal, high, urgent or 0-100), ``timeout`` (s),
        ``requirements`` (dict), ``max_retries``, ``retry_on_timeout``, ``idempotency_key``.
        Without an ``idempotency_key`` it gets one of its own, so a connection lost
        before the answer is retried on a new one and finds the same task.
        """
        result = await self.request("task_submit", keyed_submit(task_type, payload, options))
        return str(result["task_id"])

    async def submit_many(self, tasks: Iterable[Dict[str, Any]]) -> List[str]:
        """Submit many tasks, a few hundred per request; return their ids in order once all are on disk.

        Each task is a dict such as ``{"task_type": "echo", "payload": {...}}``
        with any option of :meth:`submit`, and gets an ``idempotency_key`` of
        its own unless it has one (a repeated key answers with the task it
        names). A request is refused whole (one bad task refuses its request:
        the tasks of earlier requests are submitted already); a request too
        large for a frame is split. One request counts once against the main
        node's rate limit, so a batch of thousands is not slowed down by it.

        Raises:
            TypeError, ValueError: a task that is not one (before anything is sent).
            ProtocolError: a request refused by the main node.
        """
        ids: List[str] = []
        specs = many_specs(tasks)
        for start in range(0, len(specs), MANY_PER_REQUEST):
            ids += await self._submit_specs(specs[start : start + MANY_PER_REQUEST])
        return ids

    async def _submit_specs(self, specs: List[Dict[str, Any]]) -> List[str]:
        try:
            result = await self.request("task_submit", {"tasks": specs})
        except FrameTooLarge:  # refused here, before sending: in halves
            if len(specs) == 1:
                raise
            half = len(specs) // 2
            return await self._submit_specs(specs[:half]) + await self._submit_specs(specs[half:])
        return [str(task_id) for task_id in result["task_ids"]]

    async def run(self, task_type: str, payload: Optional[Dict[str, Any]] = None, *,
            wait_s: float = MAX_WAIT_S, **options: Any) -> Dict[str, Any]:
        """Submit a task and return its record once it has ended: one request, one reply.

        The main node replies when the task's end is committed, or after
        ``wait_s`` (at most 3600) with the record so far: a ``status`` that is
        not terminal means the wait ran out (:meth:`wait` goes on waiting).
        The fastest way to run one task. Options as for :meth:`submit`; without
        an ``idempotency_key`` it gets one of its own, so a connection lost
        before the reply is retried on a new one and finds the same task.

        Raises:
            ValueError: ``wait_s`` out of range.
        """
        body = waited_submit(task_type, payload, options, wait_s)
        return dict((await self.request("task_submit", body, extra_s=wait_s))["task"])

    async def status(self, task_id: str) -> Dict[str, Any]:
        """The whole task record (status, attempts, result, times)."""
        return dict((await self.request("task_status", {"task_id": task_id}))["task"])

    async def statuses(self, task_ids: Iterable[str]) -> List[Optional[Dict[str, Any]]]:
        """The records of many tasks, in order (None for a task the main node does not know); 100 per request."""
        ids = list(task_ids)
        records: List[Optional[Dict[str, Any]]] = []
        while len(records) < len(ids):  # a reply holds as many as fit in a frame: the rest is asked again
            start = len(records)
            result = await self.request("task_status", {"task_ids": ids[start : start + STATUSES_PER_REQUEST]})
            records += [None if r is None else dict(r) for r in some_records(result)]
        return records

    async def cancel(self, task_id: str) -> Dict[str, Any]:
        """Cancel a pending or running task. Raises Conflict when it already ended."""
        return await self.request("task_cancel", {"task_id": task_id})

    async def tasks(self, *, status: Optional[str] = None, device_id: Optional[str] = None,
                    task_type: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Task records, newest first (100 unless ``limit`` says otherwise)."""
        query = {"status": status, "device_id": device_id, "task_type": task_type, "limit": limit}
        result = await self.request("task_list", {k: v for k, v in query.items() if v is not None})
        return list(result["tasks"])

    async def devices(self, status: Optional[str] = None) -> List[Dict[str, Any]]:
        """Device records; ``status`` "online" or "offline" filters."""
        result = await self.request("list_devices", {} if status is None else {"status": status})
        return list(result["devices"])

    async def cluster_status(self) -> Dict[str, Any]:
        """Devices and tasks counted by state, queue length, slots, uptime."""
        return await self.request("cluster_status")

    async def subscribe(self, task_ids: Optional[Iterable[str]] = None) -> None:
        """Have ``task_update`` pushed for these tasks (all tasks when None); kept across reconnects.

        Read them with :meth:`updates` (create the stream first so nothing is missed).
        """
        if task_ids is None:
            self._subscribed_all = True
            await self.request("subscribe", {})
            return
        ids = id_list(task_ids)
        self._subscribed.update(ids)
        for chunk in chunks(ids):
            await self.request("subscribe", {"task_ids": chunk})

    def updates(self) -> UpdateStream:
        """A stream of every pushed task record (after :meth:`subscribe`)."""
        return UpdateStream(self)

    async def wait(self, task_id: str, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Wait for the task to end (pushed updates, no polling); return its record.

        Raises:
            TimeoutError: it did not end within ``timeout_s``.
            NotFound: no such task.
        """
        records = self.as_completed([task_id], timeout_s=timeout_s)
        try:
            return await records.__anext__()
        finally:
            await records.aclose()

    async def as_completed(self, task_ids: Iterable[str],
                           timeout_s: Optional[float] = None) -> AsyncGenerator[Dict[str, Any], None]:
        """Yield each task's final record as it ends (those already ended first).

        Raises:
            TimeoutError: not all of them ended within ``timeout_s`` (counted from the call).
        """
        ids = id_list(task_ids)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        queue = self._watch(ids)
        remaining = set(ids)

        def late() -> TimeoutError:
            return not_ended_in_time(ids, len(remaining), timeout_s)

        try:
            # Subscribe first, then read the status: an update cannot fall in between.
            for chunk in chunks(ids):
                await _by(deadline, late, self.request("subscribe", {"task_ids": chunk}))
            start = 0
            while start < len(ids):
                batch = ids[start : start + STATUSES_PER_REQUEST]
                # Those already ended are yielded batch by batch: the records of a hundred thousand tasks
                # are never all held at once. The others end later: their updates come in the queue.
                result = await _by(deadline, late, self.request("task_status", {"task_ids": batch}))
                start += len(some_records(result))  # as many as fit in a frame: the rest is asked again
                for record in known_records(batch, result):
                    task_id = record.get("task_id")
                    if task_id in remaining and record.get("status") in TERMINAL:
                        remaining.discard(task_id)
                        yield dict(record)
            while remaining:
                timeout = None if deadline is None else deadline - loop.time()
                if timeout is not None and timeout <= 0:
                    raise late()
                try:
                    item = await within(queue.get(), timeout)
                except asyncio.TimeoutError:
                    continue
                if isinstance(item, BaseException):
                    raise item
                task_id = item.get("task_id")
                if task_id in remaining and item.get("status") in TERMINAL:
                    remaining.discard(task_id)
                    yield dict(item)
        finally:
            self._unwatch(ids, queue)

    async def execute(self, task_type: str, payload: Optional[Dict[str, Any]] = None, *,
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
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        task_id = await self.submit(task_type, payload, **options)

        def late() -> TimeoutError:
            return TimeoutError(f"task {task_id} did not end within {timeout_s:g} s")

        queue = self._watch([task_id])
        try:
            await _by(deadline, late, self.request("subscribe", {"task_ids": [task_id]}))
            record = await _by(deadline, late, self.status(task_id))
            if fallback == "local":
                taken_by = loop.time() + fallback_after_s
                if deadline is not None:
                    taken_by = min(taken_by, deadline)
                while record.get("status") == "pending" and loop.time() < taken_by:
                    record = await self._next_record(queue, record, taken_by)
                if record.get("status") == "pending":
                    try:
                        await self.cancel(task_id)
                    except Conflict:  # it ended meanwhile: use the cluster's result
                        record = await self.status(task_id)
                    else:
                        return await _by(deadline, late,
                                         run_locally(task_type, payload, options.get("timeout"), task_id))
            while record.get("status") not in TERMINAL:
                if deadline is not None and loop.time() >= deadline:
                    raise late()
                record = await self._next_record(queue, record, deadline)
            return on_cluster(record)
        finally:
            self._unwatch([task_id], queue)

    @staticmethod
    async def _next_record(queue: asyncio.Queue[Any], last: Dict[str, Any],
                           deadline: Optional[float]) -> Dict[str, Any]:
        """The next pushed record, or ``last`` when the deadline passes first."""
        timeout = None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0)
        try:
            item = await within(queue.get(), timeout)
        except asyncio.TimeoutError:
            return last
        if isinstance(item, BaseException):
            raise item
        return dict(item)
