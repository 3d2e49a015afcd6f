"""The aiohttp application of the main node: routes, auth, errors, events, start/stop.

Theory of operation: the HTTP side owns no cluster state. A request becomes the
same :class:`~retire_cluster.protocol.messages.Message` a TCP client would
send, is validated by the node's :class:`MessageValidator` against the same
JSON Schemas, and goes to the same handler method (:meth:`WebApp.call`); the
handler's ``error`` becomes a JSON body with the same ``code`` and an HTTP
status from :data:`HTTP_STATUS`. Live views come from the node's listener
hook (task changes from ``publish()``, device changes), never from polling.

Auth: every route needs ``Authorization: Bearer <cluster token>`` except
``GET /api/v1/health`` and the page itself (``/`` and ``/static/...``, which
hold no cluster data: the page asks for the token and sends it with every
request). Nothing is needed when the node runs ``--insecure``.

Browsers: a web page of any other site can make a browser on the network send
requests here (a form post, ``fetch`` with a ``text/plain`` body: no CORS
preflight), and with DNS rebinding even read the answers. The dashboard keeps
its token in the page (never a cookie), so such a request carries no token;
what is left to guard is an ``--insecure`` node. Every route but the public
ones refuses (``forbidden``) a request a browser marks as sent by a page of
another site (``Sec-Fetch-Site``, or ``Origin`` on browsers without it), and an
``--insecure`` node refuses a ``Host`` that is not an IP address, ``localhost``
or this machine's own name (DNS rebinding). Every response says not to be
framed (clickjacking), sniffed or given a referrer, and the page may load
nothing but its own files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..protocol.codec import dumps
from ..protocol.errors import (
    Forbidden,
    FrameTooLarge,
    InternalError,
    InvalidMessage,
    NotFound,
    Overloaded,
    ProtocolError,
    Unauthorized,
)
from ..protocol.messages import Message, new_message_id, utc_timestamp
from . import HTTPBindError
from .events import MAX_PENDING_BYTES, RING_BYTES, LogFeed, Stream

if TYPE_CHECKING:
    from ..main.node import MainNode
    from ..main.registry import Device
    from ..main.tasks import Task

__all__ = ["HTTP_STATUS", "STATIC_DIR", "HttpPeer", "WebApp", "json_response"]

log = logging.getLogger("retire_cluster.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: What /static/ serves: the page's script and style, nothing else from the package.
STATIC_FILES = frozenset({"dashboard.css", "dashboard.js"})

#: wire error code -> HTTP status
HTTP_STATUS = {
    "invalid_json": 400,
    "invalid_message": 400,
    "unknown_message_type": 400,
    "frame_too_large": 413,
    "unauthorized": 401,
    "not_registered": 403,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "overloaded": 429,
    "internal": 500,
}

#: paths served without the token
PUBLIC_PATHS = frozenset({"/", "/api/v1/health", "/favicon.ico"})

#: Sec-Fetch-Site values of a request that a page of another site (or another port) made
FOREIGN_SITES = frozenset({"cross-site", "same-site"})

#: On every response: not in a frame of another page (clickjacking), no content sniffing, no
#: Referer; the page loads its own script and style only (an injected one would not run).
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
}

WEB_KEY: web.AppKey[WebApp] = web.AppKey("retire_cluster_web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json", headers=headers)


def foreign_page(request: web.Request) -> str | None:
    """Why ``request`` looks sent by a browser for a page of another site, or None.

    ``Sec-Fetch-Site`` is set by the browser itself (a page cannot change it);
    browsers without it still send ``Origin`` on a cross-origin post. Programs
    (curl, scripts) send neither.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return f"Sec-Fetch-Site: {site}" if site.strip().lower() in FOREIGN_SITES else None
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    netloc = origin.partition("://")[2].rstrip("/").lower()
    if origin.strip().lower() == "null" or netloc != request.headers.get("Host", "").strip().lower():
        return f"Origin: {origin}"
    return None


def host_name(host_header: str) -> str:
    """The name in a Host header, without port, brackets or trailing dot, in lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


#: Retry-After of an ``overloaded`` answer that gives no wait of its own (the node holds too many
#: unfinished tasks: some must end first); the rate limit sets its own.
OVERLOADED_RETRY_AFTER_S = 5


def error_response(exc: ProtocolError, status: int | None = None) -> web.Response:
    headers = None
    if exc.code == "unauthorized":
        headers = {"WWW-Authenticate": 'Bearer realm="retire-cluster"'}
    elif exc.code == "overloaded":
        headers = {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)}
    return json_response(exc.to_data(), status or HTTP_STATUS.get(exc.code, 500), headers)


class RateLimiter:
    """A token bucket per source address: ``burst`` requests at once, refilled at ``rate`` a second.

    At most ``max_addresses`` buckets are kept (the least recently seen goes
    first), so a flood from many addresses cannot grow it without bound.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], max_addresses: int = 10_000) -> None:
        self.rate, self.burst, self.clock, self.max_addresses = rate, float(burst), clock, max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, address: str) -> float:
        """0.0 when a request from ``address`` may go ahead, else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[address] = (tokens, now)
        if len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        return wait


class HttpPeer:
    """Stands in for a TCP connection when a handler serves an HTTP request.

    It never registers (``device_id`` stays None), so the worker handlers
    answer ``not_registered`` as they would on a fresh TCP connection.
    """

    device_id: str | None = None

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.subscribed: set[str] = set()
        self.subscribed_all = False
        #: its task_submit waiting for the task's end (MainNode.wait_for_end)
        self.end_waits: set[Any] = set()

    def __repr__(self) -> str:
        return f"<HttpPeer {self.peer}>"


class WebApp:
    """The HTTP server of one :class:`MainNode`. ``await start(host, port)``, then ``await stop()``.

    Args:
        node: the main node whose handlers and state this serves.
        keepalive_s: seconds between ``: keep-alive`` comments on idle streams.
        ring_size: events each stream keeps for ``Last-Event-ID`` resume.
        ring_bytes: at most this many bytes of them (task events carry payloads and results).
        max_streams: open ``/stream/...`` responses in total; one more gets 429.
        max_pending: events that may wait for one slow stream reader before
            it is dropped (it reconnects and resumes from the ring).
        max_pending_bytes: the same in bytes.
        heartbeats_kept: recent heartbeats kept per device for ``/devices/{id}``.
        max_connections: open HTTP connections in total; each source address may
            have ``max_connections_per_address`` of them, as on the TCP port.
            One more is answered 429 and closed. An idle connection, or one whose
            request head is not complete, is closed after ``auth_timeout_s``.
    """

    def __init__(
        self,
        node: MainNode,
        *,
        keepalive_s: float = 15.0,
        ring_size: int = 1000,
        ring_bytes: int = RING_BYTES,
        max_streams: int = 100,
        max_pending: int = 1000,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        heartbeats_kept: int = 20,
        max_connections: int = 1024,
    ) -> None:
        from .metrics import Metrics

        self.node = node
        self.keepalive_s = keepalive_s
        self.max_streams = max_streams
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_connections = max_connections
        #: open HTTP connections (aiohttp's handlers) -> their source address
        self.connections: dict[Any, str] = {}
        self._per_address: dict[str, int] = {}
        self.streams = {name: Stream(name, ring_size, ring_bytes) for name in ("devices", "tasks", "logs")}
        self.metrics = Metrics(node, self)
        #: device id -> its recent heartbeats (newest last)
        self.heartbeats: dict[str, deque[dict[str, Any]]] = {}
        self._heartbeats_kept = heartbeats_kept
        self._dirty_devices: set[str] = set()
        self._flush_scheduled = False
        self._runner: web.AppRunner | None = None
        self._log_feed: LogFeed | None = None
        self.address: tuple[str, int] | None = None
        self.limiter = RateLimiter(node.config.client_rate_per_s, node.config.client_burst, node.clock)
        #: Host names an --insecure node answers besides IP addresses and localhost (DNS rebinding)
        self.own_names = _own_names(node.config.host, node.config.http_bind_host)
        self.app = self._build()

    # -- the application --------------------------------------------------

    def _build(self) -> web.Application:
        from .api import Api
        from .openapi import OpenApi
        from .text import TextApi

        app = web.Application(
            middlewares=[self._errors, self._rate, self._browser, self._auth],
            client_max_size=self.node.config.max_frame_bytes,
        )
        app[WEB_KEY] = self
        app.on_response_prepare.append(_security_headers)
        Api(self).add_routes(app.router)
        TextApi(self).add_routes(app.router)
        OpenApi(self).add_routes(app.router)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/text/metrics", self.metrics_route)
        for name in self.streams:
            app.router.add_get(f"/stream/{name}", self.stream_route)
        app.router.add_get("/", self.page)
        app.router.add_get("/static/{filename}", self.static_route)
        return app

    @property
    def open_streams(self) -> int:
        return sum(len(s.subscribers) for s in self.streams.values())

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes a JSON body with a wire code (see HTTP_STATUS)."""
        try:
            return await handler(request)
        except ProtocolError as exc:
            if isinstance(exc, InternalError):
                log.error("internal error answering %s %s: %s", request.method, request.path, exc.message)
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_response(FrameTooLarge(
                f"The request body is larger than {self.node.config.max_frame_bytes} bytes "
                "(the main node's max_frame_bytes)."))  # fmt: skip
        except web.HTTPNotFound:
            return error_response(NotFound(f"No route {request.path}; GET /api/v1/openapi.json lists them."))
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            response = error_response(
                InvalidMessage(f"{request.method} is not allowed on {request.path}; use {allowed}."), 405
            )
            response.headers["Allow"] = allowed
            return response
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error [%s] answering %s %s", ref, request.method, request.path)
            return error_response(
                InternalError(f"Internal error (reference {ref}); the main node's log has the details.")
            )

    @web.middleware
    async def _rate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The TCP port's client rate limit, per source address (HTTP connections come and go)."""
        wait = self.limiter.take(request.remote or "")
        if wait:
            response = error_response(Overloaded(
                f"More than {self.node.config.client_rate_per_s:g} requests per second from this address "
                f"(bursts up to {self.node.config.client_burst}); retry after {wait:.2g} s."))  # fmt: skip
            response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
        return await handler(request)

    @web.middleware
    async def _browser(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse what a page of another site made a browser send (CSRF), and DNS rebinding."""
        if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
            return await handler(request)
        why = foreign_page(request)
        if why is not None:
            raise Forbidden(
                f"Refused a request a browser sent for a page of another site ({why}); the dashboard's own "
                "requests come from its page, and programs send no such header."
            )
        if self.node.token is None:
            name = host_name(request.headers.get("Host", ""))
            if name and not self._known_host(name):
                raise Forbidden(
                    f"Refused a request to the host name {name!r}: an --insecure main node answers only its "
                    "IP address, localhost and its own host name, since any web page can point a name of "
                    "its own at this address (DNS rebinding). Use the IP address, or run with a token."
                )
        return await handler(request)

    def _known_host(self, name: str) -> bool:
        try:
            ipaddress.ip_address(name.partition("%")[0])
            return True
        except ValueError:
            pass
        return name == "localhost" or name.endswith(".localhost") or name in self.own_names

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.node.token is None or request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self.node.token_ok(token.strip()):
            raise Unauthorized(
                "Send the cluster token as `Authorization: Bearer TOKEN`; "
                "`retire-cluster token` on the main node prints it."
            )
        return await handler(request)

    # -- calling the node's handlers ----------------------------------------

    async def call(self, message_type: str, data: dict[str, Any], request: web.Request | None = None) -> Any:
        """Run one request through the node exactly as if it came over TCP.

        Returns the ``ack`` result. Raises the handler's RemoteProtocolError
        (the caller's middleware turns it into a JSON error).
        """
        peer = f"http:{request.remote}" if request is not None else "http:dashboard"
        msg = Message(message_type, new_message_id(), "http-api", data,
                      timestamp=utc_timestamp(self.node.clock()))  # fmt: skip
        self.node.validator.validate(msg)
        http_peer = HttpPeer(peer)
        result = self.node.handlers.handle(http_peer, msg)  # type: ignore[arg-type]
        if isinstance(result, Awaitable):
            # The HTTP client may go away (aiohttp then cancels this handler): the
            # node's own futures must not be cancelled with it, only the reply dropped,
            # and a wait for a task's end (``?wait=``) with it.
            try:
                result = await asyncio.shield(result)
            except asyncio.CancelledError:
                self.node.abandon_waits(http_peer)
                raise
        return result

    # -- lifecycle --------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound (host, port). Raises HTTPBindError."""
        loop = asyncio.get_running_loop()
        self._log_feed = LogFeed(self.streams["logs"], loop)
        logging.getLogger("retire_cluster").addHandler(self._log_feed)
        self.node.add_listener(self.on_node_event)
        # handler_cancellation: a reader that hangs up ends its event stream at once
        # (and frees its place among max_streams), not at the next keep-alive write.
        # keepalive_timeout: aiohttp closes a connection that sends no complete request head
        # (slowloris) or stays idle for that long; its default is an hour.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                               handler_cancellation=True, keepalive_timeout=self.node.config.auth_timeout_s)
        await runner.setup()
        self._runner = runner
        assert runner.server is not None
        self._count_connections(runner.server)
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise HTTPBindError(
                exc.errno or 0,
                f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc}); "
                "choose another --http-port, or --no-http",
            ) from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    async def stop(self) -> None:
        """Close the streams, then the listening socket and open requests."""
        self.node.remove_listener(self.on_node_event)
        if self._log_feed is not None:
            logging.getLogger("retire_cluster").removeHandler(self._log_feed)
            self._log_feed = None
        for stream in self.streams.values():
            stream.close_all()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _count_connections(self, server: web.Server) -> None:
        """Cap the HTTP connections in total and per source address, as the TCP port does.

        Without it, one device could open connections until the main node runs
        out of file descriptors, and workers could no longer connect to it.
        """
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            count = self._per_address.get(host, 0)
            per_address = self.node.config.max_connections_per_address
            if len(self.connections) >= self.max_connections:
                why = f"The main node has {self.max_connections} HTTP connections open, its maximum; try again later."
            elif count >= per_address:
                why = f"{host} has {per_address} HTTP connections open, the maximum per address; close some first."
            else:
                self.connections[handler] = host
                self._per_address[host] = count + 1
                return
            body = dumps(Overloaded(why).to_data())
            transport.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nRetry-After: 2\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            transport.close()

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            host = self.connections.pop(handler, None)
            if host is not None:
                left = self._per_address[host] - 1
                if left:
                    self._per_address[host] = left
                else:
                    del self._per_address[host]
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- events from the node ---------------------------------------------

    def on_node_event(self, kind: str, obj: Any) -> None:
        """The node's listener: ``("task", Task)`` from publish(), ``("device", Device)``, ``("forget", Device)``."""
        if kind == "task":
            self._task_changed(obj)
        elif kind == "forget":  # offline for forget_offline_after_s: gone from every view
            self.heartbeats.pop(obj.device_id, None)
            self._dirty_devices.discard(obj.device_id)
            self.streams["devices"].emit("forget", {"device_id": obj.device_id}, obj.device_id)
        elif kind == "device":
            # Heartbeats arrive in bursts: one event per device per loop pass.
            self._dirty_devices.add(obj.device_id)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_devices)

    def _task_changed(self, task: Task) -> None:
        self.metrics.on_task(task)
        self.streams["tasks"].emit("task", task.to_record(), task.task_id)

    def _flush_devices(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty_devices = self._dirty_devices, set()
        stream = self.streams["devices"]
        for device_id in sorted(dirty):
            device = self.node.registry.get(device_id)
            if device is not None:
                self._remember_heartbeat(device)
                # Device events are snapshots: with nobody listening, skip the
                # costly record (a busy node sees tens of thousands a second).
                if stream.subscribers:
                    stream.emit("device", device.to_record(), device_id)
                else:
                    stream.skip()

    def _remember_heartbeat(self, device: Device) -> None:
        if not device.last_seen:
            return
        kept = self.heartbeats.get(device.device_id)
        if kept is None:
            kept = self.heartbeats[device.device_id] = deque(maxlen=self._heartbeats_kept)
        at = utc_timestamp(device.last_seen)
        if kept and kept[-1]["at"] == at:
            return
        kept.append({"at": at, "status": device.status.value, "active_tasks": len(device.running),
                     "system_metrics": dict(device.metrics)})  # fmt: skip

    # -- routes that are not part of the JSON API ---------------------------

    async def metrics_route(self, request: web.Request) -> web.Response:
        body, content_type = await self.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def static_route(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's script and style (index.html is ``/``); revalidated on each load."""
        name = request.match_info["filename"]
        if name not in STATIC_FILES:
            raise NotFound(f"No file {name!r} in /static/; the dashboard is at /.")
        return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

    async def stream_route(self, request: web.Request) -> web.StreamResponse:
        """``/stream/{devices,tasks,logs}``: Server-Sent Events, resumable with Last-Event-ID."""
        from .events import KEEPALIVE, Subscriber, format_event

        name = request.path.rsplit("/", 1)[1]
        stream = self.streams[name]
        accept = _stream_filter(name, request)
        if self.open_streams >= self.max_streams:
            refused = error_response(
                Overloaded(f"{self.max_streams} event streams are open, the maximum; close some first."))
            refused.headers["Retry-After"] = "2"
            return refused
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        sub = Subscriber(accept, self.max_pending, self.max_pending_bytes)
        resumed = stream.subscribe(sub, last_id)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            await response.prepare(request)
            head = b"retry: 2000\n\n"
            if not resumed:
                head += format_event(stream.last_id, "reset", {"reason": "missed events; reload the state"})
            elif last_id is None and name == "devices":
                devices = [d.to_record() for d in sorted(self.node.registry, key=lambda d: d.device_id)]
                head += format_event(stream.last_id, "snapshot", {"devices": devices})
            await response.write(head)
            while not sub.closed:
                if not sub.pending:
                    try:
                        await asyncio.wait_for(sub.wake.wait(), self.keepalive_s)
                    except asyncio.TimeoutError:
                        await response.write(KEEPALIVE)
                        continue
                data = sub.take()
                if data:
                    await response.write(data)
        except ConnectionResetError:
            pass  # the reader went away
        finally:
            stream.unsubscribe(sub)
        if sub.dropped:
            log.info("dropped a slow /stream/%s reader %s (it can resume with Last-Event-ID)", name, request.remote)
        return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)


def _own_names(*hosts: str | None) -> frozenset[str]:
    """This machine's host name (``nas``, ``nas.local``, ``nas.home.lan``) and the names it listens on."""
    names = {host_name(h) for h in hosts if h}
    own = host_name(socket.gethostname())
    if own:
        short = own.partition(".")[0]
        names |= {own, short, f"{short}.local"}
    names.discard("")
    return frozenset(names)


def _stream_filter(name: str, request: web.Request) -> Callable[[str | None], bool] | None:
    """``?task_id=A&task_id=B`` on /stream/tasks, ``?device_id=`` on devices, ``?level=`` on logs."""
    from .api import refuse_repeated

    unknown = set(request.query) - {"last_event_id", {"tasks": "task_id", "devices": "device_id",
                                                       "logs": "level"}[name]}
    if unknown:
        raise InvalidMessage(f"unknown query parameter {sorted(unknown)[0]!r} on /stream/{name}.",
                             path=f"?{sorted(unknown)[0]}")
    refuse_repeated(request, frozenset({"task_id", "device_id"}))
    if name == "logs":
        level = request.query.get("level")
        if level is None:
            return None
        order = ["debug", "info", "warning", "error", "critical"]
        if level not in order:
            raise InvalidMessage(f"level must be one of {', '.join(order)}.", path="?level")
        wanted = set(order[order.index(level):])
        return lambda key: key in wanted
    keys = set(request.query.getall("task_id" if name == "tasks" else "device_id", []))
    if not keys:
        return None
    return lambda key: key in keys
