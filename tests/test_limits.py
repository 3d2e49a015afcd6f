"""The main node's limits against hostile peers, each over real TCP on 127.0.0.1.

Every limit is a MainConfig field; tests set tiny values (0.2 s timeouts, caps
of 2) instead of waiting for the defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from conftest import FakeClock, Peer, make_config, register_data

from retire_cluster.main import ConfigError, MainConfig, MainNode
from retire_cluster.main.server import Connection, raise_open_files_limit


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def make_node(tmp_path: Path, clock: FakeClock):
    nodes: List[MainNode] = []

    async def make(**overrides: Any) -> MainNode:
        node = MainNode(make_config(tmp_path / f"n{len(nodes)}", **overrides), clock=clock, run_monitor=False)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()


def frame(mid: str, message_type: str = "cluster_status", token: Any = None, **data: Any) -> bytes:
    obj: Dict[str, Any] = {"message_type": message_type, "message_id": mid, "sender_id": "c", "data": data}
    if token is not None:
        obj["auth_token"] = token
    return json.dumps(obj).encode() + b"\n"


def conn_of(node: MainNode, predicate: Callable[[Connection], bool] = lambda c: True) -> Connection:
    (conn,) = [c for c in node.server.connections if predicate(c)]
    return conn


# -- configuration --------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    config = MainConfig()
    assert config.max_frame_bytes == 1024 * 1024
    assert config.max_preauth_frame_bytes == 16 * 1024
    assert config.max_json_depth == 32
    assert config.max_connections == 10_000
    assert config.max_connections_per_address == 64
    assert config.auth_timeout_s == 10.0
    assert config.max_send_queue_bytes == 8 * 1024 * 1024
    assert config.drain_timeout_s == 30.0
    assert (config.client_rate_per_s, config.client_burst) == (5000.0, 10_000)
    assert config.tls_cert is None and config.tls_key is None


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"max_preauth_frame_bytes": 100}, "max_preauth_frame_bytes"),
        ({"max_json_depth": 1}, "max_json_depth"),
        ({"max_json_depth": 1000}, "max_json_depth"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections_per_address": 0}, "max_connections_per_address"),
        ({"auth_timeout_s": 0}, "auth_timeout_s"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"max_send_queue_bytes": 1000}, "max_send_queue_bytes"),
        ({"client_rate_per_s": 0}, "client_rate_per_s"),
        ({"client_burst": 0}, "client_burst"),
        ({"tls_cert": "cert.pem"}, "tls_key"),
    ],
)
def test_bad_limits_are_refused(overrides: Dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        MainConfig(**overrides)


def test_limits_load_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "main.json"
    path.write_text(
        json.dumps({"max_connections": 50, "auth_timeout_s": 2.5, "tls_cert": "c.pem", "tls_key": "k.pem"})
    )
    config = MainConfig().with_overrides(MainConfig.from_file(path))
    assert config.max_connections == 50 and config.auth_timeout_s == 2.5
    assert config.tls_cert == Path("c.pem") and config.tls_key == Path("k.pem")


def test_open_files_limit_is_raised_within_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        got = raise_open_files_limit(soft + 10)
        assert got >= min(soft + 10, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- frame size before and after authentication -----------------------------------------


async def test_preauth_frames_are_limited_to_16_kib(make_node) -> None:
    node = await make_node()
    big = frame("big", "task_submit", task={"task_type": "echo", "payload": {"m": "x" * 17_000}})
    anon = await Peer.connect(node, "anon", token=None)
    await anon.send_raw(big)
    reply = await anon.recv()
    assert reply["data"]["code"] == "frame_too_large" and "16384" in reply["data"]["error"]
    assert await anon.closed_by_peer()
    # The same frame is fine once authenticated.
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    await client.send_raw(big)
    assert (await client.recv())["message_type"] == "ack"


async def test_a_big_frame_right_after_the_authenticating_one_is_accepted(make_node) -> None:
    node = await make_node()
    peer = await Peer.connect(node, token=None)
    big = frame("big", "task_submit", task={"task_type": "echo", "payload": {"m": "y" * 40_000}})
    await peer.send_raw(frame("auth", token=node.token) + big)  # one write, one chunk
    got = {(await peer.recv())["data"]["original_message_id"] for _ in range(2)}
    assert got == {"auth", "big"}


async def test_an_unterminated_preauth_frame_cannot_grow_past_the_limit(make_node) -> None:
    node = await make_node(max_preauth_frame_bytes=1024)
    peer = await Peer.connect(node, token=None)
    await peer.send_raw(b'{"message_type":"' + b"a" * 2000)
    assert (await peer.recv())["data"]["code"] == "frame_too_large"
    assert await peer.closed_by_peer()


async def test_insecure_node_has_the_full_frame_size_at_once(make_node) -> None:
    node = await make_node(insecure=True, auth_timeout_s=0.05)
    peer = await Peer.connect(node, token=None)
    await peer.send_raw(
        frame("big", "task_submit", task={"task_type": "echo", "payload": {"m": "z" * 20_000}})
    )
    assert (await peer.recv())["message_type"] == "ack"
    await asyncio.sleep(0.2)  # well past auth_timeout_s: no deadline without auth
    await peer.ok("cluster_status")


async def test_json_depth_limit_is_configurable(make_node) -> None:
    node = await make_node(max_json_depth=4)
    peer = await Peer.connect(node)
    ok = await peer.request("task_submit", {"task": {"task_type": "echo", "payload": {}}})
    assert ok["message_type"] == "ack"  # frame 1, data 2, task 3, payload 4
    await peer.send("task_submit", {"task": {"task_type": "echo", "payload": {"a": []}}})
    deep = await peer.recv()  # refused unparsed: the reply cannot name the message_id
    assert deep["data"]["code"] == "invalid_json" and "deeper than 4" in deep["data"]["error"]
    assert deep["data"]["original_message_id"] is None


# -- authentication deadline ------------------------------------------------------------


async def test_connection_not_authenticated_in_time_is_closed(make_node) -> None:
    node = await make_node(auth_timeout_s=0.2)
    idle = await Peer.connect(node, "idle", token=None)
    talker = await Peer.connect(node, "talker", token=None)
    assert (await talker.request("cluster_status"))["data"]["code"] == "unauthorized"
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    for peer in (idle, talker):
        reply = await peer.recv()
        assert reply["data"]["code"] == "unauthorized" and "within 0.2 s" in reply["data"]["error"]
        assert await peer.closed_by_peer()
        await peer.close()
    await wait_until(lambda: len(node.server.connections) == 1)
    await asyncio.sleep(0.2)
    await client.ok("cluster_status")  # authenticated in time: no deadline any more


async def test_slow_sender_is_closed_at_the_auth_deadline(make_node) -> None:
    node = await make_node(auth_timeout_s=0.3)
    peer = await Peer.connect(node, token=None)
    closing = asyncio.ensure_future(peer.closed_by_peer(timeout=10))
    for byte in frame("slow", token=node.token)[:20]:
        if closing.done():
            break
        await peer.send_raw(bytes([byte]))
        await asyncio.sleep(0.05)
    assert await closing
    await peer.close()
    await wait_until(lambda: not node.server.connections)


# -- connection caps --------------------------------------------------------------------


async def test_total_connection_cap_answers_overloaded(make_node) -> None:
    node = await make_node(max_connections=2)
    first = await Peer.connect(node, "a")
    second = await Peer.connect(node, "b")
    await first.ok("cluster_status")
    await second.ok("cluster_status")
    third = await Peer.connect(node, "c")
    reply = await third.recv()
    assert reply["data"]["code"] == "overloaded" and reply["data"]["original_message_id"] is None
    assert "2 connections" in reply["data"]["error"]
    assert await third.closed_by_peer()
    await first.close()
    await wait_until(lambda: len(node.server.connections) == 1)
    fourth = await Peer.connect(node, "d")
    await fourth.ok("cluster_status")
    assert node.server.per_host == {"127.0.0.1": 2}


async def test_per_address_cap_answers_overloaded(make_node) -> None:
    node = await make_node(max_connections_per_address=2)
    peers = [await Peer.connect(node, f"p{i}") for i in range(2)]
    for peer in peers:
        await peer.ok("cluster_status")
    extra = await Peer.connect(node, "extra")
    reply = await extra.recv()
    assert reply["data"]["code"] == "overloaded" and "127.0.0.1 has 2 connections" in reply["data"]["error"]
    assert await extra.closed_by_peer()
    assert node.server.per_host == {"127.0.0.1": 2}
    for peer in peers:
        await peer.close()
    await wait_until(lambda: not node.server.per_host and not node.server.connections)


# -- request rate -----------------------------------------------------------------------


async def test_client_rate_limit_answers_overloaded_per_request(make_node) -> None:
    node = await make_node(client_burst=5, client_rate_per_s=0.001)
    client = await Peer.connect(node)
    await client.send_raw(b"".join(frame(f"m{i}", token=node.token) for i in range(8)))
    replies = {}
    for _ in range(8):
        reply = await client.recv()
        replies[reply["data"]["original_message_id"]] = reply["data"].get("code", "ack")
    assert replies == {
        "m0": "ack",
        "m1": "ack",
        "m2": "ack",
        "m3": "ack",
        "m4": "ack",
        "m5": "overloaded",
        "m6": "overloaded",
        "m7": "overloaded",
    }
    other = await Peer.connect(node, "other")  # per connection: another one has its own bucket
    await other.ok("cluster_status")


async def test_rate_limit_refills(make_node) -> None:
    node = await make_node(client_burst=1, client_rate_per_s=20.0)
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    assert (await client.request("cluster_status"))["data"]["code"] == "overloaded"
    await asyncio.sleep(0.1)  # two tokens' worth; the bucket holds one
    await client.ok("cluster_status")


async def test_registered_workers_are_exempt_from_the_rate_limit(make_node) -> None:
    node = await make_node(client_burst=2, client_rate_per_s=0.001)
    worker = await Peer.connect(node, "dev-1")
    assert (await worker.request("register", register_data()))["message_type"] == "ack"
    frames = b"".join(
        json.dumps(
            {
                "message_type": "heartbeat",
                "message_id": f"h{i}",
                "sender_id": "dev-1",
                "data": {"status": "online", "active_tasks": 0},
            }
        ).encode()
        + b"\n"
        for i in range(50)
    )
    await worker.send_raw(frames)
    replies = [await worker.reply_to(f"h{i}") for i in range(50)]
    assert all(r["message_type"] == "ack" for r in replies)


async def test_over_the_rate_a_reply_frame_gets_no_reply(make_node) -> None:
    node = await make_node(client_burst=1, client_rate_per_s=0.001)
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    ack = (
        json.dumps(
            {
                "message_type": "ack",
                "message_id": "a1",
                "sender_id": "c",
                "data": {"original_message_id": "x", "result": {}},
            }
        ).encode()
        + b"\n"
    )
    await client.send_raw(ack + frame("after"))
    reply = await client.recv()
    assert reply["data"]["original_message_id"] == "after" and reply["data"]["code"] == "overloaded"


# -- peers that do not read -------------------------------------------------------------


def non_reading_socket(node: MainNode, token: str) -> socket.socket:
    """A client that authenticates and then never reads (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(node.address)
    sock.sendall(frame("auth", token=token))
    return sock


async def test_peer_that_does_not_read_is_dropped_at_the_send_queue_bound(make_node, caplog) -> None:
    node = await make_node(max_send_queue_bytes=256 * 1024, drain_timeout_s=60)
    sock = non_reading_socket(node, node.token)
    try:
        await wait_until(lambda: any(c.authenticated for c in node.server.connections))
        conn = conn_of(node, lambda c: c.authenticated)
        chunk = b'{"message_type":"task_update","pad":"' + b"x" * 65_000 + b'"}\n'
        sent = 0
        with caplog.at_level(logging.WARNING, logger="retire_cluster.server"):
            while not conn.closed and sent < 256 * 1024 * 1024:
                conn.send_bytes(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)
        assert conn.closed and sent < 256 * 1024 * 1024
        await wait_until(lambda: conn not in node.server.connections)
        assert any("does not read its replies" in r.getMessage() for r in caplog.records)
        bystander = await Peer.connect(node)
        await bystander.ok("cluster_status")
    finally:
        sock.close()


async def test_peer_that_stops_reading_is_dropped_after_the_drain_timeout(make_node, caplog) -> None:
    node = await make_node(drain_timeout_s=0.3)
    sock = non_reading_socket(node, node.token)
    try:
        await wait_until(lambda: any(c.authenticated for c in node.server.connections))
        conn = conn_of(node, lambda c: c.authenticated)
        chunk = b'{"message_type":"task_update","pad":"' + b"x" * 65_000 + b'"}\n'
        while not conn._write_paused:  # fill the kernel buffers, well under max_send_queue_bytes
            conn.send_bytes(chunk)
            await asyncio.sleep(0)
        with caplog.at_level(logging.WARNING, logger="retire_cluster.server"):
            await wait_until(lambda: conn not in node.server.connections)
        assert any("read nothing for 0.3 s" in r.getMessage() for r in caplog.records)
    finally:
        sock.close()


async def test_reading_resumes_the_connection(make_node) -> None:
    node = await make_node(drain_timeout_s=0.3)
    peer = await Peer.connect(node)
    await peer.ok("cluster_status")
    conn = conn_of(node)
    conn.pause_writing()  # as the transport does when the kernel buffer is full
    assert conn._drain_timer is not None
    conn.resume_writing()
    assert conn._drain_timer is None
    await asyncio.sleep(0.4)
    await peer.ok("cluster_status")


# -- crashes inside the main node ---------------------------------------------------------


async def test_unencodable_handler_result_is_internal_and_the_connection_carries_on(
    make_node, monkeypatch, caplog
) -> None:
    node = await make_node()
    monkeypatch.setitem(node.handlers._table, "cluster_status", lambda conn, msg: {"x": object()})
    peer = await Peer.connect(node)
    with caplog.at_level(logging.ERROR):
        reply = await peer.request("cluster_status")
    assert reply["data"]["code"] == "internal" and "object" not in reply["data"]["error"]
    ref = reply["data"]["error"].split("reference ")[1].split(")")[0]
    assert any(ref in r.getMessage() for r in caplog.records)
    assert (await peer.ok("list_devices"))["devices"] == []


async def test_crash_in_dispatch_is_internal_with_a_reference(make_node, monkeypatch, caplog) -> None:
    node = await make_node()
    real = node.dispatch

    def flaky(conn: Any, event: Any) -> None:
        if getattr(event, "message_id", None) == "boom":
            raise RuntimeError("secret detail")
        real(conn, event)

    monkeypatch.setattr(node, "dispatch", flaky)
    peer = await Peer.connect(node)
    await peer.ok("cluster_status")
    with caplog.at_level(logging.ERROR):
        await peer.send_raw(frame("boom") + frame("next"))
        first, second = await peer.recv(), await peer.recv()
    assert first["data"]["original_message_id"] == "boom" and first["data"]["code"] == "internal"
    assert "secret" not in json.dumps(first)
    ref = first["data"]["error"].split("reference ")[1].split(")")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)
    assert second["data"]["original_message_id"] == "next" and second["message_type"] == "ack"


async def test_crash_in_the_codec_closes_only_that_connection(make_node, caplog) -> None:
    node = await make_node()
    victim = await Peer.connect(node, "victim")
    await victim.ok("cluster_status")
    bystander = await Peer.connect(node, "bystander")
    await bystander.ok("cluster_status")
    conn = conn_of(node, lambda c: c.peer.endswith(str(victim.writer.get_extra_info("sockname")[1])))

    def broken(data: bytes) -> list:
        raise RuntimeError("codec bug")

    # slots: replace the whole stream (no frame is whole to it, so none skips feed)
    conn.stream = type("Broken", (), {"feed": staticmethod(broken), "at_frame_end": staticmethod(lambda data: False)})()
    with caplog.at_level(logging.ERROR):
        await victim.send_raw(frame("x"))
        reply = await victim.recv()
    assert reply["data"]["code"] == "internal"
    assert await victim.closed_by_peer()
    await bystander.ok("cluster_status")


async def test_the_frame_too_large_reply_survives_a_huge_write(make_node) -> None:
    """Lingering close: the peer is still writing when we close, yet gets our reply, then EOF."""
    node = await make_node()
    peer = await Peer.connect(node)
    await peer.ok("cluster_status")
    await peer.send_raw(b'{"message_type":"task_submit","data":"' + b"x" * (3 * 1024 * 1024) + b'"}\n')
    reply = await peer.recv()
    assert reply["data"]["code"] == "frame_too_large"
    assert await peer.closed_by_peer()
    await peer.close()
    await wait_until(lambda: not node.server.connections)


async def test_heartbeat_metrics_are_bounded(node) -> None:
    """system_metrics is kept per device (and 20 times over by the dashboard): it was any object, 1 MiB a beat."""
    from conftest import fake_worker

    from retire_cluster.worker.profiler import Profiler

    worker = await fake_worker(node, "pi")
    ours = Profiler().system_metrics()
    ours.update(battery_percent=87.0, charging=True, battery_temperature=31.5)
    assert (await worker.request("heartbeat", {"system_metrics": ours}))["message_type"] == "ack"
    for bad in ({f"k{i}": 1 for i in range(33)}, {"blob": "x" * 100_000}, {"k" * 65: 1},
                {"nested": {"a": 1}}, {"load_average": list(range(17))}):
        reply = await worker.request("heartbeat", {"system_metrics": bad})
        assert reply["message_type"] == "error" and reply["data"]["code"] == "invalid_message", reply
        assert "system_metrics" in reply["data"]["path"]
    assert node.registry.get("pi").metrics == ours
