"""What the main node commits, when, and what it tells subscribers about it.

Two rules from DESIGN.md meet here: state changes are committed before they
are acted on, and commits are grouped so that none is spent where it buys
nothing. The worker's "accepted" ack (assigned -> running) is written lazily:
it rides with the next commit, usually the result's. And a ``task_update``
only ever carries a state that is already on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from typing import Any, Dict, List, Optional, Tuple

from conftest import Peer, fake_worker, settle
from test_node import report, submit, take_assignment

from retire_cluster.main import MainNode, store
from retire_cluster.protocol.messages import TaskStatus


def on_disk(node: MainNode, task_id: str) -> Optional[Dict[str, Any]]:
    """The committed row, read through a connection of its own (what a crash would leave)."""
    with sqlite3.connect(str(node.config.db_path)) as db:
        row = db.execute("SELECT status FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        if row is None:
            return None
        status, = row
        started = [r[0] for r in db.execute(
            "SELECT started_at FROM task_attempts WHERE task_id=? ORDER BY attempt", (task_id,))]
    return {"status": status, "started_at": started}


async def updates(watcher: Peer) -> List[str]:
    """Statuses of the task_update pushes received so far (a request drains the pipe first)."""
    await watcher.ok("cluster_status", {})
    seen = [m["data"]["task"]["status"] for m in watcher.pushed if m["message_type"] == "task_update"]
    watcher.pushed.clear()
    return seen


async def accepted_task(node: MainNode, monkeypatch: Any, lazy_commit_s: float) -> Tuple[Peer, Dict[str, Any], str]:
    """A task submitted, assigned to a fake worker and acknowledged by it: (the worker, the task, its id)."""
    monkeypatch.setattr(store, "LAZY_COMMIT_S", lazy_commit_s)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    task = await take_assignment(worker)
    return worker, task, task_id


async def test_running_rides_with_the_result_commit(node: MainNode, monkeypatch: Any) -> None:
    worker, task, task_id = await accepted_task(node, monkeypatch, 3600.0)  # only another commit may carry it
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


async def test_running_is_not_written_when_the_result_comes_in_the_same_read(node: MainNode, monkeypatch: Any) -> None:
    """An instant task's ack and result in one write: only the result's state is queued for the task.

    The running state's write would be folded into the result's in the
    transaction anyway; making it cost a snapshot, a future and a timer per task.
    """
    queued: List[Tuple[str, Any]] = []
    write = node.store.write

    def recording(ops: Any, **kw: Any) -> Any:
        queued.extend((sql, params) for sql, params in ops)
        return write(ops, **kw)

    monkeypatch.setattr(node.store, "write", recording)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    push = await worker.next_push("task_assign")
    task = push["data"]["task"]
    queued.clear()
    ack = {"message_type": "ack", "message_id": "a-1", "sender_id": worker.sender_id,
           "data": {"original_message_id": push["message_id"], "result": {}}}
    result = {"message_type": "task_result", "message_id": "r-1", "sender_id": worker.sender_id,
              "data": {"task_id": task_id, "attempt": task["attempt"], "status": "completed",
                       "execution_time": 0.01, "result": {"output": "hi"}}}
    await worker.send_raw(json.dumps(ack).encode() + b"\n" + json.dumps(result).encode() + b"\n")
    reply = await worker.reply_to("r-1")
    assert reply["message_type"] == "ack"
    await settle(node)
    statuses = [params[0] for sql, params in queued if sql.startswith("UPDATE tasks") and params[-1] == task_id]
    assert statuses == ["completed"]
    row = on_disk(node, task_id)
    assert row["status"] == "completed" and row["started_at"][0] is not None


async def test_running_is_written_when_the_ack_comes_alone(node: MainNode, monkeypatch: Any) -> None:
    """The ack alone (a task that takes a while): its running state is queued at the end of the pass."""
    _worker, _task, task_id = await accepted_task(node, monkeypatch, 3600.0)
    await settle(node)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    await node.store.flush()  # a commit for something else carries it
    assert on_disk(node, task_id)["status"] == "running"


async def test_lazy_running_is_committed_on_its_own_soon(node: MainNode, monkeypatch: Any) -> None:
    _worker, _task, task_id = await accepted_task(node, monkeypatch, 0.0)
    for _ in range(500):
        if on_disk(node, task_id)["status"] == "running":
            break
        await asyncio.sleep(0.01)
    assert on_disk(node, task_id)["status"] == "running"


async def test_lazy_write_is_committed_at_stop(tmp_path: Any, node: MainNode, monkeypatch: Any) -> None:
    _worker, _task, task_id = await accepted_task(node, monkeypatch, 3600.0)
    await asyncio.sleep(0.01)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    await node.stop()
    assert on_disk(node, task_id)["status"] == "running"


async def test_update_is_published_only_for_its_committed_state(node: MainNode, monkeypatch: Any) -> None:
    """A cancel queued while the insert's commit is under way: one update, sent after the cancel's commit."""
    watcher = await Peer.connect(node, "watcher")
    await watcher.ok("subscribe", {})
    client = await Peer.connect(node)
    loop = asyncio.get_running_loop()
    gate, in_commit = threading.Event(), asyncio.Event()
    apply_batch = store._apply_batch

    def held(db: Any, groups: Any) -> None:  # runs in the SQLite thread
        loop.call_soon_threadsafe(in_commit.set)
        gate.wait(60)
        apply_batch(db, groups)

    monkeypatch.setattr(store, "_apply_batch", held)
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


class HeldCommits:
    """Holds every commit in the SQLite thread until released (the loop keeps running)."""

    def __init__(self, monkeypatch: Any, fail: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.gate = threading.Event()
        self.started = asyncio.Event()
        self.fail = fail
        apply_batch = store._apply_batch

        def held(db: Any, groups: Any) -> None:  # runs in the SQLite thread
            self.loop.call_soon_threadsafe(self.started.set)
            self.gate.wait(60)
            if self.fail:
                raise sqlite3.OperationalError("disk I/O error")
            apply_batch(db, groups)

        monkeypatch.setattr(store, "_apply_batch", held)

    def release(self, fail: bool = False) -> None:
        self.fail = fail
        self.gate.set()


async def submit_while_held(node: MainNode, monkeypatch: Any) -> Tuple[Peer, Peer, Peer, HeldCommits, str]:
    """A subscriber, a client, a worker; commits held from now on; an echo task submitted."""
    watcher = await Peer.connect(node, "watcher")
    await watcher.ok("subscribe", {})
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    held = HeldCommits(monkeypatch)
    mid = await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"message": "hi"}}})
    return watcher, client, worker, held, mid


async def test_new_task_is_sent_while_its_insert_commits(node: MainNode, monkeypatch: Any) -> None:
    """The first assignment rides in the insert's transaction and goes out before that commit ends."""
    watcher, client, worker, held, mid = await submit_while_held(node, monkeypatch)
    await held.started.wait()
    push = await worker.next_push("task_assign")  # while the insert + assignment commit is held
    task_id = push["data"]["task"]["task_id"]
    assert on_disk(node, task_id) is None
    report_sent = asyncio.ensure_future(report(worker, dict(push["data"]["task"])))
    acked = asyncio.ensure_future(client.reply_to(mid))
    published = asyncio.ensure_future(watcher.next_push("task_update"))
    for _ in range(20):
        await asyncio.sleep(0)
    # Neither the submission nor the result is acknowledged, nor anything published, before the commit.
    assert not report_sent.done() and not acked.done() and not published.done()
    held.release()
    reply = await acked
    assert reply["message_type"] == "ack" and reply["data"]["result"]["task_id"] == task_id
    assert (await report_sent)["message_type"] == "ack"
    assert (await published)["data"]["task"]["status"] == "completed"
    assert on_disk(node, task_id)["status"] == "completed"
    assert await updates(watcher) == []  # nothing else: "assigned" was overtaken before its commit


async def test_stored_task_is_sent_only_after_its_assignment_commits(node: MainNode, monkeypatch: Any) -> None:
    """A task stored earlier (here: submitted before any device) may be re-sent after a restart: commit first."""
    client = await Peer.connect(node)
    task_id = await submit(client)
    held = HeldCommits(monkeypatch)
    joining = asyncio.ensure_future(fake_worker(node))
    await held.started.wait()  # the registration's commit, which the assignment joins
    for _ in range(20):
        await asyncio.sleep(0)
    task = node.lookup(task_id)
    assert task.status is TaskStatus.ASSIGNED and task.assigned_device == "dev-1"  # in memory only
    device = node.registry.get("dev-1")
    assert device.conn is not None and not device.conn.pending_assigns  # nothing sent yet
    held.release()
    worker = await joining
    push = await worker.next_push("task_assign")
    assert push["data"]["task"]["task_id"] == task_id
    assert on_disk(node, task_id)["status"] in ("assigned", "running")


async def test_failed_insert_cancels_the_task_on_its_device(node: MainNode, monkeypatch: Any) -> None:
    watcher, client, worker, held, mid = await submit_while_held(node, monkeypatch)
    push = await worker.next_push("task_assign")
    task_id = push["data"]["task"]["task_id"]
    held.release(fail=True)
    reply = await client.reply_to(mid)
    assert reply["message_type"] == "error" and reply["data"]["code"] == "internal"
    cancel = await worker.next_push("task_cancel")
    assert cancel["data"]["task_id"] == task_id and cancel["data"]["reason"] == "not_stored"
    monkeypatch.setattr(held, "fail", False)
    result = await report(worker, dict(push["data"]["task"]))
    assert result["message_type"] == "error" and result["data"]["code"] == "not_found"
    assert node.lookup(task_id) is None and on_disk(node, task_id) is None
    assert await updates(watcher) == []


async def test_no_assignment_goes_out_before_the_register_reply(node: MainNode, monkeypatch: Any) -> None:
    """A task submitted while a worker's registration commits reaches it only after its register reply."""
    client = await Peer.connect(node)
    held = HeldCommits(monkeypatch)
    joining = asyncio.ensure_future(fake_worker(node))
    await held.started.wait()  # the registration is being committed; its reply waits for that
    await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"message": "hi"}}})
    for _ in range(20):
        await asyncio.sleep(0)
    device = node.registry.get("dev-1")
    assert device is not None and device.conn is not None and not device.conn.pending_assigns
    held.release()
    worker = await joining
    assert not [m for m in worker.pushed if m["message_type"] == "task_assign"]  # none came before the reply
    push = await worker.next_push("task_assign")
    assert push["data"]["task"]["task_type"] == "echo"


async def test_unacknowledged_assignment_lost_with_the_connection_uses_no_retry(node: MainNode) -> None:
    """The device reconnects without an assignment it never acked: it never got it, so no retry is used.

    (A main node killed between committing an assignment and sending it leaves
    the same state; repeated kills used to burn all of a task's retries.)
    """
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client, max_retries=0)
    first = await take_assignment(worker, accept=False)
    await settle(node)
    again = await fake_worker(node)  # the same device on a new connection, holding nothing
    second = await take_assignment(again)
    task = node.lookup(task_id)
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert [a.outcome for a in task.attempts] == ["not_received", None] and task.attempts_used == 1
    assert (await report(again, second))["message_type"] == "ack"
    await settle(node)
    assert on_disk(node, task_id)["status"] == "completed"


async def test_acknowledged_assignment_lost_with_the_connection_is_worker_lost(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client, max_retries=1)
    await take_assignment(worker, accept=True)
    await settle(node)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    again = await fake_worker(node)
    await take_assignment(again)
    assert [a.outcome for a in node.lookup(task_id).attempts] == ["worker_lost", None]


async def test_a_running_state_marked_as_the_node_stops_is_not_written(node: MainNode, monkeypatch: Any) -> None:
    """The store closed before the end of the pass: the lazy running write is dropped, not raised into the loop."""
    _worker, _task, task_id = await accepted_task(node, monkeypatch, 3600.0)
    await settle(node)
    task = node.lookup(task_id)
    reported: List[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx["message"]))
    await node.stop()
    node.write_running(task)
    for _ in range(3):
        await asyncio.sleep(0)
    assert reported == []
    assert on_disk(node, task_id)["status"] == "running"  # the earlier state, committed at the stop
