"""Task leases in the monitor: dead entries do not pile up, live ones still expire."""

from __future__ import annotations

from typing import Any

from conftest import Peer, fake_worker, settle
from test_node import report, submit, take_assignment

from retire_cluster.main import MainNode, monitor
from retire_cluster.main.monitor import Monitor
from retire_cluster.main.registry import Registry
from retire_cluster.main.tasks import Task
from retire_cluster.protocol.messages import TaskStatus


def assigned(n: int, now: float, timeout_s: float = 60.0) -> Task:
    task = Task(f"t{n}", "echo", {}, 5, timeout_s, {}, 3, now, n)
    task.status, task.attempt, task.assigned_device, task.assigned_at = TaskStatus.ASSIGNED, 1, "d", now
    return task


def test_leases_of_tasks_that_left_their_device_do_not_pile_up() -> None:
    m = Monitor(Registry(), offline_timeout_s=90)
    tasks = {}
    for n in range(20_000):  # each ends long before its hour-long lease would
        task = tasks[f"t{n}"] = assigned(n, 0.0, timeout_s=3600)
        m.watch(task)
        task.status = TaskStatus.COMPLETED
        m.release(task)
        assert len(m) <= 2 + monitor.COMPACT_SLACK  # one live lease, and the slack
    assert m.due(10_000.0, tasks.get).expired == []


def test_a_live_lease_still_expires_after_the_heap_is_rebuilt() -> None:
    m = Monitor(Registry(), offline_timeout_s=90, lease_grace_s=5)
    slow = assigned(-1, 0.0, timeout_s=100)
    m.watch(slow)
    tasks = {slow.task_id: slow}
    for n in range(5_000):
        task = assigned(n, 0.0)
        tasks[task.task_id] = task
        m.watch(task)
        task.status = TaskStatus.COMPLETED
        m.release(task)
    assert len(m) < 5_000  # rebuilt on the way
    assert m.due(104.0, tasks.get).expired == []
    assert m.due(106.0, tasks.get).expired == [(slow, 1)]


def test_a_requeued_task_keeps_only_its_new_lease(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(monitor, "COMPACT_SLACK", 0)
    m = node.monitor
    task = assigned(1, 0.0)
    for attempt in range(1, 6):  # handed back four times
        task.attempt, task.assigned_at = attempt, 10.0 * attempt
        m.watch(task)
        assert len(m) <= 2  # the dead entries of earlier attempts go at the rebuilds
        m.release(task)
    task.attempt = 6
    m.watch(task)
    assert m.due(1000.0, {task.task_id: task}.get).expired == [(task, 6)]


async def test_the_node_releases_leases_as_tasks_end(node: MainNode, monkeypatch: Any) -> None:
    monkeypatch.setattr(monitor, "COMPACT_SLACK", 0)
    client = await Peer.connect(node)
    worker = await fake_worker(node)
    for _ in range(5):
        await submit(client)
        task = await take_assignment(worker)
        await report(worker, task)
    await settle(node)
    assert len(node.monitor) <= 1  # without release() every finished task's lease would still be there


async def test_a_lease_does_not_expire_while_its_device_is_away(node: MainNode, clock: Any) -> None:
    """A worker that lost its connection (or a main node that restarted) may hold the result, finished
    in time: the lease waits for the device to come back within offline_timeout, then gives the result
    lease_grace_s to arrive. Before, the task ended timeout and the result was ignored as stale."""
    client = await Peer.connect(node)
    kept = await submit(client, timeout=30)
    silent = await submit(client, timeout=30)
    worker = await fake_worker(node, "phone")
    first, second = await take_assignment(worker), await take_assignment(worker)
    assert {first["task_id"], second["task_id"]} == {kept, silent}
    await worker.close()
    await settle(node)
    clock.advance(60)  # past timeout + lease grace, well within offline_timeout
    node.tick(clock())
    await settle(node)
    assert node.lookup(kept).status is TaskStatus.RUNNING
    assert node.lookup(silent).status is TaskStatus.RUNNING
    held = [{"task_id": t["task_id"], "attempt": t["attempt"]} for t in (first, second)]
    back = await fake_worker(node, "phone", running=held)
    clock.advance(node.monitor.lease_grace_s)
    node.tick(clock())  # came back since the last look: one more grace for its results
    await settle(node)
    task = first if first["task_id"] == kept else second
    reply = await report(back, task, output="done in time")
    assert reply["data"]["result"]["status"] == "completed"
    clock.advance(node.monitor.lease_grace_s)
    node.tick(clock())  # the other one's result never came: now the lease expires
    await settle(node)
    assert node.lookup(kept).status is TaskStatus.COMPLETED
    assert node.lookup(silent).status is TaskStatus.TIMEOUT


async def test_a_deferred_lease_ends_with_the_device_going_offline(node: MainNode, clock: Any) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client, timeout=30)
    worker = await fake_worker(node, "phone")
    await take_assignment(worker)
    await worker.close()
    await settle(node)
    clock.advance(60)
    node.tick(clock())
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    clock.advance(node.config.offline_timeout_s)
    node.tick(clock())
    await settle(node)
    task = node.lookup(task_id)
    assert task.status is TaskStatus.PENDING and task.attempts[-1].outcome == "worker_lost"
    assert len(node.monitor._away) == 0
