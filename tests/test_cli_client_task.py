"""`retire-cluster task ID` and the dashboard's `task ID`: the attempt line counts attempts as the
task record defines them (hand-backs use no retry, PROTOCOL.md), and "took" is the run time, not
the time from assignment until the main node heard the result."""

from __future__ import annotations

import json
import re
from typing import Any, Dict

from conftest import FakeClock, Peer, fake_worker, settle

from retire_cluster.main import MainNode
from retire_cluster.tables import task_detail
from retire_cluster.web.render import task_text


def field(text: str, name: str) -> str:
    """The value of one ``name  value`` line of the detail."""
    match = re.search(rf"^{name} +(.*)$", text, re.MULTILINE)
    assert match, text
    return match.group(1)


def history(text: str) -> Dict[str, Dict[str, str]]:
    """The attempts table: attempt number -> {column: cell}."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("attempt  device"))
    names = lines[head].split()
    rows = {}
    for line in lines[head + 2:]:
        cells = re.split(r" {2,}", line.strip())
        rows[cells[0]] = dict(zip(names, cells))
    return rows


async def refuse(node: MainNode, device_id: str) -> None:
    """A device that answers its task_assign with an error (a hand-back), then leaves."""
    picky = await fake_worker(node, device_id, cores=1)
    push = await picky.next_push("task_assign")
    await picky.send_raw(json.dumps({
        "message_type": "error", "message_id": f"e-{device_id}", "sender_id": device_id,
        "data": {"original_message_id": push["message_id"], "code": "overloaded", "error": "not charging"},
    }).encode() + b"\n")  # fmt: skip
    await settle(node)
    await picky.close()
    await settle(node)


async def test_task_detail_counts_hand_backs_apart_and_took_is_the_run_time(node: MainNode,
                                                                           clock: FakeClock) -> None:
    client = await Peer.connect(node)
    task_id = (await client.ok("task_submit", {"task": {"task_type": "echo", "max_retries": 0}}))["task_id"]
    await refuse(node, "phone-a")
    await refuse(node, "phone-b")
    worker = await fake_worker(node, "laptop", cores=1)
    push = await worker.next_push("task_assign")
    task = push["data"]["task"]
    await worker.send_raw(json.dumps({
        "message_type": "ack", "message_id": "a1", "sender_id": "laptop",
        "data": {"original_message_id": push["message_id"], "result": {}},
    }).encode() + b"\n")  # fmt: skip
    await settle(node)
    clock.advance(600)  # the result reaches the main node ten minutes later (a restart, a slow link)
    reply = await worker.request("task_result", {
        "task_id": task_id, "attempt": task["attempt"], "status": "completed", "execution_time": 0.25,
        "result": {"output": "ok", "exit_code": 0}})  # fmt: skip
    assert reply["message_type"] == "ack", reply
    record = (await client.ok("task_status", {"task_id": task_id}))["task"]
    assert record["attempt"] == 3 and record["max_retries"] == 0

    for text in (task_detail(record), task_text(record)):  # the CLI and the dashboard
        # Three assignments, two of them hand-backs: one attempt used of the one allowed.
        assert field(text, "attempt") == "3 (1 counted, at most 1; 2 hand-backs, which use no retry)", text
        assert field(text, "took") == "0.250 s (run time the device reported)"
        rows = history(text)
        assert rows["1"]["outcome"] == "refused" and rows["1"]["took"] == "-"  # it never ran
        assert rows["2"]["outcome"] == "refused" and rows["2"]["took"] == "-"
        assert rows["3"]["outcome"] == "completed" and rows["3"]["took"] == "0.250 s"  # not 10.0 min


def test_attempt_line_without_hand_backs_and_took_without_a_report() -> None:
    base: Dict[str, Any] = {"task_id": "t", "task_type": "sleep", "status": "failed", "max_retries": 1,
                            "attempt": 2, "error": "worker_lost: gave up after 2 attempts"}
    lost = dict(base, attempts=[
        {"attempt": 1, "device_id": "a", "assigned_at": "2027-01-15T08:00:00.000Z",
         "started_at": "2027-01-15T08:00:01.000Z", "finished_at": "2027-01-15T08:00:03.500Z",
         "outcome": "worker_lost"},
        {"attempt": 2, "device_id": "b", "assigned_at": "2027-01-15T08:01:00.000Z",
         "finished_at": "2027-01-15T08:31:00.000Z", "outcome": "worker_lost"}])  # fmt: skip
    text = task_detail(lost)
    assert field(text, "attempt") == "2 (at most 2)"
    rows = history(text)
    assert rows["1"]["took"] == "2.500 s"  # started..finished
    assert rows["2"]["took"] == "-"  # never reported as started: the 30 min since assignment is no run time
    assert "took  " not in text.split("\n\n")[0]  # no run time reported for the task
    one_back = dict(base, attempt=2, max_retries=0, status="pending", attempts=[
        {"attempt": 1, "device_id": "a", "assigned_at": "2027-01-15T08:00:00.000Z",
         "finished_at": "2027-01-15T08:00:00.100Z", "outcome": "handed_back"},
        {"attempt": 2, "device_id": "b", "assigned_at": "2027-01-15T08:01:00.000Z", "outcome": None}])  # fmt: skip
    assert field(task_detail(one_back), "attempt") == "2 (1 counted, at most 1; 1 hand-back, which uses no retry)"
