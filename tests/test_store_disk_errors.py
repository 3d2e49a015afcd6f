"""A disk that refuses commits (full, read-only, I/O errors): clear refusals, and no state left behind on it.

Found with the real CLI and a 1.5 MB tmpfs as the data dir: submissions were
refused as "Internal error (reference ...)", and a worker's result whose
commit hit the full disk stayed recorded in memory only, so after the disk
had room again the database kept the task ``assigned`` until a restart ran it
once more. Here the disk is simulated in the SQLite thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from conftest import FakeClock, Peer, fake_worker, settle
from test_commit_order import on_disk
from test_node import report, submit, take_assignment

from retire_cluster.main import MainNode, store
from retire_cluster.protocol.messages import TaskStatus


class BrokenDisk:
    """Fails every commit with ``error`` while ``broken`` is set."""

    def __init__(self, monkeypatch: Any, error: str = "database or disk is full") -> None:
        self.broken = threading.Event()
        self.error = error
        apply_batch = store._apply_batch

        def apply(db: Any, groups: Any) -> None:  # runs in the SQLite thread
            if self.broken.is_set():
                raise sqlite3.OperationalError(self.error)
            apply_batch(db, groups)

        monkeypatch.setattr(store, "_apply_batch", apply)


async def test_submission_refused_by_a_full_disk_says_so(node: MainNode, monkeypatch: Any) -> None:
    disk = BrokenDisk(monkeypatch)
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    disk.broken.set()
    reply = await client.request("task_submit", {"task": {"task_type": "echo", "payload": {"message": "x"}}})
    assert reply["message_type"] == "error" and reply["data"]["code"] == "internal"
    text = reply["data"]["error"]
    assert "database or disk is full" in text and "not stored" in text, text
    assert not node.tasks


async def test_read_only_disk_is_named_too(node: MainNode, monkeypatch: Any) -> None:
    disk = BrokenDisk(monkeypatch, "attempt to write a readonly database")
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    disk.broken.set()
    reply = await client.request("task_submit", {"task": {"task_type": "echo"}})
    assert reply["data"]["code"] == "internal"
    assert "readonly database" in reply["data"]["error"]


async def test_result_refused_by_a_full_disk_is_written_once_it_has_room(
    node: MainNode, clock: FakeClock, monkeypatch: Any
) -> None:
    disk = BrokenDisk(monkeypatch)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    task_id = await submit(client)
    task = await take_assignment(worker)
    await settle(node)
    disk.broken.set()
    refused = await report(worker, task, output="kept")
    assert refused["message_type"] == "error" and "not stored" in refused["data"]["error"]
    assert node.lookup(task_id).status is TaskStatus.COMPLETED  # memory moved on
    assert on_disk(node, task_id)["status"] in ("assigned", "running")
    node.tick(clock.advance(1))  # still full: tried again, refused again, kept for the next tick
    await asyncio.sleep(0)
    await asyncio.gather(node.store.flush(), return_exceptions=True)
    await asyncio.sleep(0)
    assert on_disk(node, task_id)["status"] in ("assigned", "running")
    disk.broken.clear()
    node.tick(clock.advance(1))
    await settle(node)
    assert on_disk(node, task_id)["status"] == "completed"
    with sqlite3.connect(str(node.config.db_path)) as db:
        result, = db.execute("SELECT result FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        outcome, = db.execute("SELECT outcome FROM task_attempts WHERE task_id=?", (task_id,)).fetchone()
    assert '"kept"' in result and outcome == "completed"
    # The worker's copy comes again (its outbox) and changes nothing.
    again = await report(worker, task, output="kept")
    assert again["message_type"] == "ack" and again["data"]["result"]["stale"] is True


async def test_refused_submission_is_not_written_later(
    node: MainNode, clock: FakeClock, monkeypatch: Any
) -> None:
    """A task whose insert failed was refused and dropped: retrying writes must not bring it back."""
    disk = BrokenDisk(monkeypatch)
    client = await Peer.connect(node)
    watcher = await Peer.connect(node, "watcher")
    await watcher.ok("subscribe", {})
    worker = await fake_worker(node)
    disk.broken.set()
    reply = await client.request("task_submit", {"task": {"task_type": "echo"}})
    assert reply["message_type"] == "error"
    push = await worker.next_push("task_assign")  # sent while its insert committed
    refused = await report(worker, dict(push["data"]["task"]))  # its result, while the disk is still full
    assert refused["message_type"] == "error"
    disk.broken.clear()
    node.tick(clock.advance(1))
    await settle(node)
    task_id = push["data"]["task"]["task_id"]
    assert on_disk(node, task_id) is None and node.lookup(task_id) is None
    await watcher.ok("cluster_status")
    assert not [m for m in watcher.pushed if m["message_type"] == "task_update"]


async def test_assignment_refused_by_a_full_disk_goes_out_once_it_has_room(
    node: MainNode, clock: FakeClock, monkeypatch: Any
) -> None:
    """A stored task assigned while the disk is full was never sent: it must not wait out its lease (an hour)."""
    disk = BrokenDisk(monkeypatch)
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1)  # one slot
    await submit(client)
    first = await take_assignment(worker)
    second_id = await submit(client)  # stored, pending: the slot is busy
    await settle(node)
    disk.broken.set()
    assert (await report(worker, first))["message_type"] == "error"  # frees the slot: the second is assigned
    await asyncio.gather(node.store.flush(), return_exceptions=True)
    second = node.lookup(second_id)
    assert second.status is TaskStatus.ASSIGNED and second.assigned_device == "dev-1"
    assert on_disk(node, second_id)["status"] == "pending"
    disk.broken.clear()
    node.tick(clock.advance(1))
    push = await worker.next_push("task_assign", timeout=5)
    assert push["data"]["task"]["task_id"] == second_id and push["data"]["task"]["attempt"] == 1
    await settle(node)
    assert on_disk(node, second_id)["status"] == "assigned"
    assert on_disk(node, first["task_id"])["status"] == "completed"
