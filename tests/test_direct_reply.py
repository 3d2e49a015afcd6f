"""The ack of a waited ``task_submit``, written by the store's thread the moment its commit returns.

The reply to a client that waits for its task's end is ready before the
commit that records the end (``_EndWaiter.ending``). The thread that ran the
commit writes it at once (``Connection.write_from_thread``) instead of
waking the event loop to do it; the loop sends it only when that could not
be done: a socket with frames of its own waiting, a write the socket took
only in part (the loop writes the rest), or a failed commit (the error goes
out instead). In every case the client gets exactly one reply.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Tuple

from conftest import Peer, fake_worker, settle
from test_commit_order import HeldCommits, on_disk
from test_node import report, take_assignment

from retire_cluster.main import MainNode
from retire_cluster.main import server as server_module
from retire_cluster.main.server import Connection

ECHO: Dict[str, Any] = {"task_type": "echo", "payload": {"message": "hi"}}


def spy(monkeypatch: Any) -> List[Tuple[bool, bool]]:
    """Each write_from_thread call as (made off the event loop's thread, the frame went out)."""
    calls: List[Tuple[bool, bool]] = []
    real = Connection.write_from_thread
    loop_thread = threading.get_ident()

    def wrapped(self: Connection, frame: bytes) -> bool:
        sent = real(self, frame)
        calls.append((threading.get_ident() != loop_thread, sent))
        return sent

    monkeypatch.setattr(Connection, "write_from_thread", wrapped)
    return calls


async def only_reply(client: Peer, mid: str, task_id: str) -> Dict[str, Any]:
    """The one reply to ``mid``: the reply to a request sent after it comes next, no second one between."""
    reply = await client.reply_to(mid)
    probe = await client.send("task_status", {"task_id": task_id})
    following = await client.recv()
    assert following["data"].get("original_message_id") == probe, f"a second reply to {mid}: {following}"
    return reply


async def test_the_waited_ack_is_written_by_the_commit_thread_once(node: MainNode, monkeypatch: Any) -> None:
    calls = spy(monkeypatch)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": ECHO, "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task, output="hi")
    reply = await only_reply(client, mid, task["task_id"])
    assert reply["message_type"] == "ack", reply
    record = reply["data"]["result"]["task"]
    assert (record["task_id"], record["status"], record["result"]["output"]) == (task["task_id"], "completed", "hi")
    assert on_disk(node, task["task_id"])["status"] == "completed"  # what the reply says is on disk
    assert calls == [(True, True)]  # from the SQLite thread, and it went out there
    await settle(node)
    assert not node._end_waiters and not client.pushed


async def test_a_socket_with_frames_waiting_leaves_the_ack_to_the_loop(node: MainNode, monkeypatch: Any) -> None:
    calls = spy(monkeypatch)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": ECHO, "wait": 30})
    task = await take_assignment(worker)
    conn = next(c for c in node.server.connections if c.end_waits)
    conn._out.append(b'{"message_type":"ping-that-was-queued"}\n')  # a frame of the loop's, not yet written
    await report(worker, task, output="hi")
    reply = await only_reply(client, mid, task["task_id"])
    assert reply["data"]["result"]["task"]["status"] == "completed"
    assert [m["message_type"] for m in client.pushed] == ["ping-that-was-queued"]  # it went first
    assert calls == [(True, False)]


async def test_what_the_socket_did_not_take_the_loop_writes_next(node: MainNode, monkeypatch: Any) -> None:
    calls = spy(monkeypatch)

    class Partial:  # the socket takes 7 bytes of the frame
        dup, close = staticmethod(os.dup), staticmethod(os.close)

        @staticmethod
        def write(fd: int, data: bytes) -> int:
            return os.write(fd, data[:7])

    monkeypatch.setattr(server_module, "os", Partial)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": ECHO, "wait": 30})
    task = await take_assignment(worker)
    await report(worker, task, output="hi")
    reply = await only_reply(client, mid, task["task_id"])  # whole: 7 bytes from the thread, the rest from the loop
    assert reply["data"]["result"]["task"]["result"]["output"] == "hi"
    assert calls == [(True, True)]


async def test_a_failed_commit_writes_no_ack_and_the_error_is_the_answer(node: MainNode, monkeypatch: Any) -> None:
    calls = spy(monkeypatch)
    monkeypatch.setattr(node, "wait_hold_s", 3600.0)  # the insert rides with the result
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    await settle(node)
    mid = await client.send("task_submit", {"task": ECHO, "wait": 30})
    task = await take_assignment(worker)
    held = HeldCommits(monkeypatch)
    await worker.send("task_result", {"task_id": task["task_id"], "attempt": task["attempt"], "status": "completed",
                                      "execution_time": 0.01, "result": {"output": "hi", "exit_code": 0}})
    await held.started.wait()
    held.release(fail=True)
    reply = await client.reply_to(mid)
    assert reply["message_type"] == "error" and reply["data"]["code"] == "internal", reply
    assert calls == []  # nothing written from the thread after a failed commit


async def test_a_wait_that_runs_out_while_the_end_commits_still_gets_one_reply(node: MainNode,
                                                                               monkeypatch: Any) -> None:
    calls = spy(monkeypatch)
    monkeypatch.setattr(node, "wait_hold_s", 0.0)  # the insert is committed on its own, before the end
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    mid = await client.send("task_submit", {"task": ECHO, "wait": 30})
    task = await take_assignment(worker)
    await settle(node)
    held = HeldCommits(monkeypatch)
    await worker.send("task_result", {"task_id": task["task_id"], "attempt": task["attempt"], "status": "completed",
                                      "execution_time": 0.01, "result": {"output": "hi", "exit_code": 0}})
    await held.started.wait()  # the end's commit is under way, its ack handed to the thread
    (waiter,) = node._end_waiters[task["task_id"]]
    assert waiter.reply is not None
    waiter.ran_out()  # as if its 30 s were up now: it must not answer before the thread has had its say
    held.release()
    reply = await only_reply(client, mid, task["task_id"])
    assert reply["data"]["result"]["task"]["status"] == "completed"
    assert calls == [(True, True)]
    await settle(node)
    assert not node._end_waiters
