"""``task_submit`` with ``tasks``: many tasks in one request, one reply, one commit, one token of the rate limit.

Before, a batch of 30,000 lines was 30,000 requests: at the per-connection
rate limit (5,000 a second) the client was refused with ``overloaded`` and
sent them again with backoff, telling its user the main node was busy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from conftest import FakeClock, Peer, fake_worker, make_config, settle

from retire_cluster.main import MainNode


def many(*specs: Dict[str, Any]) -> Dict[str, Any]:
    return {"tasks": list(specs)}


async def test_many_tasks_in_one_request_are_answered_with_their_ids_in_order(node: MainNode) -> None:
    client = await Peer.connect(node, "client")
    reply = await client.ok("task_submit", many(
        {"task_type": "echo", "payload": {"n": 1}},
        {"task_type": "echo", "payload": {"n": 2}, "priority": "high", "idempotency_key": "k-2"},
        {"task_type": "sleep", "payload": {"seconds": 0}, "max_retries": 0},
        {"task_type": "echo", "payload": {"n": 2}, "idempotency_key": "k-2"},  # the same key: the same task
    ))
    ids: List[str] = reply["task_ids"]
    assert len(ids) == 4 and len(set(ids)) == 3 and ids[1] == ids[3]
    stored = {t.task_id: t for t in await node.store.list_tasks(limit=10)}  # committed before the reply
    assert set(stored) == set(ids)
    assert stored[ids[0]].payload == {"n": 1} and stored[ids[1]].priority > stored[ids[0]].priority
    assert stored[ids[2]].task_type == "sleep" and stored[ids[2]].max_retries == 0
    # A repeat of the request (its answer lost, say) finds the keyed task again.
    again = await client.ok("task_submit", many({"task_type": "echo", "payload": {"n": 2}, "idempotency_key": "k-2"}))
    assert again["task_ids"] == [ids[1]]

    worker = await fake_worker(node, "dev-1", cores=4)
    assigned = {(await worker.next_push("task_assign"))["data"]["task"]["task_id"] for _ in range(3)}
    assert assigned == set(ids)
    await worker.close()


async def test_a_request_with_one_bad_task_queues_none_of_them(node: MainNode) -> None:
    client = await Peer.connect(node, "client")
    for data, path in (
        (many({"task_type": "echo"}, {"task_type": "echo", "priority": "soon"}), "$.data.tasks[1].priority"),
        (many({"task_type": "echo"}, {"task_type": "echo", "colour": "red"}), "$.data.tasks[1]"),
        (many(), "$.data.tasks"),
        ({"tasks": [{"task_type": "echo"}], "wait": 5}, "$.data"),  # wait is for one task
        ({"task": {"task_type": "echo"}, "tasks": [{"task_type": "echo"}]}, "$.data"),
    ):
        reply = await client.request("task_submit", data)
        assert reply["message_type"] == "error" and reply["data"]["code"] == "invalid_message", reply
        assert reply["data"]["path"] == path, reply
    await settle(node)
    assert await node.store.list_tasks(limit=10) == [] and not node.tasks


async def test_more_tasks_than_the_node_may_hold_are_refused_whole(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, max_unfinished_tasks=5), clock=clock, run_monitor=False)
    await node.start()
    try:
        client = await Peer.connect(node, "client")
        await client.ok("task_submit", many(*({"task_type": "echo"} for _ in range(3))))
        reply = await client.request("task_submit", many(*({"task_type": "echo"} for _ in range(3))))
        assert reply["data"]["code"] == "overloaded" and "room for 2" in reply["data"]["error"], reply
        await settle(node)
        assert len(node.tasks) == 3
    finally:
        await node.stop()


async def test_a_request_of_many_tasks_spends_one_token_of_the_rate_limit(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, client_rate_per_s=0.001, client_burst=3), clock=clock, run_monitor=False)
    await node.start()
    try:
        client = await Peer.connect(node, "client")
        await client.ok("cluster_status")  # authenticated: frames may be larger than 16 KiB from now on
        reply = await client.ok("task_submit", many(*({"task_type": "echo", "payload": {"n": n}} for n in range(500))))
        assert len(reply["task_ids"]) == 500
        second = await client.request("task_submit", many({"task_type": "echo"}))
        assert second["message_type"] == "ack", second  # the burst of 3 covers the three requests
        third = await client.request("task_submit", many({"task_type": "echo"}))
        assert third["data"]["code"] == "overloaded", third
    finally:
        await node.stop()


def addr(node: MainNode) -> str:
    return f"{node.address[0]}:{node.address[1]}"


async def test_async_client_submits_many_in_requests_of_a_few_hundred(node: MainNode) -> None:
    from retire_cluster.client import AsyncClient

    sent: List[int] = []
    async with AsyncClient(addr(node), node.token, timeout_s=30, max_request_bytes=64 * 1024) as client:
        request = client.request

        async def counted(message_type: str, data: Any = None, **kwargs: Any) -> Any:
            sent.append(len(data["tasks"]))
            return await request(message_type, data, **kwargs)

        client.request = counted  # type: ignore[method-assign]
        tasks = [{"task_type": "echo", "payload": {"n": n, "pad": "x" * 200}} for n in range(1200)]
        tasks[7]["idempotency_key"] = "mine"
        ids = await client.submit_many(tasks)
    assert len(ids) == 1200 and len(set(ids)) == 1200
    # 500 tasks of ~300 bytes are over 64 KiB: each request of 500 was split in halves, then again
    assert sum(sent) > 1200 and max(n for n in sent if n <= 250) <= 250 and sent[0] == 500
    stored = {t.task_id: t for t in await node.store.list_tasks(limit=2000)}
    assert [stored[i].payload["n"] for i in ids] == list(range(1200))
    assert stored[ids[7]].idempotency_key == "mine" and all(t.idempotency_key for t in stored.values())


async def test_submit_many_refuses_what_is_not_a_task_before_sending(node: MainNode) -> None:
    import pytest

    from retire_cluster.client import AsyncClient

    async with AsyncClient(addr(node), node.token, timeout_s=30) as client:
        with pytest.raises(TypeError, match=r"tasks\[1\] is not a task"):
            await client.submit_many([{"task_type": "echo"}, {"payload": {}}])
        with pytest.raises(TypeError, match=r"tasks\[0\]: unknown submit option 'colour'"):
            await client.submit_many([{"task_type": "echo", "colour": "red"}])
        with pytest.raises(ValueError, match=r"tasks\[0\]: task.payload.x is nan"):
            await client.submit_many([{"task_type": "echo", "payload": {"x": float("nan")}}])
    await settle(node)
    assert not node.tasks


async def test_blocking_client_submits_many(node: MainNode) -> None:
    import asyncio

    from retire_cluster.client import Client

    def blocking() -> List[str]:
        with Client(addr(node), node.token, timeout_s=30) as client:
            return client.submit_many({"task_type": "echo", "payload": {"n": n}} for n in range(600))

    ids = await asyncio.get_running_loop().run_in_executor(None, blocking)
    stored = {t.task_id: t for t in await node.store.list_tasks(limit=1000)}
    assert [stored[i].payload["n"] for i in ids] == list(range(600))


async def test_task_status_with_task_ids_answers_records_in_order_and_null_for_unknown(node: MainNode) -> None:
    client = await Peer.connect(node, "client")
    ids = (await client.ok("task_submit", many({"task_type": "echo"}, {"task_type": "sleep"})))["task_ids"]
    records = (await client.ok("task_status", {"task_ids": [ids[1], "nope", ids[0]]}))["tasks"]
    assert [r and r["task_id"] for r in records] == [ids[1], None, ids[0]]
    assert "waiting" in records[0]  # pending: why, as for one task
    too_many = await client.request("task_status", {"task_ids": [ids[0]] * 101})
    assert too_many["data"]["code"] == "invalid_message" and too_many["data"]["path"] == "$.data.task_ids"


async def test_blocking_client_statuses_and_as_completed_ask_100_at_a_time(node: MainNode) -> None:
    import asyncio

    from retire_cluster.client import Client

    client = await Peer.connect(node, "client")
    ids = (await client.ok("task_submit", many(*({"task_type": "sleep"} for _ in range(150)))))["task_ids"]
    for task_id in ids:
        await client.ok("task_cancel", {"task_id": task_id})

    def blocking() -> tuple:
        with Client(addr(node), node.token, timeout_s=30) as c:
            return c.statuses(ids + ["nope"]), [r["task_id"] for r in c.as_completed(ids, timeout_s=30)]

    records, ended = await asyncio.get_running_loop().run_in_executor(None, blocking)
    assert [r and r["status"] for r in records] == ["cancelled"] * 150 + [None]
    assert ended == ids


async def test_records_that_do_not_fit_in_one_frame_come_in_several_replies(tmp_path: Path, clock: FakeClock) -> None:
    """A task's result may be nearly a frame itself: a reply of 100 of them would be 100 frames long."""
    from retire_cluster.client import AsyncClient

    node = MainNode(make_config(tmp_path, max_frame_bytes=64 * 1024), clock=clock, run_monitor=False)
    await node.start()
    try:
        peer = await Peer.connect(node, "client")
        await peer.ok("cluster_status")
        ids = [(await peer.ok("task_submit", {"task": {"task_type": "sleep", "payload": {"pad": "x" * 20_000, "n": n}}}))[
            "task_id"] for n in range(10)]
        first = (await peer.ok("task_status", {"task_ids": ids}))["tasks"]
        assert 1 < len(first) < 10 and [r["task_id"] for r in first] == ids[: len(first)]
        for task_id in ids:
            await peer.ok("task_cancel", {"task_id": task_id})
        async with AsyncClient(addr(node), node.token, timeout_s=30, max_request_bytes=64 * 1024) as client:
            records = await client.statuses(ids + ["nope"])
            assert [r and r["payload"]["n"] for r in records] == list(range(10)) + [None]
            assert [r["task_id"] async for r in client.as_completed(ids, timeout_s=30)] == ids
    finally:
        await node.stop()
