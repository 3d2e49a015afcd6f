"""What a main node running for months must not accumulate as clients, tasks and devices come and go.

Each test drives some churn (connections that vanish mid-request, tasks
submitted and cancelled, subscriptions) and checks that the node's in-memory
structures go back to what they held before, rather than growing with every
round.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import Peer, fake_worker, settle
from test_commit_order import HeldCommits
from webutil import eventually, start_cluster

from retire_cluster.main import MainNode


def unrunnable(**extra: Any) -> Dict[str, Any]:
    """A task no device runs: it stays pending, so a wait for its end never ends by itself."""
    task: Dict[str, Any] = {"task_type": "frobnicate", "payload": {"n": 1}}
    task.update(extra)
    return task


def reset(peer: Peer) -> None:
    """Hang up at once (a reset), as a client killed mid-request does."""
    sock = peer.writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.writer.transport.abort()


async def gone(node: MainNode, before: int) -> None:
    async def closed() -> bool:
        await settle(node)
        return len(node.server.connections) == before

    await eventually(closed)


async def test_a_waited_submission_is_let_go_when_its_client_hangs_up(node: MainNode) -> None:
    """A client that sends task_submit with wait and vanishes leaves no wait behind.

    Before, each one (with its request and connection) stayed until the task
    ended or the wait ran out, up to an hour; a repeated submission with the
    same idempotency key added one more wait to the same task each time.
    """
    keeper = await Peer.connect(node, "keeper")
    first = await keeper.ok("task_submit", {"task": unrunnable(idempotency_key="same")})
    await settle(node)
    base = len(node.server.connections)
    for round_ in range(3):
        for i in range(10):
            client = await Peer.connect(node, f"c{round_}-{i}")
            await client.send("task_submit", {"task": unrunnable(), "wait": 3600})
            await client.send("task_submit", {"task": unrunnable(idempotency_key="same"), "wait": 3600})
            await client.ok("cluster_status")  # both submissions were taken in
            reset(client)
        await gone(node, base)
        assert not node._end_waiters, {k: len(v) for k, v in node._end_waiters.items()}
        assert not node._background  # the repeated submissions' coroutines ended too
    # The tasks go on: a client still waiting is answered as before.
    mid = await keeper.send("task_submit", {"task": unrunnable(idempotency_key="same"), "wait": 3600})
    for _ in range(5):
        await settle(node)
    assert len(node._end_waiters[first["task_id"]]) == 1
    other = await Peer.connect(node, "other")
    await other.ok("task_cancel", {"task_id": first["task_id"]})
    reply = await keeper.reply_to(mid)
    assert reply["data"]["result"]["task"]["status"] == "cancelled"
    assert not node._end_waiters


async def test_a_waited_submission_over_http_is_let_go_when_the_client_hangs_up(tmp_path: Path) -> None:
    cluster = await start_cluster(tmp_path, worker=False)
    node = cluster.node
    try:
        host, port = node.http_address  # type: ignore[misc]
        for _ in range(5):
            reader, writer = await asyncio.open_connection(host, port)
            body = b'{"task_type": "frobnicate", "payload": {}}'
            writer.write(b"POST /api/v1/tasks?wait=3600 HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (host.encode(), node.token.encode(), len(body), body))
            await writer.drain()

            async def waiting() -> bool:
                return bool(node._end_waiters)

            await eventually(waiting)
            writer.transport.abort()

            async def let_go() -> bool:
                return not node._end_waiters and not node.web.connections

            await eventually(let_go)
        assert len(node.tasks) == 5  # the tasks themselves go on
    finally:
        await cluster.close()


async def test_a_worker_still_runs_what_an_abandoned_wait_submitted(node: MainNode) -> None:
    """Hanging up drops only the reply: the task is stored, runs and ends as any other."""
    client = await Peer.connect(node)
    await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"message": "hi"}}, "wait": 3600})
    await client.ok("cluster_status")
    task_id = next(iter(node.tasks))
    reset(client)
    await gone(node, 0)
    worker = await fake_worker(node)
    assign = await worker.next_push("task_assign")
    assert assign["data"]["task"]["task_id"] == task_id
    reply = await worker.request("task_result", {"task_id": task_id, "attempt": 1, "status": "completed",
                                                 "result": {"output": "hi", "exit_code": 0}})
    assert reply["message_type"] == "ack", reply
    await settle(node)
    assert node.lookup(task_id).status.value == "completed"  # type: ignore[union-attr]
    assert not node._end_waiters


async def test_cancelled_tasks_leave_the_queue_behind_a_task_that_waits(node: MainNode) -> None:
    """Submitting and cancelling tasks of a kind no device runs does not grow the queue.

    The queue drops cancelled tasks lazily, when they reach its head; behind
    a task that stays pending (no device runs it) they never did, and each
    Task, payload and all, stayed for good (``execute(..., fallback="local")``
    cancels such tasks every time).
    """
    client = await Peer.connect(node)
    await client.ok("task_submit", {"task": unrunnable()})  # the head: waits for ever
    await settle(node)
    scheduler = node.scheduler
    for round_ in range(5):
        for _ in range(200):
            task_id = (await client.ok("task_submit", {"task": unrunnable()}))["task_id"]
            await client.ok("task_cancel", {"task_id": task_id})
        queued = sum(len(cls.tasks) for cls in scheduler._classes.values())
        assert queued <= 2 + 2 * 64, (round_, queued)
        assert len(scheduler) == queued
    assert len(node.tasks) == 1
    stuck = (await client.ok("cluster_status"))["stuck"]
    assert [s["tasks"] for s in stuck] == [1]


async def test_subscriptions_to_ended_or_unknown_tasks_are_not_kept(node: MainNode) -> None:
    """A long-lived client that waits for tasks already ended does not grow its subscriptions.

    A subscription ended only with its task's end (or the connection): one
    made after that end, or to a task that is not in memory, stayed as long
    as the connection, one more with each wait (``Client.wait`` subscribes,
    then reads the status).
    """
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await client.ok("subscribe", {"task_ids": ["no-such-task"]})
    for round_ in range(3):
        ids = []
        for i in range(5):
            ids.append((await client.ok("task_submit", {"task": {"task_type": "echo",
                                                                 "payload": {"message": f"{round_}-{i}"}}}))["task_id"])
            assign = await worker.next_push("task_assign")
            task = assign["data"]["task"]
            await worker.ok("task_result", {"task_id": task["task_id"], "attempt": task["attempt"],
                                            "status": "completed", "result": {"output": "x", "exit_code": 0}})
        await settle(node)
        assert await client.ok("subscribe", {"task_ids": ids + [f"ghost-{round_}"]}) == {"subscribed": 6}
        for task_id in ids:
            assert (await client.ok("task_status", {"task_id": task_id}))["task"]["status"] == "completed"
        await settle(node)
        await asyncio.sleep(0)
        assert not node._subs, node._subs
        conn = next(c for c in node.server.connections if c.device_id is None)
        assert not conn.subscribed


async def test_a_subscription_made_while_the_end_commits_still_hears_it(node: MainNode, monkeypatch: Any) -> None:
    """Subscribing to a task whose end is not yet committed still gets that end pushed."""
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = (await client.ok("task_submit", {"task": {"task_type": "echo", "payload": {"message": "x"}}}))["task_id"]
    assign = await worker.next_push("task_assign")
    await settle(node)
    held = HeldCommits(monkeypatch)
    mid = await worker.send("task_result", {"task_id": task_id, "attempt": assign["data"]["task"]["attempt"],
                                            "status": "completed", "result": {"output": "x", "exit_code": 0}})
    await held.started.wait()
    assert node.lookup(task_id).terminal  # type: ignore[union-attr]  # in memory, not yet on disk
    await client.ok("subscribe", {"task_ids": [task_id]})
    held.release()
    assert (await worker.reply_to(mid))["message_type"] == "ack"
    update = await client.next_push("task_update")
    assert update["data"]["task"]["task_id"] == task_id and update["data"]["task"]["status"] == "completed"
    await settle(node)
    await asyncio.sleep(0)
    assert not node._subs


async def test_assignments_a_peer_never_answers_are_remembered_only_up_to_a_bound(
        node: MainNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party worker that never acks its task_assign grew Connection.pending_assigns for as long as it
    stayed connected; now the oldest are forgotten, and its results are still taken."""
    from retire_cluster.main import node as node_module

    monkeypatch.setattr(node_module, "PENDING_ASSIGNS_MAX", 3)
    mute = await fake_worker(node, "mute", cores=8)
    client = await Peer.connect(node, "client")
    for _ in range(5):
        await client.ok("task_submit", {"task": {"task_type": "echo", "payload": {"message": "m"}}})
    pushes = [await mute.next_push("task_assign") for _ in range(5)]
    conn = node.registry.get("mute").conn
    assert len(conn.pending_assigns) == 3
    assert {ref[0] for ref in conn.pending_assigns.values()} == {p["data"]["task"]["task_id"] for p in pushes[2:]}
    first = pushes[0]["data"]["task"]  # forgotten as pending, but still its own: the result is recorded
    reply = await mute.request("task_result", {"task_id": first["task_id"], "attempt": first["attempt"],
                                               "status": "completed", "result": {"output": "m"}})
    assert reply["message_type"] == "ack" and reply["data"]["result"]["status"] == "completed"
