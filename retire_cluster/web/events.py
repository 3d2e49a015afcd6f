"""Server-Sent Events: per-stream ring buffers, subscribers, resume, and the log feed.

Theory of operation: the node calls its listeners on every task change (from
``publish``, the same moment TCP subscribers get ``task_update``) and device
change; :class:`~retire_cluster.web.app.WebApp` turns each into one event on a
:class:`Stream`. A stream numbers its events 1, 2, 3... (the SSE ``id``),
keeps the newest ``ring_size`` already encoded, and appends each to every
open subscriber's outbox. Nothing polls: a subscriber's writer sleeps on an
:class:`asyncio.Event` until there is something to send or it is time for a
keep-alive comment.

Resume: a client that reconnects with ``Last-Event-ID: N`` gets every event
after N still in the ring, then the live ones. When N is older than the ring
(or from before a restart of the main node) it gets one ``reset`` event
instead: reload the full state, then carry on with the live events.

Backpressure: a subscriber that does not read while more than ``max_pending``
events (or ``max_pending_bytes`` of them) pile up for it is dropped; browsers
reconnect with ``Last-Event-ID`` and catch up from the ring, so no memory grows
without bound.

Bytes, not only counts: a task event carries the whole record, payload and
result included, and either may be close to ``max_frame_bytes`` (1 MiB). So the
ring also keeps at most ``ring_bytes`` (the oldest events go first), and a
subscriber at most ``max_pending_bytes``; a count alone let 1,000 big tasks keep
gigabytes in the main node for good.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..protocol.codec import dumps
from ..protocol.messages import utc_timestamp

__all__ = ["LogFeed", "Stream", "Subscriber", "format_event"]

KEEPALIVE = b": keep-alive\n\n"
#: Defaults: what one stream's ring, and what may wait for one subscriber, may hold in bytes.
RING_BYTES = 16 * 1024 * 1024
MAX_PENDING_BYTES = 4 * 1024 * 1024


def format_event(event_id: int, event: str, data: Any) -> bytes:
    """One SSE event: ``id``, ``event`` and one ``data`` line of compact JSON."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), dumps(data))


class Subscriber:
    """One open ``/stream/...`` response: what is waiting to be written to it.

    Args:
        accept: which events it wants, by key (None: all).
        max_pending: events that may wait before it is dropped as too slow.
        max_pending_bytes: the same in bytes (one event bigger than that still goes,
            when nothing else waits).
    """

    def __init__(self, accept: Callable[[str | None], bool] | None = None, max_pending: int = 1000,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.accept = accept
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        #: set when the subscriber must end: too slow, or the node stops
        self.closed = False
        self.dropped = False

    def offer(self, key: str | None, frame: bytes) -> None:
        if self.closed or (self.accept is not None and not self.accept(key)):
            return
        if len(self.pending) >= self.max_pending or (
                self.pending and self.pending_bytes + len(frame) > self.max_pending_bytes):
            self.dropped = True
            self.close()
            return
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        self.wake.set()

    def take(self) -> bytes:
        """Everything waiting, as one write."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        self.wake.clear()
        return data

    def close(self) -> None:
        self.closed = True
        self.pending.clear()  # nobody will write them: free them now
        self.pending_bytes = 0
        self.wake.set()


class Stream:
    """One event stream (devices, tasks or logs): numbered events, a ring, subscribers.

    The ring keeps the newest ``ring_size`` events, and at most ``ring_bytes`` of
    them (always the newest one).
    """

    def __init__(self, name: str, ring_size: int = 1000, ring_bytes: int = RING_BYTES) -> None:
        self.name = name
        self.last_id = 0
        self.ring_size, self.ring_bytes = ring_size, ring_bytes
        self._ring: deque[tuple[int, str | None, bytes]] = deque()
        self._ring_used = 0
        self.subscribers: set[Subscriber] = set()

    def emit(self, event: str, data: Any, key: str | None = None) -> int:
        """Number, keep and fan out one event; returns its id.

        ``key`` (a task or device id) lets subscribers filter without decoding.
        """
        self.last_id += 1
        frame = format_event(self.last_id, event, data)
        ring = self._ring
        ring.append((self.last_id, key, frame))
        self._ring_used += len(frame)
        while len(ring) > 1 and (len(ring) > self.ring_size or self._ring_used > self.ring_bytes):
            self._ring_used -= len(ring.popleft()[2])
        for sub in list(self.subscribers):
            sub.offer(key, frame)
        return self.last_id

    def skip(self) -> None:
        """Nobody listens and the event is a snapshot (a device's state): drop it.

        The ring is emptied and the id moved on, so a client resuming from
        before the gap gets a ``reset`` and fetches the current state.
        """
        if self._ring:
            self._ring.clear()
            self._ring_used = 0
        self.last_id += 1

    def subscribe(self, sub: Subscriber, last_event_id: str | None) -> bool:
        """Add ``sub`` and queue what it missed; False when it missed too much (send ``reset``)."""
        self.subscribers.add(sub)
        if last_event_id is None:
            return True
        try:
            since = int(last_event_id.strip())
        except ValueError:
            return False
        oldest = self._ring[0][0] if self._ring else self.last_id + 1
        if since > self.last_id or since < oldest - 1:
            return False  # from before a restart, or evicted from the ring
        for event_id, key, frame in self._ring:
            if event_id > since:
                sub.offer(key, frame)
        return True

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            sub.close()


class LogFeed(logging.Handler):
    """A logging handler that turns the main node's log records into ``log`` events.

    Records logged from another thread (aiosqlite's) are handed to the loop.
    """

    def __init__(self, stream: Stream, loop: asyncio.AbstractEventLoop, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.stream = stream
        self.loop = loop
        self._loop_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {
                "time": utc_timestamp(record.created),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info and record.exc_info[0] is not None:
                entry["exception"] = record.exc_info[0].__name__
        except Exception:  # a bad format string must not break logging
            self.handleError(record)
            return
        if threading.get_ident() == self._loop_thread:
            self.stream.emit("log", entry, entry["level"])
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stream.emit, "log", entry, entry["level"])
