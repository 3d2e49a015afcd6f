"""``task_submit`` with ``wait``: one reply when the task has ended, and one commit for an instant task.

A client that waits for the end hears nothing before it, so when the task
goes to a free device at once, the main node holds the insert's commit (at
most ``MainNode.wait_hold_s``) and the result usually comes in time to share
it: insert, assignment, running and the result in one transaction instead of
two. The reply still waits for that commit, and carries the final record.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Dict, List

import pytest
from conftest import Peer, fake_worker, settle
from test_commit_order import HeldCommits, on_disk
from test_node import report, take_assignment

from retire_cluster.main import MainNode
from retire_cluster.main.dispatch import REPLIED
from retire_cluster.main.server import Connection
from retire_cluster.protocol.messages import Message, TaskStatus
from retire_cluster.web.app import HttpPeer


async def until(predicate: Callable[[], Any], tries: int = 500) -> None:
    """Wait (up to ``tries`` x 10 ms) for what the main node does in its own time; the caller asserts it."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)


def spec(**extra: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"task_type": "echo", "payload": {"message": "hi"}}
    task.update(extra)
    return task


async def test_reply_comes_with_the_final_record(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task, output="hi")
    reply = await client.reply_to(mid)
    assert reply["message_type"] == "ack", reply
    result = reply["data"]["result"]
    assert result["task_id"] == task["task_id"]
    assert result["task"]["status"] == "completed" and result["task"]["result"]["output"] == "hi"
    assert on_disk(node, task["task_id"])["status"] == "completed"  # what the reply says is on disk


async def test_an_instant_task_costs_one_commit(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(node, "wait_hold_s", 3600.0)  # only the result's commit may carry the insert
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await settle(node)
    commits = node.store.commits
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    for _ in range(5):
        await asyncio.sleep(0)
    assert on_disk(node, task["task_id"]) is None  # held: nothing is on disk, nobody has been told
    assert node.store.commits == commits
    await report(worker, task)
    reply = await client.reply_to(mid)
    assert reply["data"]["result"]["task"]["status"] == "completed"
    assert node.store.commits == commits + 1  # insert, assignment, running and result together


async def test_without_wait_the_insert_is_committed_at_once(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await settle(node)
    commits = node.store.commits
    reply = await client.ok("task_submit", {"task": spec()})
    assert on_disk(node, reply["task_id"]) == {"status": "assigned", "started_at": [None]}
    task = await take_assignment(worker)
    await report(worker, task)
    assert node.store.commits == commits + 2


async def test_held_insert_is_committed_by_its_deadline(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(node, "wait_hold_s", 0.0)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    await until(lambda: on_disk(node, task["task_id"]) is not None)
    assert on_disk(node, task["task_id"]) is not None  # the worker never answered; the insert is stored
    await report(worker, task)
    assert (await client.reply_to(mid))["data"]["result"]["task"]["status"] == "completed"


async def test_a_task_with_no_free_device_is_not_held(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(node, "wait_hold_s", 3600.0)
    client = await Peer.connect(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 0.05})
    reply = await client.reply_to(mid)
    record = reply["data"]["result"]["task"]
    assert record["status"] == "pending"  # the wait ran out; the record says where it stands
    assert on_disk(node, record["task_id"]) == {"status": "pending", "started_at": []}


async def test_wait_running_out_replies_with_the_record_so_far(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 0.05})
    task = await take_assignment(worker)
    reply = await client.reply_to(mid)
    record = reply["data"]["result"]["task"]
    assert record["task_id"] == task["task_id"] and record["status"] in ("assigned", "running")
    assert on_disk(node, task["task_id"])["status"] in ("assigned", "running")
    await report(worker, task)
    await settle(node)
    assert not node._end_waiters  # nothing is left behind for it


async def test_failed_insert_is_the_answer(node: MainNode, monkeypatch: Any) -> None:
    client = await Peer.connect(node)
    held = HeldCommits(monkeypatch)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    await held.started.wait()
    held.release(fail=True)
    reply = await client.reply_to(mid)
    assert reply["message_type"] == "error" and reply["data"]["code"] == "internal"
    assert not node._end_waiters


async def test_idempotent_resubmission_waits_for_the_same_task(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    first = await client.ok("task_submit", {"task": spec(idempotency_key="k-1")})
    mid = await client.send("task_submit", {"task": spec(idempotency_key="k-1"), "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task)
    result = (await client.reply_to(mid))["data"]["result"]
    assert result["existing"] is True and result["task_id"] == first["task_id"]
    assert result["task"]["status"] == "completed"
    again = await client.ok("task_submit", {"task": spec(idempotency_key="k-1"), "wait": 30})
    assert again["task"]["status"] == "completed"  # ended already: answered at once


async def test_cancelled_while_waiting(node: MainNode) -> None:
    client = await Peer.connect(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    for _ in range(100):
        if node.tasks:
            break
        await asyncio.sleep(0.01)
    (task,) = node.tasks.values()
    await settle(node)
    canceller = await Peer.connect(node, "canceller")
    await canceller.ok("task_cancel", {"task_id": task.task_id})
    reply = await client.reply_to(mid)
    assert reply["data"]["result"]["task"]["status"] == "cancelled"
    assert task.status is TaskStatus.CANCELLED


@pytest.mark.parametrize("wait", [0, -1, 3601, "5", True, None])
async def test_bad_wait_is_refused(node: MainNode, wait: Any) -> None:
    client = await Peer.connect(node)
    reply = await client.request("task_submit", {"task": spec(), "wait": wait})
    assert reply["message_type"] == "error" and reply["data"]["code"] == "invalid_message"
    assert reply["data"]["path"] == "$.data.wait"
    assert not node.tasks


async def test_store_write_within(node: MainNode) -> None:
    await settle(node)
    held = node.store.write([], within=3600.0)
    await asyncio.sleep(0.01)
    assert not held.done()  # it waits for its deadline, or for another commit
    node.store.write([])  # an urgent write: the commit carries everything queued
    await asyncio.wait_for(held, 30)
    soon = node.store.write([], within=0.0)
    later = node.store.write([], within=3600.0)  # a later deadline does not push the first one back
    await asyncio.wait_for(asyncio.gather(soon, later), 30)


async def test_an_end_decided_in_memory_is_told_only_once_stored(node: MainNode) -> None:
    """A task that has ended in memory, but whose end is still being committed, is answered after that commit."""
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = (await client.ok("task_submit", {"task": spec()}))["task_id"]
    await report(worker, await take_assignment(worker))
    task = node.lookup(task_id)
    assert task is not None and task.terminal
    stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # a commit still under way
    answer = node.wait_for_end(task, 30, stored)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not answer.done()
    stored.set_result(None)
    assert (await asyncio.wait_for(answer, 10))["task"]["status"] == "completed"
    assert not node._end_waiters


async def test_the_reply_leaves_in_the_pass_that_hears_of_the_commit(node: MainNode, monkeypatch: Any) -> None:
    """Written while the store handles the commit's end, not two loop passes later; and written once."""
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await settle(node)
    during_finish: List[bytes] = []
    finishing = [False]
    send_now = Connection.send_now

    def spied_send_now(conn: Connection, frame: bytes) -> None:
        if finishing[0]:
            during_finish.append(frame)
        send_now(conn, frame)

    finish = node.store._finish

    def spied_finish(*args: Any) -> None:
        finishing[0] = True
        try:
            finish(*args)
        finally:
            finishing[0] = False

    monkeypatch.setattr(Connection, "send_now", spied_send_now)
    monkeypatch.setattr(node.store, "_finish", spied_finish)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task, output="hi")
    reply = await client.reply_to(mid)
    assert reply["data"]["result"]["task"]["status"] == "completed"
    assert reply["data"]["result"]["task"]["result"]["output"] == "hi"
    assert [f for f in during_finish if mid.encode() in f], during_finish  # the reply left inside _finish
    await client.ok("cluster_status", {})  # whatever came before this reply is read by now
    assert not [m for m in client.pushed if m["data"].get("original_message_id") == mid]  # no second reply
    assert not node._end_waiters and not node.store._hooks


async def test_an_end_whose_commit_fails_is_told_once_written_again(node: MainNode, monkeypatch: Any) -> None:
    """The early reply is dropped with the failed commit; the end is written again and told then, once."""
    monkeypatch.setattr(node, "wait_hold_s", 0.0)  # the insert commits on its own, before the end
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    await until(lambda: on_disk(node, task["task_id"]) is not None)
    held = HeldCommits(monkeypatch)
    result_mid = await worker.send("task_result", {"task_id": task["task_id"], "attempt": task["attempt"],
                                                   "status": "completed", "result": {"output": "ok"}})
    await held.started.wait()
    held.release(fail=True)  # the commit that carries the end fails
    assert (await worker.reply_to(result_mid))["data"]["code"] == "internal"
    await until(lambda: node._unstored)
    assert task["task_id"] in node._unstored and not node.store._hooks
    monkeypatch.undo()  # commits work again
    node.tick(node.clock())  # writes the end again
    reply = await client.reply_to(mid)
    assert reply["message_type"] == "ack" and reply["data"]["result"]["task"]["status"] == "completed"
    assert on_disk(node, task["task_id"])["status"] == "completed"
    await client.ok("cluster_status", {})
    assert not [m for m in client.pushed if m["data"].get("original_message_id") == mid]


async def test_a_waited_reply_over_http_is_not_answered_by_the_store(node: MainNode) -> None:
    """An HTTP request's waiter has no connection to write to: its answer is the record, as before."""
    worker = await fake_worker(node)
    peer = HttpPeer("127.0.0.1:1")
    message = Message("task_submit", "m-http", "web", {"task": spec(), "wait": 30})
    answer = node.handlers.handle(peer, message)  # type: ignore[arg-type]
    task = await take_assignment(worker)
    await report(worker, task)
    result = await asyncio.wait_for(answer, 10)  # type: ignore[arg-type]
    assert result is not REPLIED and result["task"]["status"] == "completed"


async def test_a_read_leaves_the_loop_no_pass_of_its_own(node: MainNode, monkeypatch: Any) -> None:
    """A submission, then a worker's accept and result in one write: each read places its work, writes
    the running state and starts its commit when it ends, with no callback queued for the end of the pass."""
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await settle(node)
    loop = asyncio.get_running_loop()
    queued_in_reads: List[str] = []
    reading = [False]
    call_soon = loop.call_soon

    def spied_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
        if reading[0]:
            queued_in_reads.append(getattr(callback, "__name__", repr(callback)))
        return call_soon(callback, *args, **kwargs)

    received = Connection.data_received

    def spied_received(conn: Connection, data: bytes) -> None:
        reading[0] = True
        try:
            received(conn, data)
        finally:
            reading[0] = False

    monkeypatch.setattr(loop, "call_soon", spied_call_soon)
    monkeypatch.setattr(Connection, "data_received", spied_received)
    mid = await client.send("task_submit", {"task": spec(), "wait": 30})
    push = await worker.next_push("task_assign")
    task = push["data"]["task"]
    accept = {"message_type": "ack", "message_id": "a-1", "sender_id": worker.sender_id,
              "data": {"original_message_id": push["message_id"], "result": {"task_id": task["task_id"]}}}
    result = {"message_type": "task_result", "message_id": "r-1", "sender_id": worker.sender_id,
              "data": {"task_id": task["task_id"], "attempt": task["attempt"], "status": "completed",
                       "result": {"output": "hi"}}}
    await worker.send_raw(json.dumps(accept).encode() + b"\n" + json.dumps(result).encode() + b"\n")
    reply = await client.reply_to(mid)
    assert reply["data"]["result"]["task"]["status"] == "completed"
    assert not {"_schedule", "_start", "_write_running"} & set(queued_in_reads), queued_in_reads
    assert not node.in_read and not node.store.in_read


async def test_a_read_that_fails_midway_still_ends_as_a_read(node: MainNode, monkeypatch: Any,
                                                             caplog: Any) -> None:
    """A bug that escapes a read's handling closes that connection; the node does not stay "in a read"
    (which would leave the scheduling passes and commits of every later callback waiting for one)."""
    client = await Peer.connect(node)
    await client.ok("cluster_status", {})  # authenticated: the next read takes the express lane
    worker = await fake_worker(node)
    await settle(node)

    def broken(conn: Any, data: bytes) -> bytes:
        node.schedule_soon()  # asked for during the read, as a handler would
        raise RuntimeError("a bug in a read")

    monkeypatch.setattr(node, "express", broken)
    await client.send("task_submit", {"task": spec()})
    assert await client.closed_by_peer()
    assert not node.in_read and not node.store.in_read
    monkeypatch.undo()
    other = await Peer.connect(node, "client-2")
    mid = await other.send("task_submit", {"task": spec(), "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task, output="after")
    assert (await other.reply_to(mid))["data"]["result"]["task"]["status"] == "completed"
