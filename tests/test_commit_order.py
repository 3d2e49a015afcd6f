"""What the main node commits, when, and what it tells subscribers about it.

Two rules from DESIGN.md meet here: state changes are committed before they
are acted on, and commits are grouped so that none is spent where it buys
nothing. The worker's "accepted" ack (assigned -> running) is written lazily:
it rides with the next commit, usually the result's. And a ``task_update``
only ever carries a state that is already on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any, Dict, List

from conftest import Peer, fake_worker, settle
from test_node import report, submit, take_assignment

from retire_cluster.main import MainNode, store
from retire_cluster.protocol.messages import TaskStatus


def on_disk(node: MainNode, task_id: str) -> Dict[str, Any]:
    """The committed row, read through a connection of its own (what a crash would leave)."""
    with sqlite3.connect(str(node.config.db_path)) as db:
        status, = db.execute("SELECT status FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        started = [r[0] for r in db.execute(
            "SELECT started_at FROM task_attempts WHERE task_id=? ORDER BY attempt", (task_id,))]
    return {"status": status, "started_at": started}


async def updates(watcher: Peer) -> List[str]:
    """Statuses of the task_update pushes received so far (a request drains the pipe first)."""
    await watcher.ok("cluster_status", {})
    seen = [m["data"]["task"]["status"] for m in watcher.pushed if m["message_type"] == "task_update"]
    watcher.pushed.clear()
    return seen


async def test_running_rides_with_the_result_commit(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(store, "LAZY_COMMIT_S", 3600.0)  # only another commit may carry it
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    task = await take_assignment(worker)
    for _ in range(5):  # let the ack be handled and any commit it started finish
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    assert on_disk(node, task_id) == {"status": "assigned", "started_at": [None]}
    commits = node.store.commits
    await report(worker, task)
    row = on_disk(node, task_id)
    assert row["status"] == "completed" and row["started_at"][0] is not None
    assert node.store.commits == commits + 1  # running and completed: one commit


async def test_lazy_running_is_committed_on_its_own_soon(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(store, "LAZY_COMMIT_S", 0.0)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    await take_assignment(worker)
    for _ in range(500):
        if on_disk(node, task_id)["status"] == "running":
            break
        await asyncio.sleep(0.01)
    assert on_disk(node, task_id)["status"] == "running"


async def test_lazy_write_is_committed_at_stop(tmp_path: Any, node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(store, "LAZY_COMMIT_S", 3600.0)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    await take_assignment(worker)
    await asyncio.sleep(0.01)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    await node.stop()
    assert on_disk(node, task_id)["status"] == "running"


async def test_update_is_published_only_for_its_committed_state(node: MainNode) -> None:
    """A cancel queued while the insert's commit is under way: one update, sent after the cancel's commit."""
    watcher = await Peer.connect(node, "watcher")
    await watcher.ok("subscribe", {})
    client = await Peer.connect(node)
    gate = asyncio.Event()
    commit = node.store._commit
    in_commit = asyncio.Event()

    async def held(db: Any, ops: Any) -> None:
        in_commit.set()
        await gate.wait()
        await commit(db, ops)

    node.store._commit = held  # type: ignore[method-assign]
    submitting = asyncio.ensure_future(submit(client))
    await in_commit.wait()  # the insert is being committed, not yet on disk
    (task,) = node.tasks.values()
    canceller = await Peer.connect(node, "canceller")
    cancelling = asyncio.ensure_future(canceller.ok("task_cancel", {"task_id": task.task_id}))
    for _ in range(5):
        await asyncio.sleep(0)
    assert task.status is TaskStatus.CANCELLED  # in memory, queued behind the insert
    gate.set()
    task_id = await submitting
    await cancelling
    await settle(node)
    assert on_disk(node, task_id)["status"] == "cancelled"
    # Without the version check the insert's commit would have published the
    # in-memory "cancelled" before the cancel was on disk, then again after.
    assert await updates(watcher) == ["cancelled"]
