"""What a hostile web page can make a browser on the home network do to the main node.

The page's browser can reach the main node's ports (it is on the LAN, or on the
main node's own box), but it does not hold the token, and everything it sends
is a request a browser lets any page send: ``fetch`` with a ``text/plain`` body
(no CORS preflight), a form post, a ``Host`` header of the attacker's own domain
name pointed at the main node (DNS rebinding). With a token these requests are
answered ``unauthorized``; these tests are about what is left: an ``--insecure``
node, the TCP port, and the HTTP port's own connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from conftest import Peer, make_config
from webutil import Cluster, eventually, start_cluster

from retire_cluster.main import MainNode
from retire_cluster.web.events import Stream, Subscriber

TASK_FRAME = {"message_type": "task_submit", "message_id": "evil-1", "sender_id": "web-page",
              "data": {"task": {"task_type": "echo", "payload": {"message": "from a web page"}}}}


async def _exchange(address: Any, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection, then read until the main node closes it."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


# -- the TCP port: a browser speaking HTTP to it -----------------------------------------------


async def test_an_http_request_to_the_tcp_port_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """fetch('http://main:8080/', {method: 'POST', body: '\\n{...task_submit...}\\n'}) from any page.

    An --insecure node took every JSON line of the body as a request and ran the task.
    """
    node = MainNode(make_config(tmp_path, insecure=True), run_monitor=False)
    await node.start()
    try:
        body = b"\n" + json.dumps(TASK_FRAME).encode() + b"\n"
        request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
                   b"Content-Type: text/plain;charset=UTF-8\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        answer = await _exchange(node.address, request)
        head, _, reply = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert reply.count(b"\n") == 1, answer  # one error; the body's frame got no answer
        error = json.loads(reply)
        assert error["data"]["code"] == "invalid_json" and "not HTTP" in error["data"]["error"]
        # Nothing was submitted, and the port still serves JSON peers.
        peer = await Peer.connect(node, token=None)
        assert (await peer.ok("task_list", {}))["tasks"] == []
    finally:
        await node.stop()


async def test_a_json_peer_is_not_mistaken_for_http(tmp_path: Path) -> None:
    node = MainNode(make_config(tmp_path, insecure=True), run_monitor=False)
    await node.start()
    try:
        peer = await Peer.connect(node, token=None)
        await peer.send_raw(b"\n\n")  # empty lines first are fine, as before
        assert (await peer.ok("cluster_status"))["queue_length"] == 0
    finally:
        await node.stop()


# -- the HTTP port ---------------------------------------------------------------------------------

SUBMIT = {"task_type": "echo", "payload": {"message": "from a web page"}}


@pytest.fixture
async def insecure(tmp_path: Path):
    c = await start_cluster(tmp_path, worker=False, insecure=True)
    try:
        yield c
    finally:
        await c.close()


async def _no_tasks(c: Cluster) -> bool:
    return (await c.ok("GET", "/api/v1/tasks"))["tasks"] == []


@pytest.mark.parametrize("headers", [
    # fetch('http://main:5000/api/v1/tasks', {method: 'POST', mode: 'no-cors', body}) from another site
    {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
     "Sec-Fetch-Mode": "no-cors"},
    # the same from another port of the same address (another web app on the box): same-site
    {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-site"},
    # a browser without Sec-Fetch-*: Origin alone; a sandboxed frame or a data: URL sends "null"
    {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"},
    {"Content-Type": "text/plain", "Origin": "null"},
])
async def test_a_post_that_another_site_made_a_browser_send_is_refused(insecure: Cluster,
                                                                       headers: Dict[str, str]) -> None:
    for path, body in (("/api/v1/tasks", SUBMIT), ("/api/v1/command", {"command": "submit echo message=x"})):
        status, answer = await insecure.request("POST", path, data=json.dumps(body), headers=headers)
        assert status == 403 and answer["code"] == "forbidden", (path, status, answer)
    assert await _no_tasks(insecure)


async def test_reads_and_streams_for_another_site_are_refused_too(insecure: Cluster) -> None:
    foreign = {"Sec-Fetch-Site": "cross-site"}
    for path in ("/api/v1/tasks", "/stream/tasks", "/text/tasks", "/metrics"):
        status, answer = await insecure.request("GET", path, headers=foreign)
        assert status == 403 and answer["code"] == "forbidden", (path, status, answer)
    # The page itself may be linked from anywhere.
    status, _ = await insecure.request("GET", "/", headers=foreign)
    assert status == 200


async def test_the_dashboard_and_programs_still_get_through(insecure: Cluster) -> None:
    port = insecure.node.http_address[1]
    same_origin = {"Sec-Fetch-Site": "same-origin", "Origin": f"http://127.0.0.1:{port}"}
    await insecure.ok("POST", "/api/v1/tasks", json=SUBMIT, headers=same_origin)
    await insecure.ok("POST", "/api/v1/tasks", json=SUBMIT, headers={"Origin": f"http://127.0.0.1:{port}"})
    await insecure.ok("POST", "/api/v1/tasks", json=SUBMIT)  # curl: neither header
    await insecure.ok("GET", "/api/v1/tasks", headers={"Sec-Fetch-Site": "none"})  # typed in the address bar


@pytest.mark.parametrize("host", ["evil.example", "rebind.evil.example:5000", "127.0.0.1.nip.io"])
async def test_an_insecure_node_refuses_a_host_name_it_does_not_have(insecure: Cluster, host: str) -> None:
    """DNS rebinding: the page's own name now resolves to the main node, so the browser lets it read the
    answers; only the Host header tells."""
    for method, path, kw in (("GET", "/api/v1/tasks", {}), ("POST", "/api/v1/tasks", {"json": SUBMIT}),
                             ("GET", "/stream/logs", {})):
        status, answer = await insecure.request(method, path, headers={"Host": host}, **kw)
        assert status == 403 and "DNS rebinding" in answer["error"], (path, status, answer)
    assert await _no_tasks(insecure)


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "[::1]:5000", "localhost", "LOCALHOST.:80", "192.168.1.10",
                                  socket.gethostname()])
async def test_an_insecure_node_answers_addresses_localhost_and_its_own_name(insecure: Cluster, host: str) -> None:
    status, _ = await insecure.request("GET", "/api/v1/tasks", headers={"Host": host})
    assert status == 200


async def test_a_node_with_a_token_answers_any_host_name(tmp_path: Path) -> None:
    c = await start_cluster(tmp_path, worker=False)
    try:
        status, _ = await c.request("GET", "/api/v1/tasks", headers={"Host": "nas.home.arpa:5000"})
        assert status == 200
        # and a page of another site gets nothing without the token anyway
        status, answer = await c.request("POST", "/api/v1/tasks", auth=False, data=json.dumps(SUBMIT),
                                         headers={"Content-Type": "text/plain"})
        assert status == 401
    finally:
        await c.close()


async def test_every_response_refuses_framing_sniffing_and_referrers(insecure: Cluster) -> None:
    for path in ("/", "/static/dashboard.js", "/api/v1/health", "/api/v1/tasks", "/no/such/route"):
        async with insecure.session.get(insecure.url(path)) as resp:
            h = resp.headers
            assert h["X-Frame-Options"] == "DENY", path
            assert "frame-ancestors 'none'" in h["Content-Security-Policy"], path
            assert "script-src" not in h["Content-Security-Policy"]  # default-src 'self' covers it
            assert h["X-Content-Type-Options"] == "nosniff" and h["Referrer-Policy"] == "no-referrer", path


async def _held_open(host: str, port: int, data: bytes) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_a_request_head_that_never_ends_is_closed_at_the_auth_timeout(tmp_path: Path) -> None:
    """Slowloris: aiohttp's default let a half-sent request hold its connection for an hour."""
    c = await start_cluster(tmp_path, worker=False, auth_timeout_s=0.2)
    try:
        host, port = c.node.http_address
        reader, writer = await _held_open(host, port, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-a: ")
        idle_reader, idle_writer = await _held_open(host, port, b"")
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        finally:
            writer.close()
            idle_writer.close()
    finally:
        await c.close()


async def test_http_connections_are_capped_per_address(tmp_path: Path) -> None:
    """One device opening connections until the main node runs out of file descriptors locks every
    worker out of the TCP port; the HTTP port now has the TCP port's per-address cap."""
    c = await start_cluster(tmp_path, worker=False, max_connections_per_address=3)
    try:
        host, port = c.node.http_address
        held = [await _held_open(host, port, b"") for _ in range(3)]
        await eventually(lambda: _now(len(c.node.web.connections) == 3))
        reader, writer = await _held_open(host, port, b"")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 429 ") and b'"overloaded"' in answer, answer
        held.pop()[1].close()
        await eventually(lambda: _now(len(c.node.web.connections) == 2))
        status, _ = await c.request("GET", "/api/v1/health", auth=False)
        assert status == 200
        for _, w in held:
            w.close()
        await eventually(lambda: _now(not c.node.web.connections and not c.node.web._per_address))
    finally:
        await c.close()


async def test_http_connections_are_capped_in_total(tmp_path: Path) -> None:
    c = await start_cluster(tmp_path, worker=False)
    try:
        c.node.web.max_connections = 1
        host, port = c.node.http_address
        _, first = await _held_open(host, port, b"")
        await eventually(lambda: _now(len(c.node.web.connections) == 1))
        reader, writer = await _held_open(host, port, b"")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 429 ")
        writer.close()
        first.close()
    finally:
        await c.close()


async def _now(value: Any) -> Any:
    return value


# -- event streams: bounded in bytes, not only in events ------------------------------------------


def test_the_event_ring_is_bounded_in_bytes() -> None:
    """Each task event carries payload and result (up to ~1 MiB each): 1,000 of them kept gigabytes."""
    stream = Stream("tasks", ring_size=1000, ring_bytes=10_000)
    big = "x" * 3000
    for n in range(10):
        stream.emit("task", {"n": n, "payload": big}, "k")
    kept = sum(len(frame) for _, _, frame in stream._ring)
    assert kept <= 10_000 and len(stream._ring) == 3
    assert stream.subscribe(Subscriber(), "6") is False  # evicted: the reader reloads (reset)
    assert stream.subscribe(Subscriber(), "7") is True
    # One event bigger than the whole budget is still kept (the newest always is).
    stream.emit("task", {"payload": "y" * 20_000}, "k")
    assert len(stream._ring) == 1 and stream.subscribe(Subscriber(), str(stream.last_id - 1)) is True


def test_a_subscriber_is_dropped_by_bytes_waiting() -> None:
    stream = Stream("tasks")
    slow = Subscriber(max_pending=1000, max_pending_bytes=10_000)
    stream.subscribe(slow, None)
    stream.emit("task", {"payload": "y" * 20_000}, "k")  # alone, it may exceed the budget
    assert not slow.closed and slow.pending_bytes > 10_000
    slow.take()
    for _ in range(3):
        stream.emit("task", {"payload": "x" * 4000}, "k")
    assert slow.dropped and slow.closed and slow.pending == []


async def test_big_tasks_do_not_pile_up_in_the_main_node(tmp_path: Path) -> None:
    c = await start_cluster(tmp_path, worker=False)
    try:
        web = c.node.web
        for stream in web.streams.values():
            stream.ring_bytes = 300_000
        for _ in range(8):
            await c.submit("echo", {"message": "x" * 100_000})
        tasks = web.streams["tasks"]
        assert tasks.last_id == 8 and sum(len(f) for _, _, f in tasks._ring) <= 300_000
    finally:
        await c.close()
