"""Turning each received event into exactly one reply: auth, validation, errors.

Part of :class:`~retire_cluster.main.node.MainNode` (a mixin, to keep node.py
to its wiring and state changes). Known protocol errors become ``error``
replies; anything else becomes ``internal`` with a reference that is also in
the log, and the connection carries on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..protocol.codec import BadFrame, Event, encode_ack, loads
from ..protocol.errors import InternalError, InvalidJSON, RemoteProtocolError, Unauthorized
from ..protocol.messages import REPLY_TYPES, Message, error_reply, utc_timestamp
from .typed import (
    HEARTBEAT_PREFIX,
    MAX_NESTING,
    TASK_FRAME_PREFIXES,
    HeartbeatGate,
    TaskFrameGate,
    heartbeat_gate,
    task_frame_gate,
)

if TYPE_CHECKING:
    from ..protocol.validation import MessageValidator
    from .handlers import Handlers
    from .registry import Device, Registry
    from .server import Connection

__all__ = ["Dispatcher"]

log = logging.getLogger("retire_cluster.main")

#: The frames the express lane takes (Dispatcher.express): what devices and clients send most.
EXPRESS_TYPES = frozenset({"heartbeat", "task_result", "task_progress", "task_submit", *REPLY_TYPES})
#: The acks that nobody waits on: each leaves with the next frame to its peer (Connection.send_lazy).
LAZY_REPLIES = frozenset({"task_result"})
_new_object = object.__new__


class _Replied:
    """The type of :data:`REPLIED`."""

    def __repr__(self) -> str:
        return "REPLIED"


#: What a handler's future resolves to when its reply has been written already (MainNode.wait_for_end).
REPLIED: Any = _Replied()


def _message(obj: dict[str, Any]) -> Message:
    """The :class:`Message` of a frame valid against its schema, made as decode_message makes it."""
    get = obj.get
    msg: Message = _new_object(Message)  # no frozen __init__ (the schema checked the envelope)
    msg.__dict__.update(message_type=obj["message_type"], message_id=obj["message_id"], sender_id=obj["sender_id"],
                        data=get("data", {}), target_id=get("target_id"), timestamp=get("timestamp"),
                        auth_token=get("auth_token"))  # fmt: skip
    return msg


class Dispatcher:
    """Request dispatch and replies of the main node (mixed into MainNode)."""

    token: str | None
    validator: MessageValidator
    handlers: Handlers
    registry: Registry
    clock: Callable[[], float]

    _background: set[asyncio.Task[Any]]
    _loop: asyncio.AbstractEventLoop | None
    #: a device's heartbeat decoded and checked in one call (main/typed.py); None without msgspec
    beat_gate: HeartbeatGate | None = heartbeat_gate()
    #: a task_submit, a worker's ack of an assignment and its task_result, decoded and checked in one call;
    #: None without msgspec
    task_frame_gate: TaskFrameGate | None = task_frame_gate()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def token_ok(self, token: str | None) -> bool:
        if self.token is None:
            return True
        # surrogatepass: an HTTP header's stray bytes arrive as lone surrogates, and must mean "wrong".
        return token is not None and hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                                         self.token.encode())

    def dispatch(self, conn: Connection, event: Event) -> None:
        """Handle one received event; every request gets exactly one reply."""
        if isinstance(event, BadFrame):
            self._refuse(conn, event)
            return
        msg = event
        if not conn.authenticated:
            if not self.token_ok(msg.auth_token):
                self.reply_error(
                    conn,
                    msg.message_id,
                    Unauthorized("Send the cluster token in auth_token; "
                                 "`retire-cluster token` on the main node prints it."),
                )
                return
            conn.authenticate()
        if msg.message_type in REPLY_TYPES:
            # A reply never gets a reply; a malformed one is dropped.
            try:
                self.validator.validate(msg)
            except RemoteProtocolError as exc:
                log.info("dropping malformed %s from %s: %s", msg.message_type, conn.peer, exc)
                return
            self.handlers.on_reply(conn, msg)
            return
        try:
            self.validator.validate(msg)
        except RemoteProtocolError as exc:
            self.reply_error(conn, msg.message_id, exc)
            return
        self._act(conn, msg)

    def express(self, conn: Connection, data: bytes) -> bytes:
        """Handle the leading whole frames of ``data`` in the express lane; return the rest.

        ``data`` ends with a newline and the connection holds no partial frame
        (Connection.data_received checks both). A frame whose handling is
        certain to succeed past decoding (strict JSON, an object, a type in
        ``EXPRESS_TYPES``, valid against its schema, from the connection's own
        device) is decoded once and handed straight to its handler: no framing
        buffer, no envelope checks the schema already makes, no re-encoding to
        validate. At the first frame that is anything else, the rest of
        ``data`` (that frame included) is returned for the general path, which
        gives the exact error; nothing was changed for it, and order is kept.
        """
        start, end = 0, len(data)
        limit = conn.stream.max_frame_bytes
        max_depth = conn.stream.max_depth
        while start < end:
            nl = data.find(b"\n", start)
            if nl - start > limit or not self._express_frame(conn, data[start:nl], max_depth):
                return data[start:] if start else data
            start = nl + 1
            if conn.closed:
                break
        return b""

    def _express_frame(self, conn: Connection, frame: bytes, max_depth: int) -> bool:
        """Handle one frame if it takes the express lane (see :meth:`express`); False if it does not."""
        device_id = conn.device_id
        if device_id is not None and frame.startswith(HEARTBEAT_PREFIX) and self._vouched_beat(conn, frame, max_depth):
            return True
        obj = self._express_object(frame, max_depth, device_id)
        if obj is None:
            return False
        mtype = obj["message_type"]
        if mtype == "heartbeat" and device_id is not None:
            # The commonest frame of all: straight to the device, no Message made.
            device = self.registry.get(device_id)
            if device is not None:
                self._beat(conn, device, obj["message_id"], obj.get("data", {}))
                return True
        msg = _message(obj)
        try:
            if device_id is None and not conn.take_token():
                conn.refuse_rate(msg)
            elif mtype in REPLY_TYPES:
                self.handlers.on_reply(conn, msg)
            else:
                self._act(conn, msg)
        except Exception:
            conn.internal_error(msg)
        return True

    def _express_object(self, frame: bytes, max_depth: int, device_id: str | None) -> dict[str, Any] | None:
        """The frame's object if it takes the express lane (see :meth:`express`), else None.

        Strict JSON, an object of a type in ``EXPRESS_TYPES``, from the
        connection's own device when it has one, valid against its schema:
        decoded and checked in one call when the task-frame gate vouches for it.
        """
        obj = self._vouched_task_frame(frame, max_depth)
        if obj is not None:
            return obj if device_id is None or obj["sender_id"] == device_id else None
        try:
            obj = loads(frame, max_depth)
        except Exception:  # not strict JSON (or a bug): the general path says which
            return None
        if type(obj) is not dict or obj.get("message_type") not in EXPRESS_TYPES:
            return None
        if device_id is not None and obj.get("sender_id") != device_id:
            return None  # forbidden: the general path answers it
        return obj if self.validator.valid(obj) else None

    def _vouched_task_frame(self, frame: bytes, max_depth: int) -> dict[str, Any] | None:
        """A task_submit, or a worker's ack or task_result, that the gate vouches for, as an object; else None."""
        gate = self.task_frame_gate
        if gate is None or max_depth < MAX_NESTING or not frame.startswith(TASK_FRAME_PREFIXES):
            return None
        return gate.vouch(frame)

    def _vouched_beat(self, conn: Connection, frame: bytes, max_depth: int) -> bool:
        """A heartbeat of the connection's device that the gate vouches for, handled; False for any other frame."""
        gate = self.beat_gate
        if gate is None or max_depth < MAX_NESTING:
            return False
        vouched = gate.vouch(frame)  # decoded and checked in one call
        if vouched is None or vouched[1] != conn.device_id:
            return False
        device = self.registry.get(vouched[1])
        if device is None:
            return False
        self._beat(conn, device, vouched[0], vouched[2])
        return True

    def _beat(self, conn: Connection, device: Device, message_id: str, data: dict[str, Any]) -> None:
        """A heartbeat of the connection's own device, valid: the device is seen, the ack queued."""
        try:
            result = self.handlers.beat(device, data)
            conn.send_bytes(encode_ack(message_id, result, utc_timestamp(self.clock())))
        except Exception:
            conn.internal_error(Message("heartbeat", message_id, device.device_id, data))

    def _act(self, conn: Connection, msg: Message) -> None:
        """Handle a validated request and reply (now, or when its result is ready)."""
        try:
            result = self.handlers.handle(conn, msg)
            if isinstance(result, asyncio.Future):  # no Task needed: reply when it resolves
                result.add_done_callback(lambda fut: self._finish_future(conn, msg, fut))
            elif isinstance(result, Awaitable):
                self.spawn(self._finish_async(conn, msg, result))
            else:  # encoding the ack is inside the try: a bad result is `internal` too
                conn.send_bytes(encode_ack(msg.message_id, result, utc_timestamp(self.clock())))
        except RemoteProtocolError as exc:
            self.reply_error(conn, msg.message_id, exc)
        except Exception:
            self._internal(conn, msg)

    async def _finish_async(self, conn: Connection, msg: Message, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
            conn.send_bytes(encode_ack(msg.message_id, result, utc_timestamp(self.clock())))
        except RemoteProtocolError as exc:
            self.reply_error(conn, msg.message_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._internal(conn, msg)

    def _finish_future(self, conn: Connection, msg: Message, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        try:
            if exc is not None:
                raise exc
            result = fut.result()
            if result is REPLIED:
                return
            frame = encode_ack(msg.message_id, result, utc_timestamp(self.clock()))
            if msg.message_type in LAZY_REPLIES:
                conn.send_lazy(frame)
            else:
                conn.send_now(frame)
        except RemoteProtocolError as err:
            self.reply_error(conn, msg.message_id, err)
        except Exception:
            self._internal(conn, msg)

    def then(self, fut: asyncio.Future[Any], make_result: Callable[[], Any]) -> asyncio.Future[Any]:
        """A future of ``make_result()``, run once ``fut`` (a commit) succeeded.

        Cheaper than a coroutine for the hot replies (register, task_result):
        no Task is created per request.
        """
        out: asyncio.Future[Any] = (self._loop or asyncio.get_running_loop()).create_future()

        def done(f: asyncio.Future[Any]) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                try:
                    out.set_result(make_result())
                except Exception as err:  # reported as `internal` by _finish_future
                    out.set_exception(err)

        fut.add_done_callback(done)
        return out

    def _internal(self, conn: Connection, msg: Message) -> None:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error [%s] handling %s from %s", ref, msg.message_type, conn.peer)
        self.reply_error(
            conn,
            msg.message_id,
            InternalError(f"Internal error (reference {ref}); the main node's log has the details."),
        )

    def _refuse(self, conn: Connection, bad: BadFrame) -> None:
        error: RemoteProtocolError = bad.error
        if not conn.authenticated:
            if self.token_ok(bad.auth_token) and bad.auth_token is not None:
                conn.authenticate()
            elif not isinstance(error, InvalidJSON) and not error.close:
                error = Unauthorized("Send the cluster token in auth_token; "
                                     "`retire-cluster token` on the main node prints it.")
        self.reply_error(conn, bad.message_id, error)
        if error.close or (not conn.authenticated and isinstance(error, InvalidJSON)):
            conn.close()

    def reply_error(self, conn: Connection, message_id: str | None, exc: Exception) -> None:
        if isinstance(exc, (RemoteProtocolError, InternalError)):
            code, text, path = exc.code, exc.message, exc.path
        else:  # pragma: no cover - callers pass protocol errors
            code, text, path = "internal", "Internal error.", None
        conn.send(error_reply(message_id, code, text, path=path, timestamp=utc_timestamp(self.clock())))
