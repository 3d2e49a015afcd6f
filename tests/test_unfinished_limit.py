"""Unfinished tasks held by the main node are bounded in number and in payload bytes.

Before, every submission was held in memory until it ended, without bound: a
client (anyone with the token) submitting tasks no device runs, or faster
than the devices finish them, grew the main node until the kernel killed it
(about 1 KB per small task, plus its payload; a 1 MiB payload per frame). Now
a submission past ``max_unfinished_tasks`` or ``max_unfinished_bytes`` is
answered ``overloaded`` (nothing is created; the clients send it again with
backoff), and is taken again once tasks have ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import FakeClock, Peer, fake_worker, make_config
from test_recent_memory import run_one

from retire_cluster.main import MainNode
from retire_cluster.main.config import ConfigError


def submit(task_type: str = "nobody-runs-this", message: str = "m", **extra: Any) -> Dict[str, Any]:
    return {"task": {"task_type": task_type, "payload": {"message": message}, **extra}}


async def started(tmp_path: Path, clock: FakeClock, **limits: Any) -> MainNode:
    node = MainNode(make_config(tmp_path, **limits), clock=clock, run_monitor=False)
    await node.start()
    return node


async def test_a_submission_past_max_unfinished_tasks_is_overloaded_and_taken_once_one_ends(
        tmp_path: Path, clock: FakeClock) -> None:
    node = await started(tmp_path, clock, max_unfinished_tasks=3)
    try:
        client = await Peer.connect(node, "client")
        ids = [(await client.ok("task_submit", submit()))["task_id"] for _ in range(3)]
        refused = await client.request("task_submit", submit())
        assert refused["message_type"] == "error", refused
        assert refused["data"]["code"] == "overloaded"
        assert "3 unfinished tasks" in refused["data"]["error"]
        assert "max_unfinished_tasks" in refused["data"]["error"]
        assert len(node.tasks) == 3 and (await node.store.count_tasks()).get("pending") == 3  # nothing created
        await client.ok("task_cancel", {"task_id": ids[0]})
        assert (await client.ok("task_submit", submit()))["task_id"] not in ids
        assert len(node.tasks) == 3
    finally:
        await node.stop()


async def test_a_submission_past_max_unfinished_bytes_is_overloaded(tmp_path: Path, clock: FakeClock) -> None:
    node = await started(tmp_path, clock, max_unfinished_bytes=1024 * 1024)
    try:
        client = await Peer.connect(node, "client")
        await client.ok("cluster_status")  # frames over 16 KiB are taken once the connection authenticated
        big = "x" * 300_000
        ids = [(await client.ok("task_submit", submit(message=big)))["task_id"] for _ in range(4)]
        assert node.unfinished_bytes == 4 * len('{"message":""}') + 4 * 300_000  # past 1 MiB with the 4th
        refused = await client.request("task_submit", submit(message="small"))
        assert refused["data"]["code"] == "overloaded", refused
        assert "max_unfinished_bytes" in refused["data"]["error"] and "1 MiB" in refused["data"]["error"]
        await client.ok("task_cancel", {"task_id": ids[0]})
        await client.ok("task_cancel", {"task_id": ids[1]})
        assert node.unfinished_bytes == 2 * (len('{"message":""}') + 300_000)
        await client.ok("task_submit", submit(message="small"))
    finally:
        await node.stop()


async def test_a_repeated_idempotent_submission_is_answered_even_when_full(tmp_path: Path, clock: FakeClock) -> None:
    """A repeat creates nothing, so the limit does not apply: the client learns its task id."""
    node = await started(tmp_path, clock, max_unfinished_tasks=1)
    try:
        client = await Peer.connect(node, "client")
        first = await client.ok("task_submit", submit(idempotency_key="k1"))
        again = await client.ok("task_submit", submit(idempotency_key="k1"))
        assert again["task_id"] == first["task_id"] and again["existing"] is True
        refused = await client.request("task_submit", submit(idempotency_key="k2"))
        assert refused["data"]["code"] == "overloaded"
    finally:
        await node.stop()


async def test_tasks_recovered_at_start_are_never_refused_and_are_counted(tmp_path: Path, clock: FakeClock) -> None:
    node = await started(tmp_path, clock)
    client = await Peer.connect(node, "client")
    for _ in range(3):
        await client.ok("task_submit", submit(message="y" * 1000))
    await client.close()
    await node.stop()

    node = await started(tmp_path, clock, max_unfinished_tasks=2)
    try:
        assert len(node.tasks) == 3  # more than the limit now: all of them kept
        assert node.unfinished_bytes == 3 * len('{"message":"' + "y" * 1000 + '"}')
        client = await Peer.connect(node, "client")
        refused = await client.request("task_submit", submit())
        assert refused["data"]["code"] == "overloaded"
    finally:
        await node.stop()


async def test_the_count_goes_down_when_a_task_completes(node: MainNode) -> None:
    worker = await fake_worker(node, "pi")
    client = await Peer.connect(node, "client")
    await run_one(client, worker, "done")
    assert node.tasks == {} and node.unfinished_bytes == 0


@pytest.mark.parametrize("limits", [{"max_unfinished_tasks": 0}, {"max_unfinished_bytes": 1000}])
def test_limits_below_their_minimum_are_refused(tmp_path: Path, limits: Dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="max_unfinished_tasks must be at least 1"):
        make_config(tmp_path, **limits)


async def test_over_http_a_submission_past_the_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    from webutil import start_cluster

    c = await start_cluster(tmp_path, worker=False, max_unfinished_tasks=1)
    try:
        await c.submit("nobody-runs-this", {})
        async with c.session.post(c.url("/api/v1/tasks"), headers=c.auth,
                                  json={"task_type": "nobody-runs-this", "payload": {}}) as resp:
            body = await resp.json()
            assert resp.status == 429 and resp.headers["Retry-After"] == "5"
        assert body["code"] == "overloaded" and "max_unfinished_tasks" in body["error"]
        assert len(c.node.tasks) == 1
    finally:
        await c.close()
