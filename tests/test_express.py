"""The express lane (Dispatcher.express): whole frames skip the framing layers, with the same replies.

Each test sends the same bytes twice: once as they come (express lane on) and
once with the lane shut (``MessageStream.at_frame_end`` says no, so every byte
is fed to the framing buffer as before the lane existed), and compares what
the main node answered, in order.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest
from conftest import Peer, RecordingTransport, fake_worker, make_config, register_data, settle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retire_cluster.main import MainNode
from retire_cluster.main.server import Connection
from retire_cluster.protocol.codec import MessageStream

BEAT_DATA = {"system_metrics": {"cpu_usage": 12.5, "memory_usage": 40.0, "load_average": [0.1, 0.2]},
             "status": "online", "active_tasks": 0}


def frame(message_type: str, sender: str, data: Any = None, mid: str = "m", **extra: Any) -> bytes:
    obj: Dict[str, Any] = {"message_type": message_type, "message_id": mid, "sender_id": sender}
    if data is not None:
        obj["data"] = data
    obj.update(extra)
    return json.dumps(obj).encode()


def worker_frames(dev: str) -> List[bytes]:
    """What a device may send, good and bad, each answered (or not) on its own."""
    beat = frame("heartbeat", dev, BEAT_DATA, "b1")
    return [
        beat,
        frame("heartbeat", "someone-else", BEAT_DATA, "b2"),  # forbidden: not this connection's device
        beat.replace(b'"status"', b'"status": "x", "status"'),  # duplicate key: invalid_json
        frame("heartbeat", dev, {"system_metrics": {"n": 18446744073709551616}}, "b3"),  # beyond 64 bits
        frame("heartbeat", dev, {"active_tasks": -1}, "b4"),  # schema: invalid_message with its path
        frame("heartbeat", dev, BEAT_DATA, "b5", colour="red"),  # unknown envelope field
        frame("heartbeat", dev, None, "b6"),  # no data at all: fine
        b"",  # a blank line is skipped
        b"[1, 2]",  # not an object: answered without an id
        b'{"message_type": "heartbeat", "message_id": "b7", "sender_id": "%s"}\r' % dev.encode(),  # CRLF
        frame("task_result", dev, {"task_id": "nope", "attempt": 1, "status": "completed"}, "r1"),
        frame("task_progress", dev, {"task_id": "nope", "attempt": 1, "progress": 0.5}, "p1"),
        frame("ack", dev, {"original_message_id": "never-sent", "result": {}}, "a1"),  # a reply: no answer
        frame("error", dev, {"original_message_id": "never-sent", "code": "busy", "message": "x"}, "e1"),
        frame("task_submit", dev, {"task": {"task_type": "echo", "payload": {"x": 1}}}, "s1"),
        frame("task_assign", dev, {"task": {}}, "t1"),  # the main node's own message: refused
        frame("task_cancel", dev, {"task_id": "nope"}, "c1"),  # not in the lane: the general path answers
        b'{"message_type": "heartbeat", "message_id": "cut", "sender_id": ',  # cut short: invalid_json
        beat.replace(b'"b1"', b'"b9"'),  # still answered after all that
        # As our worker writes them (compact): these are offered to the heartbeat gate (main/typed.py).
        compact("heartbeat", dev, BEAT_DATA, "k1"),
        compact("heartbeat", "someone-else", BEAT_DATA, "k2"),  # forbidden
        compact("heartbeat", dev, BEAT_DATA, "k3").replace(b'"status"', b'"status":"x","status"'),  # invalid_json
        compact("heartbeat", dev, {"system_metrics": {"n": 2**63}}, "k4"),  # uint64: the general path takes it
        compact("heartbeat", dev, {"status": "caf\u00e9 ok"}, "k5").replace(b"\\\\", b"\\"),  # an escape
        compact("heartbeat", dev, {"status": "ok", "more": {"a": [1]}}, "k6"),  # a field the schema allows
        compact("heartbeat", dev, BEAT_DATA, "k7", colour="red"),  # unknown envelope field: invalid_message
        compact("heartbeat", dev, {"active_tasks": -1}, "k8"),  # schema: invalid_message with its path
        # A worker's task_result and ack as it writes them: offered to the task-frame gate (main/typed.py).
        compact("task_result", dev, {"task_id": "nope", "attempt": 1, "status": "completed", "execution_time": 0.5,
                                     "result": {"output": "x", "exit_code": 0, "truncated": False, "metrics": {}}},
                "r2"),  # not_found, as the loose one above
        compact("task_result", dev, {"task_id": "nope", "attempt": 0, "status": "completed"}, "r3"),  # invalid_message
        compact("task_result", dev, {"task_id": "nope", "attempt": 1, "status": "completed"}, "r4").replace(
            b'"attempt"', b'"attempt":1,"attempt"'),  # a key given twice: invalid_json
        compact("ack", dev, {"original_message_id": "never-sent", "result": {"task_id": "t"}}, "a2"),  # no answer
        compact("task_result", "someone-else", {"task_id": "nope", "attempt": 1, "status": "failed"}, "r5"),  # forbidden
        compact("task_result", dev, {"task_id": "nope", "attempt": 1, "status": "timeout",
                                     "result": {"metrics": {"nested": {"a": 1}}}}, "r6"),  # allowed; not the gate's
    ]


def compact(message_type: str, sender: str, data: Any = None, mid: str = "m", **extra: Any) -> bytes:
    return json.dumps(json.loads(frame(message_type, sender, data, mid, **extra)), separators=(",", ":")).encode()


#: The ids of worker_frames() that get an answer.
#: Errors that name no message are keyed "none-1", "none-2", ... in the order they came.
#: (Strict JSON errors too: the frame's message_id is not trusted from a frame that is not strict JSON.)
ANSWERED = ["b1", "b2", "none-1", "none-2", "b4", "b5", "b6", "none-3", "b7", "r1", "p1", "s1", "t1", "c1", "none-4",
            "b9", "k1", "k2", "none-5", "k4", "k5", "k6", "k7", "k8", "r2", "r3", "none-6", "r5", "r6"]


def normalise(reply: Dict[str, Any], peer: Peer) -> Dict[str, Any]:
    """What must match: everything but the reply's own id and time, new tasks' ids and the peer's name."""
    out = {k: v for k, v in reply.items() if k not in ("message_id", "timestamp")}
    return json.loads(json.dumps(out).replace(json.dumps(peer.sender_id)[1:-1], "<peer>"),
                      object_hook=lambda o: {**o, "task_id": "<new>"} if "task_id" in o else o)


async def exchange(peer: Peer, frames: List[bytes], answered: List[str]) -> tuple:
    """Send ``frames`` in one write; the replies to the ``answered`` ids (by id, in arrival order), and pushes."""
    await peer.send_raw(b"".join(f + b"\n" for f in frames))
    replies: Dict[str, Dict[str, Any]] = {}
    pushes = []
    while len(replies) < len(answered):
        reply = await peer.recv()
        mid = reply["data"].get("original_message_id")
        if reply["message_type"] == "error" and mid is None:
            mid = f"none-{sum(1 for key in replies if key.startswith('none-')) + 1}"
        if reply["message_type"] in ("ack", "error") and mid in answered:
            replies[mid] = normalise(reply, peer)
        else:
            pushes.append(normalise(reply, peer))
    return replies, pushes


async def both_ways(monkeypatch: pytest.MonkeyPatch, frames: List[bytes], answered: List[str], connect) -> tuple:
    """The replies with the express lane, then with every byte fed to the framing buffer."""
    express = await exchange(await connect("dev-express"), frames, answered)
    with monkeypatch.context() as patch:
        patch.setattr(MessageStream, "at_frame_end", lambda self, data: False)
        general = await exchange(await connect("dev-general"), frames, answered)
    return express, general


def codes(replies: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    return {mid: r["data"].get("code", r["message_type"]) for mid, r in replies.items()}


async def test_a_device_gets_the_same_replies_in_the_same_order(node: MainNode, monkeypatch) -> None:
    async def connect(dev: str) -> Peer:
        return await fake_worker(node, dev)

    async def run(dev: str) -> tuple:
        return await exchange(await connect(dev), worker_frames(dev), ANSWERED)

    express = await run("dev-express")
    with monkeypatch.context() as patch:
        patch.setattr(MessageStream, "at_frame_end", lambda self, data: False)
        general = await run("dev-general")
    assert express == general
    replies, pushes = express
    assert codes(replies) == {
        "b1": "ack", "b2": "forbidden", "none-1": "invalid_json", "none-2": "invalid_json", "b4": "invalid_message",
        "b5": "invalid_message", "b6": "ack", "none-3": "invalid_message", "b7": "ack", "r1": "not_found",
        "p1": "forbidden", "s1": "ack", "t1": "invalid_message", "c1": "not_found", "none-4": "invalid_json", "b9": "ack",
        "k1": "ack", "k2": "forbidden", "none-5": "invalid_json", "k4": "ack", "k5": "ack", "k6": "ack",
        "k7": "invalid_message", "k8": "invalid_message", "r2": "not_found", "r3": "invalid_message",
        "none-6": "invalid_json", "r5": "forbidden", "r6": "not_found",
    }  # fmt: skip
    # The answers that need no commit or read leave in the order the frames came.
    assert [mid for mid in replies if mid[0] in "bnptk"] == ["b1", "b2", "none-1", "none-2", "b4", "b5", "b6",
                                                             "none-3", "b7", "p1", "t1", "none-4", "b9", "k1", "k2",
                                                             "none-5", "k4", "k5", "k6", "k7", "k8",
                                                             "none-6"]  # fmt: skip
    assert [p["message_type"] for p in pushes] == ["task_assign"]  # s1 went to the device that sent it


async def test_a_client_gets_the_same_replies_including_the_rate_limit(tmp_path, monkeypatch) -> None:
    node = MainNode(make_config(tmp_path, client_burst=6, client_rate_per_s=0.001), run_monitor=False)
    await node.start()
    try:
        async def connect(name: str) -> Peer:
            peer = await Peer.connect(node, name)
            await peer.ok("cluster_status")  # authenticated (one token): later frames may take the lane
            return peer

        # As our clients write a submission (compact): offered to the task-frame gate (main/typed.py).
        submit = compact("task_submit", "c", {"task": {"task_type": "echo", "payload": {}}}, "s1")
        frames = [
            submit,
            frame("heartbeat", "c", BEAT_DATA, "h1"),  # not registered
            compact("task_submit", "c", {"task": {"task_type": "echo", "priority": "hgih"}}, "s2"),
            frame("ack", "c", {"original_message_id": "x", "result": {}}, "a1"),  # spends a token too
            submit.replace(b'"s1"', b'"s3"'),  # the last token
            submit.replace(b'"s1"', b'"s4"'),  # overloaded
            frame("heartbeat", "c", BEAT_DATA, "h2"),  # overloaded
        ]
        express, general = await both_ways(monkeypatch, frames, ["s1", "h1", "s2", "s3", "s4", "h2"], connect)
    finally:
        await node.stop()
    assert express == general
    assert codes(express[0]) == {"s1": "ack", "h1": "not_registered", "s2": "invalid_message", "s3": "ack",
                                 "s4": "overloaded", "h2": "overloaded"}  # fmt: skip


async def test_whole_frames_from_a_device_are_not_fed_to_the_framing_buffer(node: MainNode, monkeypatch) -> None:
    """What the lane is for: a heartbeat, a result and its ack skip MessageStream.feed."""
    fed: List[bytes] = []
    feed = MessageStream.feed

    def counting_feed(self: MessageStream, data: bytes) -> list:
        fed.append(bytes(data))
        return feed(self, data)

    monkeypatch.setattr(MessageStream, "feed", counting_feed)
    client = await Peer.connect(node, "client")
    await client.ok("cluster_status")  # its first frame authenticates it: that one is fed
    worker = await fake_worker(node, "dev-1")
    await settle(node)
    fed.clear()
    submitted = await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"n": 1}}, "wait": 30})
    assign = await worker.next_push("task_assign")
    task = assign["data"]["task"]
    ack = frame("ack", "dev-1", {"original_message_id": assign["message_id"], "result": {}}, "w1")
    result = frame("task_result", "dev-1", {"task_id": task["task_id"], "attempt": task["attempt"],
                                            "status": "completed", "result": {"n": 1}}, "w2")  # fmt: skip
    await worker.send_raw(ack + b"\n" + result + b"\n")
    assert (await worker.reply_to("w2"))["message_type"] == "ack"
    end = await client.reply_to(submitted)
    assert end["data"]["result"]["task"]["status"] == "completed"
    beat = await worker.send("heartbeat", BEAT_DATA)
    assert (await worker.reply_to(beat))["data"]["result"] == {"active_tasks": 0}
    assert fed == []  # nor the submission: it came on an authenticated connection


async def test_a_compact_heartbeat_is_decoded_once_by_the_gate(node: MainNode, monkeypatch) -> None:
    """Our worker's heartbeat never reaches codec.loads: msgspec decodes and checks it in one call."""
    from retire_cluster.main import dispatch

    if node.beat_gate is None:
        pytest.skip("msgspec is not installed")

    def no_loads(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the general decoding ran")

    worker = await fake_worker(node, "dev-1")
    monkeypatch.setattr(dispatch, "loads", no_loads)
    await worker.send_raw(compact("heartbeat", "dev-1", {**BEAT_DATA, "accepting": False, "reason": "on battery"},
                                  "h1") + b"\n")
    reply = await worker.recv()
    assert (reply["message_type"], reply["data"]["original_message_id"]) == ("ack", "h1")
    device = node.registry.get("dev-1")
    assert device is not None
    assert device.metrics == BEAT_DATA["system_metrics"] and not device.accepting and device.reason == "on battery"


async def test_a_compact_task_result_and_ack_are_decoded_once_by_the_gate(node: MainNode, monkeypatch) -> None:
    """Our worker's accept and result never reach codec.loads nor the schema check: msgspec decodes and checks them."""
    from retire_cluster.main import dispatch

    if node.task_frame_gate is None:
        pytest.skip("msgspec is not installed")
    worker = await fake_worker(node, "dev-1")
    client = await Peer.connect(node, "client-1")
    submitted = await client.send("task_submit", {"task": {"task_type": "echo", "payload": {"message": "hi"}}})
    assign = await worker.recv()
    assert assign["message_type"] == "task_assign"
    task = assign["data"]["task"]

    decoded: List[Any] = []  # what the lane decoded or checked the general way, and what it fed to the buffer
    loads, valid, feed = dispatch.loads, node.validator.valid, MessageStream.feed
    monkeypatch.setattr(dispatch, "loads", lambda data, *rest: decoded.append(data) or loads(data, *rest))
    monkeypatch.setattr(node.validator, "valid", lambda obj: decoded.append(obj) or valid(obj))
    monkeypatch.setattr(MessageStream, "feed", lambda stream, data: decoded.append(data) or feed(stream, data))
    accepted = compact("ack", "dev-1", {"original_message_id": assign["message_id"],
                                        "result": {"task_id": task["task_id"]}}, "a1")
    result = compact("task_result", "dev-1", {"task_id": task["task_id"], "attempt": task["attempt"],
                                              "status": "completed", "execution_time": 0.01,
                                              "result": {"output": "hi", "exit_code": 0, "truncated": False,
                                                         "metrics": {"cpu_s": 0.01}}}, "r1")
    await worker.send_raw(accepted + b"\n" + result + b"\n")
    reply = await worker.recv()
    assert (reply["message_type"], reply["data"]["original_message_id"]) == ("ack", "r1")
    assert reply["data"]["result"] == {"task_id": task["task_id"], "status": "completed"}
    assert decoded == []
    monkeypatch.undo()
    await client.reply_to(submitted)
    record = node.lookup(task["task_id"])
    assert record is not None and record.status.value == "completed" and record.started_at is not None
    assert record.result == {"output": "hi", "exit_code": 0, "truncated": False, "metrics": {"cpu_s": 0.01}}


async def test_a_compact_submission_is_decoded_once_by_the_gate(node: MainNode, monkeypatch) -> None:
    """A client's task_submit as our clients write it never reaches codec.loads nor the schema check."""
    from retire_cluster.main import dispatch

    if node.task_frame_gate is None:
        pytest.skip("msgspec is not installed")
    client = await Peer.connect(node, "client-1")
    await client.ok("cluster_status")  # its first frame authenticates it: that one takes the general path
    decoded: List[Any] = []
    loads, valid, feed = dispatch.loads, node.validator.valid, MessageStream.feed
    monkeypatch.setattr(dispatch, "loads", lambda data, *rest: decoded.append(data) or loads(data, *rest))
    monkeypatch.setattr(node.validator, "valid", lambda obj: decoded.append(obj) or valid(obj))
    monkeypatch.setattr(MessageStream, "feed", lambda stream, data: decoded.append(data) or feed(stream, data))
    await client.send_raw(compact("task_submit", "client-1", {"task": {
        "task_type": "echo", "payload": {"message": "hi"}, "priority": "high", "timeout": 30, "max_retries": 1,
        "idempotency_key": "k-1"}}, "s1") + b"\n")
    reply = await client.recv()
    assert (reply["message_type"], reply["data"]["original_message_id"]) == ("ack", "s1")
    assert decoded == []
    task = node.lookup(reply["data"]["result"]["task_id"])
    assert task is not None and task.payload == {"message": "hi"} and task.priority == 10 and task.max_retries == 1
    assert task.idempotency_key == "k-1" and task.timeout_s == 30


async def test_without_msgspec_heartbeats_take_the_rest_of_the_lane(node: MainNode, monkeypatch) -> None:
    monkeypatch.setattr(node, "beat_gate", None)
    worker = await fake_worker(node, "dev-1")
    await worker.send_raw(compact("heartbeat", "dev-1", BEAT_DATA, "h1") + b"\n")
    reply = await worker.recv()
    assert (reply["message_type"], reply["data"]["original_message_id"]) == ("ack", "h1")


async def test_a_write_cut_mid_frame_goes_through_the_buffer(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    whole = frame("heartbeat", "dev-1", BEAT_DATA, "h1") + b"\n" + frame("heartbeat", "dev-1", BEAT_DATA, "h2")
    await worker.send_raw(whole[:-10])  # the second frame is unfinished: all of it is fed
    await settle(node)
    await worker.send_raw(whole[-10:] + b"\n")  # ends the held frame: fed too, then the lane again
    first, second = await worker.recv(), await worker.recv()
    assert [first["data"]["original_message_id"], second["data"]["original_message_id"]] == ["h1", "h2"]
    assert (await worker.request("heartbeat", BEAT_DATA))["message_type"] == "ack"


# -- any bytes: the same replies both ways (in process, generated) ----------------------------


class GeneralOnly(MessageStream):
    """A stream that never says its bytes are whole frames: every byte goes the general path."""

    __slots__ = ()

    def at_frame_end(self, data: bytes) -> bool:
        return False


_metric = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70), st.none(),
                    st.booleans(), st.text(max_size=300), st.lists(st.one_of(st.floats(0, 1), st.none(), st.text(max_size=3)),
                                                                   max_size=18))  # fmt: skip
_frames = st.one_of(
    # heartbeats, valid or not by their content
    st.builds(lambda metrics, tasks, mid: frame("heartbeat", "<dev>", {"system_metrics": metrics, "active_tasks": tasks},
                                                mid),
              st.dictionaries(st.text(max_size=70), _metric, max_size=34), st.integers(-2, 3),
              st.text(min_size=0, max_size=5)),  # fmt: skip
    # the same as our worker writes them (compact): offered to the heartbeat gate first
    st.builds(lambda metrics, tasks, mid: compact("heartbeat", "<dev>",
                                                  {"system_metrics": metrics, "active_tasks": tasks}, mid),
              st.dictionaries(st.text(max_size=70), _metric, max_size=34), st.integers(-2, 3),
              st.text(min_size=0, max_size=5)),  # fmt: skip
    st.sampled_from([f.replace(b"dev-x", b"<dev>") for f in worker_frames("dev-x")
                     if b"task_submit" not in f and b"task_result" not in f and b"task_cancel" not in f]),
    st.binary(max_size=40),  # junk
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.lists(_frames, min_size=1, max_size=4), min_size=1, max_size=3),
       cut=st.integers(0, 3))  # fmt: skip
async def test_any_bytes_from_a_device_get_the_same_replies_both_ways(node: MainNode, writes, cut) -> None:
    """Generated writes (heartbeats good and bad, the frames above, junk), some cut mid-frame."""
    outputs = []
    for dev, stream_class in (("gen-express", MessageStream), ("gen-general", GeneralOnly)):
        conn = Connection(node)
        transport = RecordingTransport()
        conn.connection_made(transport)
        conn.data_received(frame("register", dev, register_data(), "reg", auth_token=node.token) + b"\n")
        await settle(node)
        conn.stream.__class__ = stream_class
        conn.stream.max_frame_bytes = 400  # some generated heartbeats are larger: frame_too_large, then closed
        transport.writes.clear()
        for frames in writes:
            data = b"\n".join(f.replace(b"<dev>", dev.encode()) for f in frames) + b"\n"
            if cut and len(data) > cut:  # a write that ends mid-frame, then its end
                conn.data_received(data[:-cut])
                conn.data_received(data[-cut:])
            else:
                conn.data_received(data)
            if conn.closed:
                break
        await settle(node)
        replies = [{k: v for k, v in json.loads(line).items() if k not in ("message_id", "timestamp")}
                   for line in b"".join(transport.writes).splitlines()]
        outputs.append((json.dumps(replies).replace(dev, "<dev>"), conn.closed))
        conn.connection_lost(None)
    assert outputs[0] == outputs[1]
