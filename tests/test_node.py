"""The main node's task semantics over real TCP on 127.0.0.1, with time from a FakeClock.

The test plays the worker with raw JSON frames, so every assertion is about
what the main node does, not what our worker happens to do.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from conftest import FakeClock, Peer, fake_worker, register_data, settle

from retire_cluster.main import MainNode
from retire_cluster.protocol.messages import TaskStatus


async def submit(client: Peer, task_type: str = "echo", **task: Any) -> str:
    spec: Dict[str, Any] = {"task_type": task_type, "payload": task.pop("payload", {"message": "hi"})}
    spec.update(task)
    return str((await client.ok("task_submit", {"task": spec}))["task_id"])


async def take_assignment(worker: Peer, accept: bool = True) -> Dict[str, Any]:
    push = await worker.next_push("task_assign")
    if accept:
        await worker.send_raw(json.dumps({
            "message_type": "ack", "message_id": f"a-{push['message_id']}", "sender_id": worker.sender_id,
            "data": {"original_message_id": push["message_id"], "result": {}},
        }).encode() + b"\n")
    return dict(push["data"]["task"])


async def report(worker: Peer, task: Dict[str, Any], status: str = "completed", output: str = "ok",
                 attempt: Any = None) -> Dict[str, Any]:
    return await worker.request("task_result", {
        "task_id": task["task_id"], "attempt": task["attempt"] if attempt is None else attempt,
        "status": status, "execution_time": 0.01, "result": {"output": output, "exit_code": 0},
    })


async def status_of(client: Peer, task_id: str) -> Dict[str, Any]:
    return dict((await client.ok("task_status", {"task_id": task_id}))["task"])


async def test_submit_assign_result_and_subscribe(node: MainNode) -> None:
    client = await Peer.connect(node)
    watcher = await Peer.connect(node, "watcher")
    await watcher.ok("subscribe", {})
    task_id = await submit(client, payload={"message": "hello"})
    worker = await fake_worker(node)
    task = await take_assignment(worker)
    assert task["task_id"] == task_id and task["attempt"] == 1 and task["payload"] == {"message": "hello"}
    reply = await report(worker, task, output="hello")
    assert reply["message_type"] == "ack" and reply["data"]["result"]["status"] == "completed"
    record = await status_of(client, task_id)
    assert record["status"] == "completed"
    assert record["result"]["output"] == "hello"
    assert record["assigned_device"] == "dev-1"
    assert [a["outcome"] for a in record["attempts"]] == ["completed"]
    seen = []
    while not seen or seen[-1] != "completed":
        update = await watcher.next_push("task_update")
        seen.append(update["data"]["task"]["status"])
    assert seen[0] == "pending" and "assigned" in seen and seen[-1] == "completed"


async def test_priority_then_fifo(node: MainNode) -> None:
    client = await Peer.connect(node)
    low = await submit(client, priority="low")
    normal1 = await submit(client)
    urgent = await submit(client, priority="urgent")
    normal2 = await submit(client, priority=5)
    high = await submit(client, priority=10)
    worker = await fake_worker(node, cores=1)
    order = []
    for _ in range(5):
        task = await take_assignment(worker)
        order.append(task["task_id"])
        await report(worker, task)
    assert order == [urgent, high, normal1, normal2, low]


async def test_requirements_match_cores_memory_role_capabilities(node: MainNode) -> None:
    client = await Peer.connect(node)
    big_id = await submit(client, requirements={"min_cpu_cores": 4, "min_memory_gb": 8})
    cap_id = await submit(client, requirements={"capabilities": ["gpu"], "role": "compute"})
    small = await fake_worker(node, "small", cores=2, memory_gb=4)
    await settle(node)
    assert small.pushed == [] and node.lookup(big_id).status is TaskStatus.PENDING
    big = await fake_worker(node, "big", cores=8, memory_gb=16)
    task = await take_assignment(big)
    assert task["task_id"] == big_id
    await report(big, task)
    gpu = await Peer.connect(node, "gpu-box")
    data = register_data(cores=4)
    data["capabilities"] = ["computational", "gpu"]
    data["device_info"]["role"] = "compute"
    assert (await gpu.request("register", data))["message_type"] == "ack"
    task = await take_assignment(gpu)
    assert task["task_id"] == cap_id


async def test_task_type_must_be_offered(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client, "python_eval", payload={"expression": "1+1"})
    await fake_worker(node, "plain", task_types=["echo", "sleep"])
    await settle(node)
    assert node.lookup(task_id).status is TaskStatus.PENDING
    capable = await fake_worker(node, "capable", task_types=["echo", "python_eval"])
    assert (await take_assignment(capable))["task_id"] == task_id


async def test_unknown_requirement_and_bad_priority_refused(node: MainNode) -> None:
    client = await Peer.connect(node)
    reply = await client.request("task_submit", {"task": {"task_type": "echo", "requirements": {"min_cpus": 2}}})
    assert reply["data"]["code"] == "invalid_message"
    assert reply["data"]["path"] == "$.data.task.requirements"
    reply = await client.request("task_submit", {"task": {"task_type": "echo", "priority": "asap"}})
    assert reply["data"]["code"] == "invalid_message"
    assert (await client.ok("task_list", {}))["tasks"] == []


async def test_result_from_another_device_is_forbidden(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    holder = await fake_worker(node, "holder", cores=1)
    task = await take_assignment(holder)
    intruder = await fake_worker(node, "intruder", cores=1)
    reply = await report(intruder, task, output="forged")
    assert reply["message_type"] == "error" and reply["data"]["code"] == "forbidden"
    assert (await status_of(client, task_id))["status"] == "running"
    assert (await report(holder, task, output="real"))["message_type"] == "ack"
    assert (await status_of(client, task_id))["result"]["output"] == "real"


async def test_duplicate_result_acknowledged_and_changes_nothing(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    worker = await fake_worker(node)
    task = await take_assignment(worker)
    assert (await report(worker, task, output="first"))["message_type"] == "ack"
    again = await report(worker, task, output="second")
    assert again["message_type"] == "ack" and again["data"]["result"]["stale"] is True
    record = await status_of(client, task_id)
    assert record["result"]["output"] == "first" and record["status"] == "completed"


async def test_result_needs_register(node: MainNode) -> None:
    peer = await Peer.connect(node, "nobody")
    reply = await peer.request("task_result", {"task_id": "x", "attempt": 1, "status": "completed"})
    assert reply["data"]["code"] == "not_registered"
    reply = await peer.request("heartbeat", {})
    assert reply["data"]["code"] == "not_registered"


async def test_sender_id_must_match_registered_device(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-a")
    worker.sender_id = "dev-b"
    reply = await worker.request("heartbeat", {})
    assert reply["data"]["code"] == "forbidden"


async def test_device_offline_requeues_with_next_attempt(node: MainNode, clock: FakeClock) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    first = await fake_worker(node, "first", cores=1)
    task = await take_assignment(first)
    second = await fake_worker(node, "second", cores=1)
    clock.advance(200)
    await second.ok("heartbeat", {})
    clock.advance(node.config.offline_timeout_s - 100)  # first silent for 400 s, second for 200 s
    node.tick(clock())
    retry = await take_assignment(second)
    assert retry["task_id"] == task_id and retry["attempt"] == 2
    late = await report(first, task) if not first.reader.at_eof() else None
    assert late is None or late["message_type"] == "ack"
    assert (await report(second, retry, output="done"))["message_type"] == "ack"
    record = await status_of(client, task_id)
    assert record["status"] == "completed" and record["result"]["output"] == "done"
    assert [(a["device_id"], a["outcome"]) for a in record["attempts"]] == [
        ("first", "worker_lost"), ("second", "completed")]
    assert node.registry.get("first").status.value == "offline"


async def test_max_retries_then_failed_worker_lost(node: MainNode, clock: FakeClock) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client, max_retries=1)
    for n in range(2):
        worker = await fake_worker(node, f"doomed-{n}", cores=1)
        task = await take_assignment(worker)
        assert task["attempt"] == n + 1
        await worker.close()
        clock.advance(node.config.offline_timeout_s + 1)
        node.tick(clock())
        await settle(node)
    record = await status_of(client, task_id)
    assert record["status"] == "failed"
    assert record["error"].startswith("worker_lost")
    assert record["attempt"] == 2


async def test_task_timeout_expires_lease_and_ignores_late_result(node: MainNode, clock: FakeClock) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client, timeout=30)
    worker = await fake_worker(node)
    task = await take_assignment(worker)
    clock.advance(29)
    await worker.ok("heartbeat", {})
    node.tick(clock())
    await settle(node)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    clock.advance(30)
    await worker.ok("heartbeat", {})
    node.tick(clock())
    cancel = await worker.next_push("task_cancel")
    assert cancel["data"] == {"task_id": task_id, "attempt": 1, "reason": "timeout"}
    late = await report(worker, task, output="too late")
    assert late["message_type"] == "ack" and late["data"]["result"]["stale"] is True
    record = await status_of(client, task_id)
    assert record["status"] == "timeout" and record["result"] is None


async def test_reconnect_reporting_running_task_keeps_it(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    worker = await fake_worker(node, "phone")
    task = await take_assignment(worker)
    await worker.close()
    await settle(node)
    again = await fake_worker(node, "phone", running=[{"task_id": task_id, "attempt": 1}])
    await settle(node)
    assert node.lookup(task_id).status is TaskStatus.RUNNING
    assert (await report(again, task, output="kept"))["data"]["result"]["status"] == "completed"
    record = await status_of(client, task_id)
    assert record["attempt"] == 1 and record["result"]["output"] == "kept"


async def test_reconnect_without_reporting_requeues_at_once(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    worker = await fake_worker(node, "phone", cores=1)
    await take_assignment(worker)
    await worker.close()
    again = await fake_worker(node, "phone", cores=1, running=[])
    retry = await take_assignment(again)
    assert retry["task_id"] == task_id and retry["attempt"] == 2


async def test_second_connection_with_same_id_replaces_first(node: MainNode) -> None:
    old = await fake_worker(node, "phone")
    new = await fake_worker(node, "phone")
    assert await old.closed_by_peer()
    assert (await new.ok("heartbeat", {}))["active_tasks"] == 0


async def test_worker_refusal_hands_back_without_using_a_retry(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client, max_retries=0)
    picky = await fake_worker(node, "picky", cores=1)
    push = await picky.next_push("task_assign")
    await picky.send_raw(json.dumps({
        "message_type": "error", "message_id": "e1", "sender_id": "picky",
        "data": {"original_message_id": push["message_id"], "code": "overloaded", "error": "busy"},
    }).encode() + b"\n")
    await settle(node)
    await picky.close()
    await settle(node)
    other = await fake_worker(node, "other", cores=1)
    task = await take_assignment(other)
    assert task["task_id"] == task_id and task["attempt"] == 2
    assert (await report(other, task))["data"]["result"]["status"] == "completed"


async def test_cancel_pending_running_and_finished(node: MainNode) -> None:
    client = await Peer.connect(node)
    pending = await submit(client, requirements={"min_cpu_cores": 64})
    result = await client.ok("task_cancel", {"task_id": pending})
    assert result["status"] == "cancelled"
    running = await submit(client)
    worker = await fake_worker(node)
    task = await take_assignment(worker)
    await client.ok("task_cancel", {"task_id": running})
    cancel = await worker.next_push("task_cancel")
    assert cancel["data"]["task_id"] == running
    stale = await report(worker, task, status="cancelled")
    assert stale["message_type"] == "ack"
    assert (await status_of(client, running))["status"] == "cancelled"
    again = await client.request("task_cancel", {"task_id": running})
    assert again["data"]["code"] == "conflict"
    missing = await client.request("task_cancel", {"task_id": "no-such-task"})
    assert missing["data"]["code"] == "not_found"


async def test_idempotent_submission_returns_existing_task(node: MainNode) -> None:
    client = await Peer.connect(node)
    first = await client.ok("task_submit", {"task": {"task_type": "echo", "idempotency_key": "k-1"}})
    second = await client.ok("task_submit", {"task": {"task_type": "echo", "idempotency_key": "k-1"}})
    assert second["task_id"] == first["task_id"] and second["existing"] is True
    assert len((await client.ok("task_list", {}))["tasks"]) == 1


async def test_list_filters_and_cluster_status(node: MainNode) -> None:
    client = await Peer.connect(node)
    ids = [await submit(client) for _ in range(3)]
    await submit(client, "sleep", payload={"seconds": 1})
    listed = await client.ok("task_list", {"task_type": "echo", "limit": 2})
    assert [t["task_id"] for t in listed["tasks"]] == [ids[2], ids[1]]
    await fake_worker(node)
    status = await client.ok("cluster_status", {})
    assert status["devices"]["online"] == 1
    assert sum(status["tasks"].values()) == 4
    devices = (await client.ok("list_devices", {}))["devices"]
    assert devices[0]["device_id"] == "dev-1" and devices[0]["hardware_specs"]["cpu_cores"] == 2


async def test_restart_recovers_tasks_and_gives_devices_grace(tmp_path, clock: FakeClock) -> None:
    from conftest import make_config

    config = make_config(tmp_path)
    first = MainNode(config, clock=clock, run_monitor=False)
    await first.start()
    client = await Peer.connect(first)
    held = await submit(client)
    worker = await fake_worker(first, "steady", cores=1)
    await take_assignment(worker)
    queued = await submit(client)
    await worker.close()
    await client.close()
    await first.stop()

    clock.advance(10)
    second = MainNode(config, clock=clock, run_monitor=False)
    await second.start()
    try:
        assert second.lookup(held).status is TaskStatus.RUNNING
        assert second.lookup(queued).status is TaskStatus.PENDING
        clock.advance(config.offline_timeout_s - 1)
        second.tick(clock())  # within grace: nothing taken back
        assert second.lookup(held).assigned_device == "steady"
        back = await fake_worker(second, "steady", cores=1, running=[{"task_id": held, "attempt": 1}])
        await settle(second)
        assert second.lookup(held).status is TaskStatus.RUNNING
        await back.close()
    finally:
        await second.stop()


async def test_cancel_assigned_task_before_the_worker_accepted(node: MainNode) -> None:
    client = await Peer.connect(node)
    task_id = await submit(client)
    worker = await fake_worker(node, cores=1)
    await take_assignment(worker, accept=False)
    assert node.lookup(task_id).status is TaskStatus.ASSIGNED
    result = await client.ok("task_cancel", {"task_id": task_id})
    assert result["status"] == "cancelled"
    cancel = await worker.next_push("task_cancel")
    assert cancel["data"]["task_id"] == task_id and cancel["data"]["attempt"] == 1
    assert node.registry.get("dev-1").running == set()


async def test_strategy_and_breaker_visible_in_devices(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1)
    for _ in range(node.config.breaker_failures):
        await submit(client)
        task = await take_assignment(worker)
        await report(worker, task, status="failed")
    device = (await client.ok("list_devices"))["devices"][0]
    assert device["circuit_breaker"]["state"] == "open"
    assert device["statistics"]["failures"] == node.config.breaker_failures
    assert device["statistics"]["requests"] == node.config.breaker_failures
    parked = await submit(client)
    await settle(node)
    assert node.lookup(parked).status is TaskStatus.PENDING  # the open breaker keeps work away


async def test_admin_weight_overrides_the_workers_own(tmp_path, clock: FakeClock) -> None:
    from conftest import make_config

    node = MainNode(make_config(tmp_path, device_weights={"big": 5.0}), clock=clock, run_monitor=False)
    await node.start()
    try:
        await fake_worker(node, "big", weight=1.0)
        await fake_worker(node, "small", weight=2.0)
        assert node.registry.get("big").weight == 5.0
        assert node.registry.get("small").weight == 2.0
    finally:
        await node.stop()


def test_device_weights_must_be_positive(tmp_path) -> None:
    import pytest
    from conftest import make_config

    from retire_cluster.main.config import ConfigError

    with pytest.raises(ConfigError, match="device_weights"):
        make_config(tmp_path, device_weights={"x": 0})


async def test_heartbeats_reindex_devices_only_when_work_is_waiting(node: MainNode, monkeypatch: Any) -> None:
    """A heartbeat changes its device; with nothing pending the scheduler's index is left alone until work comes."""
    updated: list = []
    real = node.scheduler.update_device
    monkeypatch.setattr(node.scheduler, "update_device", lambda device, now: (updated.append(device.device_id),
                                                                                real(device, now)))
    worker = await fake_worker(node)
    for _ in range(3):
        await worker.ok("heartbeat", {})
    await settle(node)
    assert updated == []
    client = await Peer.connect(node)
    task_id = await submit(client)
    task = await take_assignment(worker)
    assert task["task_id"] == task_id and set(updated) == {"dev-1"}


async def test_task_ids_are_random_hex_drawn_from_the_os_in_pools(node: MainNode, monkeypatch: Any) -> None:
    import secrets

    from retire_cluster.main import node as node_module

    calls = []
    real = secrets.token_bytes

    def counted(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(node_module.secrets, "token_bytes", counted)
    ids = [node.new_task_id() for _ in range(node_module.ID_POOL * 2 + 1)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    # one getrandom() per ID_POOL ids, not one per id
    assert calls == [8 * node_module.ID_POOL] * 3


async def test_a_completed_task_that_reported_progress_reads_100_not_its_last_report(node: MainNode) -> None:
    """Before, a 3 s sleep that reported 33% and 66.7% ended `completed` with progress 66.7 in its record."""
    client = await Peer.connect(node)
    task_id = await submit(client)
    worker = await fake_worker(node, "w", cores=1)
    task = await take_assignment(worker)
    assert (await worker.request("task_progress", {"task_id": task_id, "attempt": task["attempt"],
                                                   "progress": 66.7}))["message_type"] == "ack"
    assert (await status_of(client, task_id))["progress"] == 66.7
    await report(worker, task)
    record = await status_of(client, task_id)
    assert (record["status"], record["progress"]) == ("completed", 100.0)
    other = await submit(client)  # one that never reported progress keeps null
    await report(worker, await take_assignment(worker))
    assert (await status_of(client, other))["progress"] is None
