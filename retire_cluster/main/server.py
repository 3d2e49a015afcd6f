"""TCP connections of the main node: read, feed, hand to the node, write.

One :class:`Connection` (an ``asyncio.Protocol``) per peer. Received bytes go
through the sans-I/O :class:`MessageStream`; each event goes to the node's
``dispatch``. Replies are queued with :meth:`Connection.send` and written once
per read (the replies to what one read brought) or once per loop pass (pushes
queued meanwhile), so a burst of requests costs one ``write`` system call. A reply
that waited for a commit goes out at once when it is the first of its pass
(:meth:`Connection.send_now`); the rest of that pass follows in one more write.

Express lane: when a read ends with a newline and no partial frame is held
(the usual case), its frames skip the framing buffer. Those that decode as
strict JSON into a heartbeat, task_result, task_progress, task_submit, ack or
error that is valid against its schema (and, on a device's connection, sent
under its own id) go straight to their handler; from the first one that does
not, the rest of the read is fed to the buffer as usual and gets exactly the
replies it always did (MainNode.express; tests/test_express.py compares both).
A device's heartbeat, a task_submit, and a worker's ack of its assignment and
its task_result, written as our worker and clients write them (compact,
message_type first), are first offered to a gate that decodes and checks each
in one msgspec call (main/typed.py); what a gate does not vouch for takes the
lane as above.

Theory of operation, for a port that anyone on the network can reach (every
limit is a :class:`~retire_cluster.main.config.MainConfig` field):

- Admission: :meth:`Server.admit` caps the open connections in total and per
  source address; one over the cap gets ``overloaded`` and is closed.
- Before authentication a frame may be at most ``max_preauth_frame_bytes``
  (16 KiB) and the peer has ``auth_timeout_s`` (10 s) to authenticate, then it
  gets ``unauthorized`` and is closed. Until then the received bytes are fed
  one frame at a time, so a frame right after the one that authenticates
  already gets the full ``max_frame_bytes``.
- Rate: a connection that has not registered as a worker spends one token per
  frame from a bucket of ``client_burst`` tokens refilled at
  ``client_rate_per_s``; a frame without a token is answered ``overloaded``.
  Registered workers are exempt: their traffic is bounded by their tasks and
  their results must never be refused.
- Backpressure: when the kernel buffer towards a peer fills up, the transport
  pauses our writing and we stop reading from that peer, so it cannot make us
  queue replies to more requests. Pushes (``task_update``, ``task_assign``)
  can still be queued: at most ``max_send_queue_bytes`` more while paused, and
  the buffer must shrink at least once every ``drain_timeout_s``; otherwise the
  peer is dropped (the connection is aborted, its buffer freed).
- Crashes: an exception escaping the node while it handles an event is logged
  with a reference and answered ``internal``; the connection and every other
  one carry on. One in the codec itself closes only that connection.
- HTTP: a connection whose first bytes are an HTTP request line (``POST / HTTP/1.1``)
  gets one HTTP 400 (its body the ``invalid_json`` error frame) and is closed, before
  any line of it is read as a frame. A web page can make a browser send such a request
  with any body (``fetch`` with ``text/plain``); without this, the JSON lines of that
  body would be requests, which an ``--insecure`` node would act on.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import uuid
from typing import TYPE_CHECKING, Any

from ..protocol.codec import BadFrame, Event, MessageStream, encode
from ..protocol.errors import InternalError, Overloaded, Unauthorized
from ..protocol.messages import REPLY_TYPES, Message, error_reply

if TYPE_CHECKING:
    from .node import MainNode

__all__ = ["Connection", "Server", "raise_open_files_limit"]

log = logging.getLogger("retire_cluster.server")

#: After close(): how long a peer has to read our last replies and hang up.
LINGER_S = 2.0

#: How long a reply nobody waits on (the ack of a device's task_result) may wait for the next
#: frame to its peer, so that both leave in one write (Connection.send_lazy).
LAZY_REPLY_S = 0.005
#: The farewell each authenticated connection hears when the main node stops (code ``overloaded``).
STOPPING_SENTENCE = "The main node is stopping; connect again when it is back (a worker does so by itself)."

#: How an HTTP request starts (RFC 9110 methods, then a space): never a JSON frame.
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ",
                b"PATCH ")


class Connection(asyncio.Protocol):
    """One peer: a worker device, a client, or a one-shot script."""

    def __init__(self, node: MainNode) -> None:
        config = node.config
        self.node = node
        self.authenticated = config.insecure
        limit = config.max_frame_bytes
        if not self.authenticated:
            limit = min(limit, config.max_preauth_frame_bytes)
        self.stream = MessageStream(limit, max_depth=config.max_json_depth)
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        #: the source address without the port (what the per-address cap counts)
        self.host: str = "?"
        self.admitted = False
        self.device_id: str | None = None
        self.closed = False
        self.subscribed_all = False
        self.subscribed: set[str] = set()
        #: task_assign message ids sent on this connection -> (task_id, attempt)
        self.pending_assigns: dict[str, tuple[str, int]] = {}
        #: its task_submit requests waiting for their task's end (MainNode.wait_for_end)
        self.end_waits: set[Any] = set()
        #: The reply to this connection's register has been sent: pushes may follow it.
        self.welcomed = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._reading = False  # in data_received: it writes the replies when the read is handled
        self._loop = asyncio.get_running_loop()
        # Token bucket of the request rate limit (not used once registered).
        self._tokens = float(config.client_burst)
        self._refilled = self._loop.time()
        self._auth_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None  # writes a lazy reply nothing else took along
        self._write_paused = False
        self._queued_while_paused = 0
        self._stopped_reading = False  # the node is stopping (stop_reading)
        self._fresh = True  # nothing received yet: see _refuse_http

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.host = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.host = self.peer = str(peer)
        self.node.connection_made(self)
        if not self.authenticated and not self.closed:
            self._auth_timer = self._loop.call_later(self.node.config.auth_timeout_s, self._auth_expired)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._fresh:
            self._fresh = False
            if data.startswith(HTTP_METHODS):
                self._refuse_http()
                return
        if not self.authenticated:
            self.node.begin_read()
            try:
                self._receive_preauth(data)
            finally:
                self.node.after_read()
            return
        # The replies to what this read brought are written once, right after
        # it (no call_soon per connection); pushes queued later in the pass
        # still go out at its end.
        self._reading = True
        self.node.begin_read()
        try:
            if self.stream.at_frame_end(data):
                data = self.node.express(self, data)  # whole frames: the common ones skip the layers
            if data:
                self._handle(self._feed(data))
        finally:
            self._reading = False
            self.node.after_read()  # the tasks it brought are placed, its commit started
        if self._out and not self._flush_scheduled:
            self.flush()

    def eof_received(self) -> bool:
        if not self.closed:
            self._handle(self._feed(b""))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._cancel_timers()
        self.node.connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._queued_while_paused = 0
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._arm_drain_timer(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.transport is not None and not self.closed and not self._stopped_reading:
            self.transport.resume_reading()

    def stop_reading(self) -> None:
        """The node is stopping: read nothing more (what was taken in is still answered)."""
        self._stopped_reading = True
        if self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except (NotImplementedError, RuntimeError):  # a transport that cannot pause reads on
                pass

    # -- receiving --------------------------------------------------------

    def _feed(self, data: bytes) -> list[Event]:
        try:
            return self.stream.feed(data)
        except Exception:  # a bug in the codec: this connection's framing is lost
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error [%s] decoding data from %s", ref, self.peer)
            self._send_internal(None, ref)
            self.close()
            return []

    def _refuse_http(self) -> None:
        """An HTTP request (a browser, maybe sent by a hostile web page): one HTTP 400, then close."""
        log.info("closing %s: it spoke HTTP to the TCP port", self.peer)
        http = getattr(self.node, "http_address", None)
        where = f" (port {http[1]})" if http is not None else ""
        body = encode(error_reply(None, "invalid_json",
                                  "This is the retire-cluster TCP port: it speaks newline-delimited JSON, not "
                                  f"HTTP. The dashboard and HTTP API are on the HTTP port{where}."))  # fmt: skip
        head = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body))
        self.send_bytes(head + body)
        self.close()

    def _receive_preauth(self, data: bytes) -> None:
        """Feed one frame at a time until authenticated (the frame limit then grows)."""
        view = memoryview(data)
        start = 0
        while not self.authenticated:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            self._handle(self._feed(view[start : nl + 1]))  # type: ignore[arg-type]
            start = nl + 1
            if self.closed:
                return
        if start < len(data):
            self._handle(self._feed(view[start:]))  # type: ignore[arg-type]

    def _handle(self, events: list[Event]) -> None:
        dispatch = self.node.dispatch
        for event in events:
            if self.closed:
                return
            try:
                if self.device_id is None and not self.take_token():
                    if not (isinstance(event, BadFrame) and event.error.close):
                        self.refuse_rate(event)
                        continue
                    # framing is lost: answer frame_too_large and close as usual
                dispatch(self, event)
            except Exception:
                self.internal_error(event)

    def internal_error(self, event: Event) -> None:
        """An exception escaped while handling ``event``: log it, answer ``internal`` (a reply gets none)."""
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error [%s] dispatching a frame from %s", ref, self.peer)
        if not (isinstance(event, Message) and event.message_type in REPLY_TYPES):
            self._send_internal(event.message_id, ref)

    def take_token(self) -> bool:
        config = self.node.config
        now = self._loop.time()
        tokens = self._tokens + (now - self._refilled) * config.client_rate_per_s
        self._refilled = now
        if tokens > config.client_burst:
            tokens = config.client_burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def refuse_rate(self, event: Event) -> None:
        if isinstance(event, Message) and event.message_type in REPLY_TYPES:
            return  # a reply never gets a reply
        config = self.node.config
        self.send_error(
            event.message_id,
            Overloaded(
                f"More than {config.client_rate_per_s:g} requests per second on this connection "
                f"(bursts up to {config.client_burst}); wait for replies before sending more."
            ),
        )

    def authenticate(self) -> None:
        """The peer showed the cluster token: full frame size, no auth deadline."""
        if self.authenticated:
            return
        self.authenticated = True
        self.stream.max_frame_bytes = self.node.config.max_frame_bytes
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self.authenticated or self.closed:
            return
        log.info("closing %s: not authenticated within %g s", self.peer, self.node.config.auth_timeout_s)
        self.send_error(
            None,
            Unauthorized(
                f"Not authenticated within {self.node.config.auth_timeout_s:g} s; send the cluster "
                "token in auth_token with the first frame (the connection is closed)."
            ),
        )
        self.close()

    # -- sending ----------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message; it is written at the end of this loop pass."""
        self.send_bytes(encode(message))

    def send_error(self, message_id: str | None, exc: Overloaded | Unauthorized | InternalError) -> None:
        """Queue an ``error`` reply made from a protocol error."""
        self.send(error_reply(message_id, exc.code, exc.message))

    def _send_internal(self, message_id: str | None, ref: str) -> None:
        try:
            self.send_error(
                message_id,
                InternalError(f"Internal error (reference {ref}); the main node's log has the details."),
            )
        except Exception:  # pragma: no cover - the error reply itself failed
            log.exception("cannot even send the internal error [%s] to %s", ref, self.peer)
            self.abort()

    def send_bytes(self, frame: bytes) -> None:
        if self.closed:
            return
        self._out.append(frame)
        if not self._flush_scheduled and not self._reading:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_now(self, frame: bytes) -> None:
        """Queue a reply someone waits on, written at once when it is the first of this loop pass.

        A reply that waited for a commit goes out before the rest of the pass
        (other callbacks of the same commit); what else this pass queues for
        the peer still leaves together, in one more write.
        """
        if self._reading:  # written when this read is handled, moments from now
            self.send_bytes(frame)
            return
        first = not self._flush_scheduled
        self.send_bytes(frame)
        if first and self._out:
            self.flush()
            self._flush_scheduled = True  # send_bytes scheduled a flush: later frames of this pass join it

    def write_now(self, frames: list[bytes]) -> None:
        """Write ``frames`` now, after whatever is queued, in one write (no flush left for the end of the pass)."""
        if self.closed:
            return
        self._out.extend(frames)
        self.flush()

    def send_lazy(self, frame: bytes) -> None:
        """Queue a reply nobody waits on: it leaves with the next frame written to this peer, or after LAZY_REPLY_S.

        The ack of a device's ``task_result`` only lets the device drop the
        result from its outbox. Written at once, it costs a write here and
        a wake-up and a read there; a device that is sent its next task
        within moments reads both in one read. A frame queued after it is
        still written after it.
        """
        if self.closed:
            return
        self._out.append(frame)
        if not self._flush_scheduled and not self._reading and self._lazy_timer is None:
            self._lazy_timer = self._loop.call_later(LAZY_REPLY_S, self._lazy_due)

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_timer is not None:  # what it waited for leaves now
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._out or self.closed or self.transport is None:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        if self._write_paused:
            # The peer does not read: only so much more may wait for it.
            self._queued_while_paused += len(data)
            if self._queued_while_paused > self.node.config.max_send_queue_bytes:
                log.warning(
                    "dropping %s: it does not read its replies (%d bytes waiting)",
                    self.peer,
                    self.transport.get_write_buffer_size() + len(data),
                )
                self.abort()
                return
        self.transport.write(data)

    def _arm_drain_timer(self, buffered: int) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = self._loop.call_later(
            self.node.config.drain_timeout_s, self._drain_check, buffered
        )

    def _drain_check(self, buffered_before: int) -> None:
        """While paused, the write buffer must shrink within every drain_timeout_s."""
        self._drain_timer = None
        if self.closed or not self._write_paused or self.transport is None:
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered < buffered_before:
            self._arm_drain_timer(buffered)  # slow, but reading
            return
        log.warning(
            "dropping %s: it read nothing for %g s (%d bytes waiting)",
            self.peer,
            self.node.config.drain_timeout_s,
            buffered,
        )
        self.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._auth_timer, self._drain_timer, self._lazy_timer):
            if timer is not None:
                timer.cancel()
        self._auth_timer = self._drain_timer = self._lazy_timer = None

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Write what is queued, then close.

        Lingering close: on plain TCP we send our replies and a FIN but keep
        reading (and discarding) for up to ``LINGER_S`` (or ``drain_timeout_s``
        if shorter). Closing with unread
        input makes the kernel send a reset, and the peer would lose the
        ``frame_too_large`` (or other) error we just wrote. A peer that never
        reads is aborted once its buffer stops shrinking.
        """
        if self.closed:
            return
        self.flush()
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        self._cancel_timers()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the peer is gone already (its reset came in): nothing to linger for
                transport.abort()
                return
            if not self._write_paused:
                transport.resume_reading()  # so that the peer's EOF (or reset) is seen
        else:
            transport.close()
        linger_s = min(LINGER_S, self.node.config.drain_timeout_s)
        self._drain_timer = self._loop.call_later(
            linger_s, self._end_linger, transport.get_write_buffer_size()
        )

    def _end_linger(self, buffered_before: int) -> None:
        self._drain_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() and not transport.get_write_buffer_size():
            return
        buffered = transport.get_write_buffer_size()
        if not buffered:
            transport.close()
        elif buffered < buffered_before:
            linger_s = min(LINGER_S, self.node.config.drain_timeout_s)
            self._drain_timer = self._loop.call_later(linger_s, self._end_linger, buffered)  # still reading
        else:
            transport.abort()

    def abort(self) -> None:
        """Close now, discarding whatever is queued."""
        self.closed = True
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        return f"<Connection {self.peer} device={self.device_id}>"


class Server:
    """The listening socket and the set of open connections."""

    def __init__(self, node: MainNode) -> None:
        self.node = node
        self.connections: set[Connection] = set()
        #: open (admitted) connections per source address
        self.per_host: dict[str, int] = {}
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, ssl: Any = None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        config = self.node.config
        # TCP connections, the HTTP side's (WebApp max_connections, 1024), the database, logs and spare.
        raise_open_files_limit(config.max_connections + 1024 + 256)
        self._server = await loop.create_server(
            lambda: Connection(self.node),
            host,
            port,
            reuse_address=True,
            # After a restart every device reconnects at once: a short accept
            # queue would drop SYNs and cost each of them a 1 s retransmit.
            backlog=4096,
            ssl=ssl,
            ssl_handshake_timeout=config.auth_timeout_s if ssl is not None else None,
        )
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    def admit(self, conn: Connection) -> str | None:
        """Count a new connection in; returns why it is refused, or None."""
        config = self.node.config
        if len(self.connections) >= config.max_connections:
            return (
                f"The main node has {config.max_connections} connections open, its maximum; try again later."
            )
        host = getattr(conn, "host", "?")  # stand-ins in tests may not know theirs
        count = self.per_host.get(host, 0)
        if count >= config.max_connections_per_address:
            return (
                f"{host} has {config.max_connections_per_address} connections open, the "
                "maximum per address; close some first."
            )
        self.per_host[host] = count + 1
        self.connections.add(conn)
        conn.admitted = True
        return None

    def release(self, conn: Connection) -> None:
        """Count a closed connection out (it may never have been admitted)."""
        if not getattr(conn, "admitted", False):
            return
        conn.admitted = False
        self.connections.discard(conn)
        host = getattr(conn, "host", "?")
        count = self.per_host.get(host, 0) - 1
        if count > 0:
            self.per_host[host] = count
        else:
            self.per_host.pop(host, None)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def stop_reading(self) -> None:
        """Read from no connection any more (the node is stopping; see MainNode.stop)."""
        for conn in list(self.connections):
            conn.stop_reading()

    async def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            if conn.authenticated and not conn.closed:
                # Said before the close (PROTOCOL.md: an error sent unasked), so that a worker logs
                # that the main node stopped, not that its connection was lost.
                conn.send_error(None, Overloaded(STOPPING_SENTENCE))
            conn.close()
        if self._server is not None:
            # Python 3.12+ waits for the connections here; 3.11 returns at once.
            await self._server.wait_closed()
            self._server = None


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (up to the hard limit).

    Returns the soft limit in force. Each connection is one file descriptor;
    a common default soft limit (1024) would refuse connections long before
    ``max_connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - a container that forbids it
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("the open-files limit is %d, below max_connections; raise `ulimit -n` or lower it", soft)
    return int(soft)
