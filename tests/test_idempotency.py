"""Idempotency keys: memory holds the keys of tasks in memory only; older ones are found in the store.

A key the main node has never seen costs no database read (the key filter
says "certainly not"); a key of a task that left memory is looked up in the
store, once at a time per key, so two submissions with it still make one task.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import FakeClock, Peer, make_config, settle

from retire_cluster.main import MainNode
from retire_cluster.main.keyfilter import KeyFilter
from retire_cluster.main.store import Store


async def submit(client: Peer, key: str, **data: Any) -> Dict[str, Any]:
    return await client.ok("task_submit", {"task": {"task_type": "echo", "idempotency_key": key}, **data})


async def end(client: Peer, task_id: str) -> None:
    await client.ok("task_cancel", {"task_id": task_id})


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    keys: List[str] = []
    real = Store.find_idempotent

    async def counted(self: Store, key: str) -> Any:
        keys.append(key)
        return await real(self, key)

    monkeypatch.setattr(Store, "find_idempotent", counted)
    return keys


async def test_keys_of_tasks_that_left_memory_are_dropped_and_still_found(
    node: MainNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.recent_tasks = 3
    lookups = count_lookups(monkeypatch)
    client = await Peer.connect(node)
    ids = []
    for i in range(12):
        ids.append((await submit(client, f"k-{i}"))["task_id"])
        await end(client, ids[-1])
    assert len(node._idempotency) == 3  # the keys of the 3 recent tasks; before, all 12 stayed
    assert lookups == []  # new keys: no store lookup

    again = await submit(client, "k-0")
    assert again == {"task_id": ids[0], "existing": True} and lookups == ["k-0"]
    waited = await submit(client, "k-1", wait=5)
    assert waited["task_id"] == ids[1] and waited["existing"] is True
    assert waited["task"]["status"] == "cancelled" and waited["task"]["task_id"] == ids[1]
    recent = await submit(client, "k-11")  # still in memory: no lookup
    assert recent["task_id"] == ids[11] and lookups == ["k-0", "k-1"]
    assert len((await client.ok("task_list", {"limit": 100}))["tasks"]) == 12


async def test_two_submissions_with_a_seen_key_at_once_make_one_task(
    node: MainNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = count_lookups(monkeypatch)
    node._old_keys.add("maybe")  # the filter says "maybe" (as for 1 new key in 100): the store decides
    client = await Peer.connect(node)
    frames = b"".join(
        json.dumps({"message_type": "task_submit", "message_id": f"m-{i}", "sender_id": "client-1",
                    "auth_token": node.token,
                    "data": {"task": {"task_type": "echo", "idempotency_key": "maybe"}}}).encode() + b"\n"
        for i in range(3)
    )
    await client.send_raw(frames)  # three in one read: all arrive while the first lookup runs
    replies = [(await client.reply_to(f"m-{i}"))["data"]["result"] for i in range(3)]
    assert lookups == ["maybe"]  # one lookup; the others waited for it, then found the task in memory
    assert len({r["task_id"] for r in replies}) == 1
    assert [r.get("existing", False) for r in replies] == [False, True, True]
    assert len((await client.ok("task_list", {}))["tasks"]) == 1


async def test_after_a_restart_only_unfinished_tasks_keys_are_in_memory(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        client = await Peer.connect(node)
        done = (await submit(client, "done-key"))["task_id"]
        await end(client, done)
        pending = (await submit(client, "pending-key"))["task_id"]
        await settle(node)
        await client.close()
    finally:
        await node.stop()
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        assert node._idempotency == {"pending-key": pending}
        assert "done-key" in node._old_keys
        client = await Peer.connect(node)
        assert await submit(client, "done-key") == {"task_id": done, "existing": True}
        assert await submit(client, "pending-key") == {"task_id": pending, "existing": True}
    finally:
        await node.stop()


async def test_store_reads_keys_in_chunks(tmp_path: Path) -> None:
    node = MainNode(make_config(tmp_path), run_monitor=False)
    await node.start()
    try:
        client = await Peer.connect(node)
        for i in range(7):
            await submit(client, f"c-{i}")
        await settle(node)
        keys = [key async for key in node.store.idempotency_keys(chunk=2)]
        assert sorted(keys) == [f"c-{i}" for i in range(7)]
    finally:
        await node.stop()


def test_key_filter_has_no_false_negatives_and_few_false_positives() -> None:
    keys = KeyFilter(capacity=1_000, error_rate=0.01)
    for i in range(5_000):  # past the first layer: more layers are added
        keys.add(f"key-{i}")
    assert len(keys) == 5_000
    assert all(f"key-{i}" in keys for i in range(5_000))
    false_positives = sum(f"other-{i}" in keys for i in range(20_000))
    assert false_positives < 20_000 * 0.02  # under twice the first layer's rate
    assert keys.nbytes < 5_000 * 4  # a few bytes a key (a dict entry costs 150-200)
    assert 42 not in keys


def test_key_filter_takes_any_unicode() -> None:
    keys = KeyFilter()
    for key in ["é", "😀", "k\x00", "\ud800", ""]:
        keys.add(key)
        assert key in keys


async def test_concurrent_waiters_survive_a_failed_lookup(node: MainNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that fails answers its submission with an error; the next one with the key asks again."""
    calls = []

    async def broken(self: Store, key: str) -> Any:
        calls.append(key)
        if len(calls) == 1:
            await asyncio.sleep(0)
            raise OSError("disk went away")
        return None

    monkeypatch.setattr(Store, "find_idempotent", broken)
    node._old_keys.add("flaky")
    client = await Peer.connect(node)
    first = await client.request("task_submit", {"task": {"task_type": "echo", "idempotency_key": "flaky"}})
    assert first["message_type"] == "error" and first["data"]["code"] == "internal"
    second = await submit(client, "flaky")
    assert calls == ["flaky", "flaky"] and "existing" not in second
    assert node._key_lookups == {}
