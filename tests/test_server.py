"""Connections: auth, bad frames, one reply per request, isolation between peers."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import FakeClock, Peer, RecordingTransport, fake_worker, make_config, settle

from retire_cluster.main import MainNode
from retire_cluster.main.server import Connection


async def test_frame_without_token_is_unauthorized_and_not_acted_on(node: MainNode) -> None:
    anon = await Peer.connect(node, "anon", token=None)
    reply = await anon.request("task_submit", {"task": {"task_type": "echo"}})
    assert reply["message_type"] == "error" and reply["data"]["code"] == "unauthorized"
    wrong = await Peer.connect(node, "wrong", token="not-the-token")
    reply = await wrong.request("cluster_status")
    assert reply["data"]["code"] == "unauthorized"
    client = await Peer.connect(node)
    assert (await client.ok("task_list", {}))["tasks"] == []


async def test_connection_authenticates_once_then_token_optional(node: MainNode) -> None:
    peer = await Peer.connect(node)
    await peer.ok("cluster_status")
    peer.token = None
    await peer.ok("cluster_status")


async def test_invalid_json_before_auth_is_answered_then_closed(node: MainNode) -> None:
    anon = await Peer.connect(node, "anon", token=None)
    await anon.send_raw(b"{not json\n")
    reply = await anon.recv()
    assert reply["data"]["code"] == "invalid_json" and reply["data"]["original_message_id"] is None
    assert await anon.closed_by_peer()


async def test_invalid_json_after_auth_keeps_connection(node: MainNode) -> None:
    peer = await Peer.connect(node)
    await peer.ok("cluster_status")
    await peer.send_raw(b'{"message_type": "cluster_status", "message_id": "x",\n')
    reply = await peer.recv()
    assert reply["data"]["code"] == "invalid_json"
    await peer.ok("cluster_status")


async def test_frame_too_large_closes_only_that_connection(tmp_path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, max_frame_bytes=4096), clock=clock, run_monitor=False)
    await node.start()
    try:
        bystander = await Peer.connect(node, "bystander")
        await bystander.ok("cluster_status")
        big = await Peer.connect(node, "big")
        await big.ok("cluster_status")
        await big.send("task_submit", {"task": {"task_type": "echo", "payload": {"m": "x" * 10000}}})
        reply = await big.recv()
        assert reply["data"]["code"] == "frame_too_large"
        assert await big.closed_by_peer()
        await bystander.ok("cluster_status")
    finally:
        await node.stop()


async def test_unterminated_huge_frame_is_refused_before_newline(tmp_path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, max_frame_bytes=4096), clock=clock, run_monitor=False)
    await node.start()
    try:
        peer = await Peer.connect(node, "flood")
        await peer.send_raw(b'{"message_type": "' + b"a" * 8000)  # no newline ever
        reply = await peer.recv()
        assert reply["data"]["code"] == "frame_too_large"
        assert await peer.closed_by_peer()
    finally:
        await node.stop()


async def test_unknown_message_type_and_invalid_message(node: MainNode) -> None:
    peer = await Peer.connect(node)
    reply = await peer.request("make_coffee")
    assert reply["data"]["code"] == "unknown_message_type"
    assert reply["data"]["error"] == "Unknown message_type 'make_coffee'; see protocol/PROTOCOL.md for the list."
    reply = await peer.request("task_sumbit", {})  # a typo is told the type it is close to
    assert reply["data"]["error"] == ("Unknown message_type 'task_sumbit'; did you mean 'task_submit'? "
                                      "see protocol/PROTOCOL.md for the list.")
    reply = await peer.request("task_status", {})
    assert reply["data"]["code"] == "invalid_message" and reply["data"]["path"] == "$.data"
    await peer.send_raw(b'{"message_type": "task_status", "sender_id": "c", "data": {}}\n')
    reply = await peer.recv()
    assert reply["data"]["code"] == "invalid_message" and reply["data"]["path"] == "$.message_id"
    reply = await peer.request("task_status", {"task_id": "nope"})
    assert reply["data"]["code"] == "not_found"


async def test_main_node_pushes_are_not_accepted_as_requests(node: MainNode) -> None:
    peer = await Peer.connect(node)
    reply = await peer.request("task_assign", {"task": {"task_id": "t", "task_type": "echo", "payload": {},
                                                         "timeout": 1, "attempt": 1}})
    assert reply["data"]["code"] == "invalid_message"


async def test_handler_crash_is_internal_without_details(node: MainNode, monkeypatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def boom(conn, msg):
        raise RuntimeError("secret detail")

    monkeypatch.setitem(node.handlers._table, "cluster_status", boom)
    peer = await Peer.connect(node)
    reply = await peer.request("cluster_status")
    assert reply["data"]["code"] == "internal"
    assert "secret detail" not in json.dumps(reply)
    assert any("secret detail" in r.getMessage() or (r.exc_info and "secret detail" in str(r.exc_info[1]))
               for r in caplog.records)
    assert (await peer.ok("list_devices"))["devices"] == []


async def test_every_request_in_a_burst_gets_exactly_one_reply(node: MainNode) -> None:
    peer = await Peer.connect(node)
    frames = b""
    ids = []
    for i in range(200):
        mid = f"m{i}"
        ids.append(mid)
        kind = ["cluster_status", "task_status", "bogus", "task_submit"][i % 4]
        data = {"task_id": "none"} if kind == "task_status" else {}
        if kind == "task_submit":
            data = {"task": {"task_type": "echo"}}
        frames += json.dumps({"message_type": kind, "message_id": mid, "sender_id": "c",
                              "auth_token": node.token, "data": data}).encode() + b"\n"
    frames += b"\n\n"  # empty lines are ignored
    await peer.send_raw(frames)
    got = []
    while len(got) < len(ids):
        msg = await peer.recv()
        got.append(msg["data"]["original_message_id"])
    assert sorted(got) == sorted(ids)
    with pytest.raises(asyncio.TimeoutError):
        await peer.recv(timeout=0.3)


async def test_insecure_node_needs_no_token(tmp_path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, insecure=True), clock=clock, run_monitor=False)
    await node.start()
    try:
        assert node.token is None and not (tmp_path / "main" / "token").exists()
        peer = await Peer.connect(node, token=None)
        await peer.ok("cluster_status")
    finally:
        await node.stop()


async def test_token_is_created_once_with_private_mode(tmp_path, clock: FakeClock) -> None:
    config = make_config(tmp_path)
    first = MainNode(config, clock=clock, run_monitor=False)
    await first.start()
    await first.stop()
    second = MainNode(config, clock=clock, run_monitor=False)
    await second.start()
    await second.stop()
    assert first.token == second.token and len(first.token or "") >= 32
    assert (config.token_path.stat().st_mode & 0o777) == 0o600


def recorded_connection(node: MainNode) -> tuple[Connection, RecordingTransport]:
    """A Connection of ``node`` whose writes a RecordingTransport keeps."""
    conn = Connection(node)
    transport = RecordingTransport()
    conn.connection_made(transport)
    return conn, transport


async def test_a_waited_reply_is_written_at_once_and_the_rest_of_the_pass_together(node: MainNode) -> None:
    conn, transport = recorded_connection(node)
    conn.send_now(b"reply-1\n")
    assert transport.writes == [b"reply-1\n"]  # not at the end of the loop pass
    conn.send_bytes(b"push\n")
    conn.send_now(b"reply-2\n")
    assert transport.writes == [b"reply-1\n"]  # the rest of the pass waits for one more write
    await asyncio.sleep(0)
    assert transport.writes == [b"reply-1\n", b"push\nreply-2\n"]
    conn.send_now(b"reply-3\n")  # a new pass: at once again
    assert transport.writes[-1] == b"reply-3\n"
    await asyncio.sleep(0)
    assert len(transport.writes) == 3


async def test_frames_written_now_take_what_is_queued_along_and_leave_no_flush_behind(node: MainNode) -> None:
    conn, transport = recorded_connection(node)
    conn.send_lazy(b"result-ack\n")
    conn.write_now([b"assign-1\n", b"assign-2\n"])  # how a pass's assignments to a device leave
    assert transport.writes == [b"result-ack\nassign-1\nassign-2\n"]
    assert not conn._flush_scheduled and conn._lazy_timer is None
    await asyncio.sleep(0)
    assert len(transport.writes) == 1


async def test_a_lazy_reply_waits_for_the_next_frame_to_its_peer_and_leaves_first(node: MainNode) -> None:
    from retire_cluster.main import server

    conn, transport = recorded_connection(node)
    conn.send_lazy(b"result-ack\n")
    await asyncio.sleep(0)
    assert transport.writes == []  # not at once, nor at the end of the pass
    timer = conn._lazy_timer
    assert timer is not None
    assert timer.when() - asyncio.get_running_loop().time() <= server.LAZY_REPLY_S
    conn.send_bytes(b"assign\n")
    await asyncio.sleep(0)
    assert transport.writes == [b"result-ack\nassign\n"]  # one write, in the order queued
    assert conn._lazy_timer is None and timer.cancelled()


async def test_a_lazy_reply_alone_is_written_when_its_wait_is_up(node: MainNode) -> None:
    conn, transport = recorded_connection(node)
    conn.send_lazy(b"ack-1\n")
    conn.send_lazy(b"ack-2\n")
    timer = conn._lazy_timer
    assert timer is not None and timer._callback == conn._lazy_due and transport.writes == []
    timer.cancel()
    conn._lazy_due()  # what the timer runs LAZY_REPLY_S later (no sleep in a test)
    assert transport.writes == [b"ack-1\nack-2\n"] and conn._lazy_timer is None


async def test_a_lazy_reply_joins_a_flush_already_due_and_arms_no_timer(node: MainNode) -> None:
    conn, transport = recorded_connection(node)
    conn.send_bytes(b"push\n")
    conn.send_lazy(b"ack\n")
    assert conn._lazy_timer is None
    await asyncio.sleep(0)
    assert transport.writes == [b"push\nack\n"]
    conn.send_lazy(b"ack-2\n")
    conn.close()  # close writes what is queued, lazy replies included, and leaves no timer
    assert transport.writes[-1] == b"ack-2\n" and conn._lazy_timer is None


async def test_the_ack_of_a_task_result_is_lazy_and_other_acks_are_not(node: MainNode) -> None:
    from retire_cluster.protocol.messages import Message

    conn, transport = recorded_connection(node)
    loop = asyncio.get_running_loop()

    def answer(mtype: str) -> None:
        fut = loop.create_future()
        fut.set_result({"task_id": "t"})
        node._finish_future(conn, Message(mtype, f"m-{mtype}", "dev", {}), fut)

    answer("task_result")
    assert transport.writes == [] and conn._lazy_timer is not None
    answer("task_submit")  # a reply someone waits on: written at once, the lazy one ahead of it
    assert len(transport.writes) == 1 and conn._lazy_timer is None
    first, second = transport.writes[0].splitlines()
    assert b'"m-task_result"' in first and b'"m-task_submit"' in second


async def test_the_replies_to_one_read_are_written_together_when_it_is_handled(node: MainNode) -> None:
    """No call_soon per connection: the replies leave in one write before data_received returns."""
    from conftest import register_data

    conn, transport = recorded_connection(node)

    def frame(mtype: str, mid: str, data: dict) -> bytes:
        return json.dumps({"message_type": mtype, "message_id": mid, "sender_id": "dev-9",
                           "auth_token": node.token, "data": data}).encode() + b"\n"

    conn.data_received(frame("register", "r", register_data()))
    for _ in range(5):  # the register reply waits for its commit
        await asyncio.sleep(0)
        await node.store.flush()
    assert any(b'"r"' in w for w in transport.writes)
    transport.writes.clear()
    conn.data_received(frame("heartbeat", "h1", {}) + frame("heartbeat", "h2", {}))
    assert len(transport.writes) == 1  # before the loop runs again, both replies in one write
    replies = [json.loads(line) for line in transport.writes[0].splitlines()]
    assert [r["data"]["original_message_id"] for r in replies] == ["h1", "h2"]
    conn.send_bytes(b"push\n")  # outside a read: at the end of the pass, as before
    assert len(transport.writes) == 1
    await asyncio.sleep(0)
    assert transport.writes[-1] == b"push\n"


async def test_a_stopping_node_reads_nothing_more_even_when_writing_resumes(node: MainNode) -> None:
    """stop_reading holds against resume_writing, which used to turn reading back on during the stop."""

    class Pausable(RecordingTransport):
        reading = True

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

    conn = Connection(node)
    transport = Pausable()
    conn.connection_made(transport)
    node.server.connections.add(conn)
    node.server.stop_reading()
    assert not transport.reading
    conn.pause_writing()
    conn.resume_writing()
    assert not transport.reading


async def test_a_submission_is_assigned_and_a_commit_started_before_its_read_returns(node: MainNode) -> None:
    """The work a read brings is placed, and its commit handed over, when the read ends (MainNode.after_read).

    Not at the end of the loop pass: the assignment leaves, and the commit
    starts, before the loop runs anything else it queued meanwhile.
    """
    worker = await fake_worker(node, "dev-1")
    await settle(node)
    device = node.registry.get("dev-1")
    assert device is not None and device.conn is not None and not device.conn.pending_assigns
    conn, _transport = recorded_connection(node)

    def submit(mid: str, **data: object) -> bytes:
        return json.dumps({"message_type": "task_submit", "message_id": mid, "sender_id": "c", "auth_token": node.token,
                           "data": {"task": {"task_type": "echo", "payload": {"m": mid}}, **data}}).encode() + b"\n"

    conn.data_received(submit("s1", wait=30))  # no await in between: nothing else of the loop ran
    assert len(device.conn.pending_assigns) == 1  # the task_assign is written already
    assert not node.store._in_flight  # a waited submission's insert waits for its result's commit
    conn.data_received(submit("s2"))
    assert node.store._in_flight  # without wait: committed at once
    assert (await worker.next_push("task_assign"))["data"]["task"]["payload"] == {"m": "s1"}
    await settle(node)
    await worker.close()


async def test_a_failure_in_the_pass_after_a_read_is_logged_and_the_connection_carries_on(
        node: MainNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    conn, transport = recorded_connection(node)

    def broken() -> None:
        raise RuntimeError("a bug in the scheduling pass")

    monkeypatch.setattr(node, "_schedule", broken)
    frame = json.dumps({"message_type": "task_submit", "message_id": "s1", "sender_id": "c", "auth_token": node.token,
                        "data": {"task": {"task_type": "echo"}}}).encode() + b"\n"
    conn.data_received(frame)  # an exception out of data_received would make the transport close the connection
    assert "a bug in the scheduling pass" in caplog.text and not conn.closed
    monkeypatch.undo()
    node.schedule_soon()
    await settle(node)
    reply = json.loads(b"".join(transport.writes).splitlines()[-1])
    assert reply["message_type"] == "ack" and reply["data"]["original_message_id"] == "s1"
