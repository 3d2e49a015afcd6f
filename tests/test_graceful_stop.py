"""SIGTERM under load: requests the main node already took in are answered before it closes.

Found with the real CLI: a SIGTERM in the middle of a stream of submissions
closed connections whose submissions were being committed, so clients heard
"sent but not answered, check whether it took effect" for tasks that were
stored (and ran).
"""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Peer
from test_commit_order import HeldCommits, on_disk

from retire_cluster.main import MainNode


async def test_submission_committing_at_stop_is_acknowledged(node: MainNode, monkeypatch: Any) -> None:
    client = await Peer.connect(node)
    await client.ok("cluster_status")
    held = HeldCommits(monkeypatch)
    mid = await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"message": "hi"}}})
    await held.started.wait()  # its insert is being committed
    stopping = asyncio.ensure_future(node.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    held.release()
    reply = await client.reply_to(mid)
    await stopping
    assert reply["message_type"] == "ack", reply
    assert on_disk(node, reply["data"]["result"]["task_id"])["status"] == "pending"
