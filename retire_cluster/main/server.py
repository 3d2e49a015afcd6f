"""TCP connections of the main node: read, feed, hand to the node, write.

One :class:`Connection` (an ``asyncio.Protocol``) per peer. Received bytes go
through the sans-I/O :class:`MessageStream`; each event goes to the node's
``dispatch``. Replies are queued with :meth:`Connection.send` and written once
per loop pass, so a burst of requests costs one ``write`` system call.

Backpressure: when the kernel buffer towards a peer fills up (the peer does not
read), the transport pauses our writing and we stop reading from that peer, so
a peer cannot make us queue replies without bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..protocol.codec import Event, MessageStream, encode
from ..protocol.messages import Message

if TYPE_CHECKING:
    from .node import MainNode

__all__ = ["Connection", "Server"]

log = logging.getLogger("retire_cluster.server")


class Connection(asyncio.Protocol):
    """One peer: a worker device, a client, or a one-shot script."""

    def __init__(self, node: MainNode) -> None:
        self.node = node
        self.stream = MessageStream(node.config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self.authenticated = node.config.insecure
        self.device_id: str | None = None
        self.closed = False
        self.subscribed_all = False
        self.subscribed: set[str] = set()
        #: task_assign message ids sent on this connection -> (task_id, attempt)
        self.pending_assigns: dict[str, tuple[str, int]] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.node.connection_made(self)

    def data_received(self, data: bytes) -> None:
        self._handle(self.stream.feed(data))

    def eof_received(self) -> bool:
        self._handle(self.stream.feed(b""))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self.node.connection_lost(self)

    def pause_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- ours -------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        dispatch = self.node.dispatch
        for event in events:
            if self.closed:
                return
            dispatch(self, event)

    def send(self, message: Message) -> None:
        """Queue a message; it is written at the end of this loop pass."""
        self.send_bytes(encode(message))

    def send_bytes(self, frame: bytes) -> None:
        if self.closed:
            return
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self.transport.write(data)

    def close(self) -> None:
        """Write what is queued, then close."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def __repr__(self) -> str:
        return f"<Connection {self.peer} device={self.device_id}>"


class Server:
    """The listening socket and the set of open connections."""

    def __init__(self, node: MainNode) -> None:
        self.node = node
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, ssl: Any = None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self.node), host, port, reuse_address=True, backlog=1024, ssl=ssl
        )
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            # Python 3.12+ waits for the connections here; 3.11 returns at once.
            await self._server.wait_closed()
            self._server = None
