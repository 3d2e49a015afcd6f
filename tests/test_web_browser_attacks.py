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
from pathlib import Path
from typing import Any

from conftest import Peer, make_config

from retire_cluster.main import MainNode

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
