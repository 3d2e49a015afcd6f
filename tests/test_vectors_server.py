"""Every golden vector sent to a real main node gets the reply frames.json says."""

from __future__ import annotations

import asyncio
import json

from conftest import Peer
from vectors import load_vectors

from retire_cluster.main import MainNode


async def test_each_vector_gets_its_documented_reply(node: MainNode) -> None:
    mismatches = []
    for vector in load_vectors():
        peer = await Peer.connect(node, "vectors")
        await peer.ok("cluster_status")  # authenticate this connection first
        await peer.send_raw(vector["frame_bytes"] + b"\n")
        if vector["reply"] is None:
            # Replies to our pushes are never answered: the next request is answered next.
            await peer.send_raw(json.dumps({"message_type": "cluster_status", "message_id": "probe",
                                            "sender_id": "vectors"}).encode() + b"\n")
            got = await peer.recv()
            if got["data"]["original_message_id"] != "probe":
                mismatches.append((vector["name"], "answered", got))
        else:
            got = await peer.recv()
            code = "ack" if got["message_type"] == "ack" else got["data"]["code"]
            if code != vector["reply"]:
                mismatches.append((vector["name"], vector["reply"], code))
        await peer.close()
    assert mismatches == []


async def test_vectors_unauthenticated_get_unauthorized_or_framing_errors(node: MainNode) -> None:
    for vector in load_vectors():
        peer = await Peer.connect(node, "anon", token=None)
        await peer.send_raw(vector["frame_bytes"] + b"\n")
        got = await asyncio.wait_for(peer.recv(), 10)
        expected = "invalid_json" if vector["decode"] == "invalid_json" else "unauthorized"
        expected = vector.get("reply_unauthenticated", expected)
        assert got["message_type"] == "error" and got["data"]["code"] == expected, vector["name"]
        if expected != "unauthorized":  # framing errors before authentication close the connection
            assert await peer.closed_by_peer(), vector["name"]
        await peer.close()
