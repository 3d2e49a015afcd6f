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

from ..protocol.codec import BadFrame, Event, encode_ack
from ..protocol.errors import InternalError, InvalidJSON, RemoteProtocolError, Unauthorized
from ..protocol.messages import REPLY_TYPES, Message, error_reply, utc_timestamp

if TYPE_CHECKING:
    from ..protocol.validation import MessageValidator
    from .handlers import Handlers
    from .server import Connection

__all__ = ["Dispatcher"]

log = logging.getLogger("retire_cluster.main")


class Dispatcher:
    """Request dispatch and replies of the main node (mixed into MainNode)."""

    token: str | None
    validator: MessageValidator
    handlers: Handlers
    clock: Callable[[], float]

    _background: set[asyncio.Task[Any]]
    _loop: asyncio.AbstractEventLoop | None

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
            conn.send_now(encode_ack(msg.message_id, fut.result(), utc_timestamp(self.clock())))
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
