"""Awkward strings through the wire, the store and a restart: kept exactly, or refused with a type.

Identifiers and names refuse control characters (schemas: common.json ``id`` and
envelope ids, register.json ``device_info``, task_submit.json ``task_type`` and
``idempotency_key``): they end up in tables on terminals and in log lines.
Payloads are data: NUL, quotes, emoji and long strings are kept exactly. The
store writes them as ``json.dumps`` text (NUL becomes ``\\u0000``), always with
placeholders.
"""

from __future__ import annotations

import ast
import re
import sqlite3
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import FakeClock, Peer, make_config, register_data, settle

from retire_cluster.main import MainNode

AWKWARD_IDS = [
    "dev'; DROP TABLE tasks; --",
    'dev"quoted"',
    "téléphone-😀-\u202e-rtl",
    "x" * 120,  # ids may be 128 characters; the test peer adds "-1" for its message ids
    "back\\slash %s %% ?",
]

PAYLOAD: Dict[str, Any] = {
    "message": "a\u0000b \"double\" 'single' \\ back \u00e9 😀 \u2028 \u007f",
    "nul\u0000key": ["\u0000", "", "\u0000\u0000"],
    "sql": "'); DELETE FROM tasks; --",
    "long": "é😀" * 40_000,  # 720 KB as the test peer writes it (ASCII escapes), under 1 MiB
    "numbers": [0, -1, 18446744073709551615, -9223372036854775808, 1.5e-300],
}


async def restart(node: MainNode, tmp_path: Path, clock: FakeClock) -> MainNode:
    await node.stop()
    fresh = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await fresh.start()
    return fresh


async def test_awkward_device_ids_and_names_round_trip(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        for device_id in AWKWARD_IDS:
            peer = await Peer.connect(node, device_id)
            data = register_data()
            data["device_info"]["hostname"] = device_id + " 'host' \"😀\""
            reply = await peer.request("register", data)
            assert reply["message_type"] == "ack", reply
            assert reply["data"]["result"]["device_id"] == device_id
            await peer.close()
        await settle(node)
        node = await restart(node, tmp_path, clock)
        client = await Peer.connect(node)
        devices = {d["device_id"]: d for d in (await client.ok("list_devices"))["devices"]}
        assert set(devices) == set(AWKWARD_IDS)
        for device_id in AWKWARD_IDS:
            assert devices[device_id]["device_info"]["hostname"] == device_id + " 'host' \"😀\""
    finally:
        await node.stop()


async def test_payload_with_nul_quotes_emoji_and_long_strings_round_trips(
    tmp_path: Path, clock: FakeClock
) -> None:
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        client = await Peer.connect(node)
        await client.ok("cluster_status")  # authenticate first: before that frames stop at 16 KiB
        task_id = (
            await client.ok(
                "task_submit",
                {"task": {"task_type": "echo", "payload": PAYLOAD, "idempotency_key": "key 'é' \"😀\""}},
            )
        )["task_id"]
        assert (await client.ok("task_status", {"task_id": task_id}))["task"]["payload"] == PAYLOAD
        await settle(node)
        node = await restart(node, tmp_path, clock)
        client = await Peer.connect(node)
        await client.ok("cluster_status")
        assert (await client.ok("task_status", {"task_id": task_id}))["task"]["payload"] == PAYLOAD
        again = await client.ok(
            "task_submit", {"task": {"task_type": "echo", "payload": {}, "idempotency_key": "key 'é' \"😀\""}}
        )
        assert again["task_id"] == task_id  # the key survived the store exactly
    finally:
        await node.stop()
    # In the file: NUL is stored escaped inside JSON text, never as a raw byte.
    with sqlite3.connect(make_config(tmp_path).db_path) as db:
        texts = [row[0] for row in db.execute("SELECT payload FROM tasks")]
    assert texts and all("\x00" not in t and "\\u0000" in t for t in texts)


@pytest.mark.parametrize(
    "field, value",
    [
        ("sender_id", "dev\u0000ice"),
        ("sender_id", "dev\nice"),
        ("sender_id", "\u001b[2J"),
        ("hostname", "host\u0000"),
        ("hostname", "\u001b]0;pwned\u0007"),
        ("task_type", "echo\u0000"),
        ("idempotency_key", "k\r\n"),
        ("message_id", "m\u0000"),
    ],
)
async def test_control_characters_in_ids_and_names_are_refused(
    node: MainNode, field: str, value: str
) -> None:
    if field in ("sender_id", "hostname"):
        peer = await Peer.connect(node, value if field == "sender_id" else "dev-ok")
        data = register_data()
        if field == "hostname":
            data["device_info"]["hostname"] = value
        reply = await peer.request("register", data)
    elif field == "message_id":
        peer = await Peer.connect(node)
        reply = await _send_with_id(peer, value)
    else:
        peer = await Peer.connect(node)
        reply = await peer.request(
            "task_submit",
            {"task": {"task_type": "echo", field: value}}
            if field == "idempotency_key"
            else {"task": {"task_type": value}},
        )
    assert reply["message_type"] == "error" and reply["data"]["code"] == "invalid_message", reply
    assert re.match(r"\$\.", reply["data"]["path"])
    assert not [d for d in node.registry if "\u0000" in d.device_id or "\n" in d.device_id]
    assert not node.tasks


async def _send_with_id(peer: Peer, message_id: str) -> Dict[str, Any]:
    import json

    await peer.send_raw(
        json.dumps(
            {
                "message_type": "cluster_status",
                "message_id": message_id,
                "sender_id": "c",
                "auth_token": peer.token,
            }
        ).encode()
        + b"\n"
    )
    return await peer.recv()


#: Names an f-string may interpolate into SQL in store.py: column lists, "?, ?, ?"
#: placeholder runs and clauses made of fixed text, and integers. Anything else
#: must be a ? placeholder.
REVIEWED_SQL_NAMES = {"marks", "clause", "where", "number", "self"}


def test_store_builds_sql_from_fixed_text_only() -> None:
    source = (Path(__file__).resolve().parent.parent / "retire_cluster" / "main" / "store.py").read_text()
    tree = ast.parse(source)
    sql_methods = {"execute", "executemany", "execute_fetchall", "executescript"}
    checked = 0
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in sql_methods
            and node.args
        ):
            continue
        checked += 1
        sql = node.args[0]
        assert not (isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Mod)), ast.unparse(sql)
        assert not (isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "format"), ast.unparse(sql)
        for value in ast.walk(sql):
            if isinstance(value, ast.FormattedValue):
                for name in ast.walk(value.value):
                    if isinstance(name, ast.Name):
                        ok = name.id.isupper() or name.id.startswith("_") or name.id in REVIEWED_SQL_NAMES
                        assert ok, f"SQL built from {name.id!r}: use a ? placeholder ({ast.unparse(sql)})"
    assert checked >= 10
