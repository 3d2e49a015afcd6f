"""Hostile traffic over real TCP on 127.0.0.1 while a real worker does real work.

At the same time, against one in-process main node:

- 4 authenticated flooders send 1,250 malformed frames each (5,000 in all:
  not JSON, too deep, duplicate keys, NaN, lone surrogates, invalid UTF-8,
  bad envelopes, unknown types, invalid data);
- 16 strangers send garbage before authenticating, 8 send an endless line;
- 300 connections open and say nothing;
- 300 connections send one byte per second;
- 4 authenticated peers pipeline requests and never read a reply;
- the in-process worker agent registers and runs 40 tasks a client submits.

Asserted: every task completes; every hostile connection got a typed error
or was closed (most both); the main node ends with only the legitimate
connections; and the process's RSS (main node, worker and all the hostile
clients together) grows by less than RSS_GROWTH_BOUND. Limits are shrunk so
that it all takes seconds: auth_timeout_s 3 s, drain_timeout_s 2 s. Waiting
is always for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from pathlib import Path
from typing import Any, Dict, List, Set

import psutil
import pytest
from conftest import Peer, make_config
from test_agent import free_port, wait_until

from retire_cluster.main import MainNode
from retire_cluster.protocol.errors import ERROR_CODES
from retire_cluster.worker import Agent, WorkerConfig

pytestmark = pytest.mark.slow

#: Growth of this process's RSS during the attack (it holds the main node, the
#: worker agent and every hostile client). Measured ~15 MiB on the 2-core
#: dev machine; each of the ~630 hostile connections may hold at most 16 KiB
#: of unauthenticated frame, ~10 MiB in all.
RSS_GROWTH_BOUND = 64 * 1024 * 1024

AUTH_TIMEOUT_S = 3.0
IDLE = 300
SLOW = 300
FLOODERS = 4
FRAMES_PER_FLOODER = 1250
STRANGERS = 16
ENDLESS = 8
NON_READERS = 4
TASKS = 40

ENV = b'{"message_type":"task_submit","message_id":"m","sender_id":"c","data":{"task":{"task_type":"echo","payload":%s}}}'
MALFORMED: List[bytes] = [
    b"hello there",
    b"{",
    b'{"message_type":"cluster_status"} trailing',
    b"[" * 5000,
    ENV % (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"),
    ENV % b'{"k":1,"k":2}',
    b'{"message_type":"cluster_status","message_id":"a","message_id":"b","sender_id":"c"}',
    ENV % b'{"k":"\\u003a","k":1}',
    ENV % b'{"k":NaN}',
    ENV % b'{"k":-Infinity}',
    ENV % b'{"k":1e400}',
    ENV % b'{"k":18446744073709551616}',
    ENV % b'{"k":"\\ud800"}',
    ENV % b'{"k":"\xff\xfe"}',
    ENV % b'{"k":"\xed\xa0\x80"}',
    b"\xef\xbb\xbf{}",
    b"42",
    b'{"message_id":"x","sender_id":"c"}',
    b'{"message_type":"cluster_status","message_id":7,"sender_id":"c"}',
    b'{"message_type":"make_coffee","message_id":"x","sender_id":"c"}',
    b'{"message_type":"task_submit","message_id":"x","sender_id":"c","data":{"task":{}}}',
    b'{"message_type":"task_status","message_id":"x","sender_id":"c\\u0000","data":{"task_id":"t"}}',
    b'{"message_type":"register","message_id":"x","sender_id":"evil","data":{"device_info":{}}}',
    b'{"message_type":"task_result","message_id":"x","sender_id":"c","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","execution_time":0}}',
    b'{"message_type":"cluster_status","message_id":"x","sender_id":"c","data":null,"extra":1}',
]


class Outcome:
    """What one hostile connection saw."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.codes: List[str] = []
        self.closed = False
        self.sent = 0

    @property
    def ok(self) -> bool:
        return self.closed or bool(self.codes)


async def read_all(reader: asyncio.StreamReader, outcome: Outcome, until: float) -> None:
    """Collect error codes until the main node closes the connection (or the deadline)."""
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            line = await asyncio.wait_for(reader.readline(), until - loop.time())
            if not line:
                outcome.closed = True
                return
            msg = json.loads(line)
            assert msg["message_type"] == "error", msg
            assert msg["data"]["code"] in ERROR_CODES, msg
            outcome.codes.append(msg["data"]["code"])
    except (ConnectionError, asyncio.IncompleteReadError):
        outcome.closed = True
    except asyncio.TimeoutError:
        pass


async def connect(node: MainNode) -> "tuple[asyncio.StreamReader, asyncio.StreamWriter]":
    return await asyncio.open_connection(*node.address, limit=1024 * 1024)


async def idle(node: MainNode, outcome: Outcome, until: float) -> None:
    reader, writer = await connect(node)
    await read_all(reader, outcome, until)
    writer.close()


async def slow_sender(node: MainNode, outcome: Outcome, until: float) -> None:
    reader, writer = await connect(node)
    reading = asyncio.ensure_future(read_all(reader, outcome, until))
    payload = b'{"message_type":"cluster_status","message_id":"slow","sender_id":"s"}\n'
    loop = asyncio.get_running_loop()
    for byte in payload:
        if reading.done() or loop.time() > until:
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            outcome.sent += 1
        except ConnectionError:
            break
        await asyncio.sleep(1.0)  # the attack's pace, not a wait for the main node
    await reading
    writer.close()


async def stranger(node: MainNode, outcome: Outcome, until: float, endless: bool) -> None:
    reader, writer = await connect(node)
    reading = asyncio.ensure_future(read_all(reader, outcome, until))
    try:
        if endless:  # one line that never ends
            for _ in range(64):
                writer.write(b"A" * 4096)
                await writer.drain()
        else:
            writer.write(b"\n".join(MALFORMED) + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    await reading
    writer.close()


async def flooder(node: MainNode, outcome: Outcome, until: float) -> None:
    reader, writer = await connect(node)
    writer.write(
        json.dumps(
            {
                "message_type": "cluster_status",
                "message_id": "auth",
                "sender_id": "f",
                "auth_token": node.token,
            }
        ).encode()
        + b"\n"
    )
    assert json.loads(await reader.readline())["message_type"] == "ack"
    reading = asyncio.ensure_future(read_all(reader, outcome, until))
    batch: List[bytes] = []
    for i in range(FRAMES_PER_FLOODER):
        batch.append(MALFORMED[i % len(MALFORMED)])
        if len(batch) == 50:
            writer.write(b"\n".join(batch) + b"\n")
            await writer.drain()
            outcome.sent += len(batch)
            batch = []
            await asyncio.sleep(0)
    await wait_until(
        lambda: len(outcome.codes) >= outcome.sent, timeout=until - asyncio.get_running_loop().time()
    )
    reading.cancel()
    writer.close()


def non_reader(node: MainNode) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        sock.connect(node.address)
    except BlockingIOError:
        pass
    return sock


async def pipeline_without_reading(
    node: MainNode, sock: socket.socket, outcome: Outcome, until: float
) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        sock,
        json.dumps(
            {
                "message_type": "subscribe",
                "message_id": "s",
                "sender_id": "n",
                "auth_token": node.token,
                "data": {},
            }
        ).encode()
        + b"\n",
    )
    request = (
        json.dumps({"message_type": "list_devices", "message_id": "l", "sender_id": "n"}).encode() + b"\n"
    )
    try:
        while loop.time() < until:
            await asyncio.wait_for(loop.sock_sendall(sock, request * 200), until - loop.time())
            outcome.sent += 200
    except (ConnectionError, OSError):
        outcome.closed = True  # reset by the main node
    except asyncio.TimeoutError:
        pass


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * (IDLE + SLOW + FLOODERS + STRANGERS + ENDLESS + NON_READERS) + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"open-files hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_hostile_traffic_while_a_worker_completes_its_tasks(tmp_path: Path, many_files: None) -> None:
    node = MainNode(
        make_config(
            tmp_path,
            port=free_port(),
            synchronous="normal",
            auth_timeout_s=AUTH_TIMEOUT_S,
            drain_timeout_s=2.0,
            max_send_queue_bytes=256 * 1024,
            max_connections_per_address=2000,
        ),
        run_monitor=False,
    )
    await node.start()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    rss_peak = rss_before
    agent = Agent(
        WorkerConfig(
            main_host="127.0.0.1",
            main_port=node.address[1],
            token=node.token,
            device_id="honest-worker",
            data_dir=tmp_path / "w",
            max_tasks=4,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            heartbeat_interval_s=0.5,
        )
    )
    runner = asyncio.ensure_future(agent.run())
    loop = asyncio.get_running_loop()
    until = loop.time() + 40
    sampling = True

    async def sample_rss() -> None:
        nonlocal rss_peak
        while sampling:
            rss_peak = max(rss_peak, process.memory_info().rss)
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample_rss())
    outcomes: List[Outcome] = []
    attacks = []
    try:
        await wait_until(lambda: node.registry.get("honest-worker") is not None)
        for _ in range(IDLE):
            outcomes.append(Outcome("idle"))
            attacks.append(idle(node, outcomes[-1], until))
        for _ in range(SLOW):
            outcomes.append(Outcome("slow"))
            attacks.append(slow_sender(node, outcomes[-1], until))
        for i in range(STRANGERS + ENDLESS):
            outcomes.append(Outcome("endless" if i >= STRANGERS else "stranger"))
            attacks.append(stranger(node, outcomes[-1], until, endless=i >= STRANGERS))
        for _ in range(FLOODERS):
            outcomes.append(Outcome("flooder"))
            attacks.append(flooder(node, outcomes[-1], until))
        sockets = [non_reader(node) for _ in range(NON_READERS)]
        for sock in sockets:
            outcomes.append(Outcome("non_reader"))
            attacks.append(pipeline_without_reading(node, sock, outcomes[-1], loop.time() + 8))
        attack = asyncio.ensure_future(asyncio.gather(*attacks))

        # Meanwhile, honest work.
        client = await Peer.connect(node, "honest-client")
        await client.ok("cluster_status")
        task_ids: Set[str] = set()
        for i in range(TASKS):
            spec: Dict[str, Any] = (
                {"task_type": "echo", "payload": {"message": f"m{i}"}}
                if i % 2
                else {"task_type": "sleep", "payload": {"seconds": 0.05}}
            )
            task_ids.add((await client.ok("task_submit", {"task": spec}))["task_id"])
        await wait_until(
            lambda: all((t := node.lookup(tid)) is not None and t.terminal for tid in task_ids),
            timeout=until - loop.time(),
        )
        for task_id in task_ids:
            record = (await client.ok("task_status", {"task_id": task_id}))["task"]
            assert record["status"] == "completed", record
            assert record["assigned_device"] == "honest-worker"

        await asyncio.wait_for(attack, until - loop.time() + 5)
        for sock in sockets:
            sock.close()
        await client.ok("cluster_status")  # still serving
        await wait_until(
            lambda: (
                {c.device_id for c in node.server.connections} <= {"honest-worker", None}
                and len(node.server.connections) <= 2
            ),
            timeout=15,
        )
    finally:
        sampling = False
        await sampler
        agent.stop()
        await runner
        await node.stop()

    failed = [o for o in outcomes if not o.ok]
    assert failed == [], [(o.kind, o.codes[:3], o.sent) for o in failed[:5]]
    by_kind: Dict[str, List[Outcome]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, []).append(o)
    assert all(o.closed and o.codes == ["unauthorized"] for o in by_kind["idle"])
    assert all(
        o.closed and o.codes[-1:] == ["unauthorized"] and o.sent <= AUTH_TIMEOUT_S + 2
        for o in by_kind["slow"]
    )
    assert all(o.closed and o.codes == ["invalid_json"] for o in by_kind["stranger"])
    assert all(o.closed and o.codes == ["frame_too_large"] for o in by_kind["endless"])
    flood_codes: Set[str] = set()
    for o in by_kind["flooder"]:
        assert o.sent == FRAMES_PER_FLOODER and len(o.codes) == FRAMES_PER_FLOODER
        flood_codes.update(o.codes)
    assert flood_codes >= {"invalid_json", "invalid_message", "unknown_message_type"}
    growth = rss_peak - rss_before
    print(f"RSS growth under attack: {growth / 2**20:.1f} MiB (bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)")
    assert growth < RSS_GROWTH_BOUND
