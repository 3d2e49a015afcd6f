"""A connection to the main node, for the worker and the asyncio client: frames are handled as they arrive.

A protocol rather than a StreamReader and a task reading from it: each chunk
the socket delivers is split into frames and handed on in the same callback,
so a message is acted on (an assignment answered, a reply's waiter woken) one
loop pass sooner and no task wakes up per read. Writing offers what a
StreamWriter did (write, drain, close) on the transport's own flow control.

A buffered protocol: the socket is read into one buffer the Link keeps
(``recv_into``), not into a new 256 KiB bytes object per read. glibc hands
an allocation that large out by mmap unless something raised its threshold
first, so on asyncio's own loop a read could cost an mmap, an mremap and a
munmap (and the page faults in between): in the worker processes where it
happened, more system time per round trip than the worker's Python for an
echo task.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, List, Optional

from .protocol.codec import MessageStream
from .protocol.messages import Message

__all__ = ["AnsweredHttp", "ClosedByMainNode", "Link"]

log = logging.getLogger("retire_cluster.link")


class BadFrameFromPeer(ConnectionError):
    """A strict Link's peer sent a frame the codec refused (``error``: too large, not JSON, ...)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"the main node sent a bad frame: {error}")
        self.error = error


class AnsweredHttp(ConnectionError):
    """The peer answered with HTTP before any frame: a web server (the dashboard's port, say), not a main node."""

    def __init__(self) -> None:
        super().__init__("the peer answered with HTTP, not retire-cluster frames")


class ClosedByMainNode(ConnectionError):
    """The main node ended the connection, after saying why (an ``error`` it sent unasked).

    ``code`` and ``reason`` are that error's ``data.code`` and ``data.error``:
    ``unauthorized`` when the authentication deadline passed, ``conflict``
    when another connection registered as the same device.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"main node closed the connection: {reason}")
        self.code, self.reason = code, reason


#: Bytes read from the socket at a time (a frame longer than this arrives in several reads).
READ_BUFFER_BYTES = 64 * 1024


class Link(asyncio.BufferedProtocol):
    """One connection to the main node.

    Args:
        on_message: called with each :class:`Message`, in order, as it arrives.
        max_frame_bytes: the longest frame accepted from the main node.
        strict: any frame the codec refuses ends the connection (the client);
            otherwise only one that loses the framing does, and the others
            are logged and skipped (the worker).
        on_read_end: called after each chunk's messages were handled (also
            when handling one failed): the worker writes what they queued
            there, in one write, without waiting for another loop pass.

    ``closed`` is a future that fails with the reason when the connection
    ends (the main node closed it, it broke, or a frame could not be handled):
    :class:`ClosedByMainNode` when the main node said why before closing.
    Nobody has to await it: its exception counts as retrieved either way.
    ``messages`` counts the frames received (none: the main node never
    answered on this connection).
    """

    def __init__(self, on_message: Callable[[Message], None], max_frame_bytes: int, *, strict: bool = False,
                 on_read_end: Optional[Callable[[], None]] = None) -> None:
        self._on_message = on_message
        self._on_read_end = on_read_end
        self._strict = strict
        self._stream = MessageStream(max_frame_bytes)
        self._transport: Optional[asyncio.Transport] = None
        self._read_buffer: Optional[memoryview] = None  # made at the first read
        self._paused = False
        self._drain_waiters: List["asyncio.Future[None]"] = []
        #: the event loop the connection runs on (asking asyncio for it costs a getpid call each time)
        self.loop = asyncio.get_running_loop()
        self.closed: "asyncio.Future[None]" = self.loop.create_future()
        # A connection that ends after its user stopped waiting on it (a worker refusing a pinned
        # certificate never reads from it) must not log "Future exception was never retrieved".
        self.closed.add_done_callback(_retrieve)
        self.messages = 0
        #: frames of a read are being handled and ``on_read_end`` follows: what they queue goes out then
        self.reading = False
        #: the error the main node sent unasked (original_message_id null): why it is closing
        self._farewell: Optional[Message] = None

    # -- protocol callbacks -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport reads the socket into: the same buffer every time."""
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self._read_buffer is not None
        self.data_received(self._read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Handle a chunk of the stream (what :meth:`buffer_updated` read, or bytes given directly)."""
        self.reading = self._on_read_end is not None
        try:
            if (not self.messages and not self._strict and data.startswith(b"HTTP/")
                    and not self._stream.decoder.buffered_bytes):  # (a strict Link's user says so itself)
                # Before, a worker given the dashboard's port logged each header line as a bad frame, and
                # did so again at every reconnect, for ever.
                raise AnsweredHttp()
            for event in self._stream.feed(data):
                if isinstance(event, Message):
                    self.messages += 1
                    if event.message_type == "error" and event.data.get("original_message_id") is None:
                        self._farewell = event
                    self._on_message(event)
                elif self._strict:
                    raise BadFrameFromPeer(event.error)
                else:
                    log.warning("bad frame from main node: %s", event.error)
                    if event.error.close:  # too large: the stream cannot go on
                        raise event.error
        except Exception as exc:  # an oversized frame, or a bug in handling one: end this connection
            self._end(exc)
            self.abort()
        finally:
            if self._on_read_end is not None:
                self.reading = False
                self._on_read_end()

    def eof_received(self) -> bool:
        self._end(self._closed_by_peer())
        return False  # close our side too

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._end(self._closed_by_peer() if exc is None or self._farewell is not None else exc)
        self._wake_drainers(ConnectionError("connection closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers(None)

    # -- what the agent uses ----------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    async def drain(self) -> None:
        """Wait while the main node is not reading what was written (the transport's buffer is full)."""
        if self.is_closing():
            raise ConnectionError("connection closed")
        if not self._paused:
            return
        waiter: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self._transport is None else self._transport.get_extra_info(name, default)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- internals ----------------------------------------------------------

    def _closed_by_peer(self) -> ConnectionError:
        farewell = self._farewell
        if farewell is None:
            return ConnectionError("main node closed the connection")
        return ClosedByMainNode(str(farewell.data.get("code")), str(farewell.data.get("error")))

    def _end(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_exception(exc)

    def _wake_drainers(self, exc: Optional[BaseException]) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)


def _retrieve(fut: "asyncio.Future[None]") -> None:
    if not fut.cancelled():
        fut.exception()
