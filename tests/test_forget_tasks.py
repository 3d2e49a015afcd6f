"""Tasks that ended more than forget_finished_after_s ago are deleted (off by default).

Without it every task ever submitted stays in cluster.db for good, with its
payload, result and attempts: a main node on a NAS or a Raspberry Pi's SD card
that runs for years grows its database without end, and listings filtered by
device or type walk all of it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import FakeClock, Peer, fake_worker, make_config, settle

from retire_cluster.main import MainNode
from retire_cluster.main import node as node_module
from retire_cluster.main.config import ConfigError

DAY = 86400.0


async def run_one(worker: Peer, client: Peer, message: str, **task: Any) -> str:
    """Submit an echo task, have the fake worker complete it; its id."""
    task_id = (await client.ok("task_submit", {"task": {"task_type": "echo", "payload": {"m": message}, **task}}))[
        "task_id"]
    assign = await worker.next_push("task_assign")
    held: Dict[str, Any] = assign["data"]["task"]
    assert held["task_id"] == task_id
    await worker.send("ack", {"original_message_id": assign["message_id"], "result": {}})
    await worker.ok("task_result", {"task_id": task_id, "attempt": held["attempt"], "status": "completed",
                                    "result": {"output": message, "exit_code": 0, "metrics": {}}})
    return str(task_id)


async def stored_ids(node: MainNode) -> set[str]:
    return {t.task_id for t in await node.store.list_tasks(limit=1000)}


async def attempt_rows(node: MainNode, task_id: str) -> int:
    rows = await node.store._conn().execute_fetchall("SELECT COUNT(*) FROM task_attempts WHERE task_id=?", (task_id,))
    return int(list(rows)[0][0])


async def started(tmp_path: Path, clock: FakeClock, **config: Any) -> MainNode:
    node = MainNode(make_config(tmp_path, **config), clock=clock, run_monitor=False)
    await node.start()
    return node


async def test_tasks_that_ended_30_days_ago_are_forgotten_the_rest_kept(tmp_path: Path, clock: FakeClock) -> None:
    node = await started(tmp_path, clock, forget_finished_after_s=30 * DAY)
    try:
        worker = await fake_worker(node, "nas", task_types=["echo"])
        client = await Peer.connect(node, "client")
        old = await run_one(worker, client, "old", idempotency_key="key-old")
        cancelled = (await client.ok("task_submit", {"task": {"task_type": "sleep", "payload": {"seconds": 1}}}))[
            "task_id"]  # no device runs sleep: it waits, then is cancelled
        await client.ok("task_cancel", {"task_id": cancelled})
        waiting = (await client.ok("task_submit", {"task": {"task_type": "sleep"}}))["task_id"]  # pending for good
        clock.advance(20 * DAY)
        recent = await run_one(worker, client, "recent")
        clock.advance(11 * DAY)  # old and cancelled ended 31 days ago, recent 11
        await settle(node)
        assert await attempt_rows(node, old) == 1

        node.tick(clock())  # starts a pass in the background
        await asyncio.gather(*node._background)
        assert await stored_ids(node) == {waiting, recent}
        assert await attempt_rows(node, old) == 0
        for gone in (old, cancelled):
            reply = await client.request("task_status", {"task_id": gone})
            assert reply["data"]["code"] == "not_found", reply
        assert (await client.ok("task_status", {"task_id": recent}))["task"]["status"] == "completed"
        assert (await client.ok("task_status", {"task_id": waiting}))["task"]["status"] == "pending"

        # Its idempotency key went with it: the same key now makes a new task.
        again = (await client.ok("task_submit", {"task": {"task_type": "sleep", "idempotency_key": "key-old"}}))
        assert again["task_id"] != old and "existing" not in again
        integrity = await node.store.integrity_check()
        assert integrity == "ok"
        await worker.close()
    finally:
        await node.stop()


async def test_a_long_history_is_worked_off_batch_by_batch_and_stops_at_the_recent(
        tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "FORGET_BATCH", 3)
    node = await started(tmp_path, clock, forget_finished_after_s=DAY)
    try:
        client = await Peer.connect(node, "client")
        old = [(await client.ok("task_submit", {"task": {"task_type": "sleep"}}))["task_id"] for _ in range(7)]
        for task_id in old:
            await client.ok("task_cancel", {"task_id": task_id})
        clock.advance(2 * DAY)
        new = (await client.ok("task_submit", {"task": {"task_type": "sleep"}}))["task_id"]
        await client.ok("task_cancel", {"task_id": new})
        await settle(node)
        forgotten = [await node.forget_finished(clock()) for _ in range(4)]
        assert forgotten == [3, 3, 1, 0]  # three passes read 3, 3, then 2 tasks (the last one too recent)
        assert await stored_ids(node) == {new}
        assert node._forget_cursor == 0 and node._forget_next_at == clock() + node_module.FORGET_PAUSE_S
        node.tick(clock())
        assert not node._forgetting  # paused until then
    finally:
        await node.stop()


async def test_by_default_nothing_is_forgotten(tmp_path: Path, clock: FakeClock) -> None:
    node = await started(tmp_path, clock)
    try:
        assert node.config.forget_finished_after_s == 0
        client = await Peer.connect(node, "client")
        task_id = (await client.ok("task_submit", {"task": {"task_type": "sleep"}}))["task_id"]
        await client.ok("task_cancel", {"task_id": task_id})
        clock.advance(3650 * DAY)
        node.tick(clock())
        assert not node._forgetting
        await settle(node)
        assert await stored_ids(node) == {task_id}
    finally:
        await node.stop()


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_forget_finished_after_s_is_refused(tmp_path: Path, value: float) -> None:
    with pytest.raises(ConfigError, match="forget_finished_after_s must be"):
        make_config(tmp_path, forget_finished_after_s=value)
