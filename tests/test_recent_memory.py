"""Finished tasks kept in memory are bounded in bytes as well as in number (main/node.py RECENT_BYTES).

Before, the main node kept the last 10,000 finished tasks with their payloads and
results whatever their size: 300 tasks of 900 KB left it at 625 MB, enough to
take down a Raspberry Pi main node. Older ones are read from the store.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from conftest import Peer, fake_worker, settle

from retire_cluster.main import MainNode


async def run_one(client: Peer, worker: Peer, output: str) -> str:
    task_id = str((await client.ok("task_submit", {"task": {"task_type": "echo", "payload": {"message": "m"}}}))
                  ["task_id"])
    push = await worker.next_push("task_assign")
    await worker.send_raw(json.dumps({"message_type": "ack", "message_id": f"a-{push['message_id']}",
                                      "sender_id": worker.sender_id,
                                      "data": {"original_message_id": push["message_id"], "result": {}}}).encode()
                          + b"\n")
    task: Dict[str, Any] = push["data"]["task"]
    reply = await worker.request("task_result", {"task_id": task["task_id"], "attempt": task["attempt"],
                                                 "status": "completed", "execution_time": 0.01,
                                                 "result": {"output": output, "exit_code": 0}})
    assert reply["message_type"] == "ack", reply
    return task_id


async def test_finished_tasks_in_memory_are_bounded_in_bytes_and_the_rest_come_from_the_store(node: MainNode) -> None:
    node.recent_bytes = 5_000
    worker = await fake_worker(node, "pi")
    client = await Peer.connect(node, "client")
    ids = [await run_one(client, worker, chr(ord("a") + i) * 2_000) for i in range(5)]
    await settle(node)
    in_memory = [task_id for task_id in ids if node.lookup(task_id) is not None]
    assert in_memory == ids[-2:]  # 2 x 2,000 bytes fit in 5,000; a third would not
    assert node._recent_bytes == sum(len(node.lookup(t).result["output"]) + len('{"message":"m"}') for t in in_memory)
    for i, task_id in enumerate(ids):  # every one still answers, with its result
        record = (await client.ok("task_status", {"task_id": task_id}))["task"]
        assert record["status"] == "completed" and record["result"]["output"] == chr(ord("a") + i) * 2_000


async def test_a_single_task_bigger_than_the_bound_is_still_kept(node: MainNode) -> None:
    """The newest finished task stays (a waiter or the dashboard is about to ask for it)."""
    node.recent_bytes = 100
    worker = await fake_worker(node, "pi")
    client = await Peer.connect(node, "client")
    first = await run_one(client, worker, "x" * 1_000)
    assert node.lookup(first) is not None
    second = await run_one(client, worker, "y" * 1_000)
    assert node.lookup(second) is not None and node.lookup(first) is None
    assert node._recent_bytes == 1_000 + len('{"message":"m"}')
