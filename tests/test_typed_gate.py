"""The gates of main/typed.py (heartbeats; a worker's ack and task_result): whatever they vouch for, the general path takes with the same values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retire_cluster.main.typed import (
    HEARTBEAT_PREFIX,
    TASK_FRAME_PREFIXES,
    HeartbeatGate,
    TaskFrameGate,
    heartbeat_gate,
    task_frame_gate,
)
from retire_cluster.protocol.codec import encode, loads
from retire_cluster.protocol.messages import Message
from retire_cluster.protocol.validation import MessageValidator

GATE = heartbeat_gate()
VALIDATOR = MessageValidator()

pytestmark = pytest.mark.skipif(GATE is None, reason="msgspec is not installed")

# Text that tests the bounds and the checks: colons (the duplicate-key count), control
# characters and DEL (ids), non-ASCII, quotes and backslashes (escapes).
_CHARS = st.sampled_from(list('ab:Z09 -_.é€😀"\\\x00\x01\x1f\x7f\n/'))
_TEXT = st.one_of(st.text(_CHARS, max_size=6), st.text(_CHARS, min_size=60, max_size=70),
                  st.text(st.sampled_from("ab:"), min_size=120, max_size=130),
                  st.text(st.sampled_from("ab:"), min_size=250, max_size=260))
_INTS = st.one_of(st.integers(-5, 5),
                  st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]))
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SCALAR = st.one_of(_INTS, _FLOATS, st.booleans(), st.none(), _TEXT)
_VALUE = st.one_of(_SCALAR, st.lists(st.one_of(_INTS, _FLOATS, st.none(), _TEXT), max_size=18),
                   st.dictionaries(_TEXT, _SCALAR, max_size=2), st.lists(st.lists(_INTS, max_size=2), max_size=2))
_METRICS = st.one_of(st.dictionaries(_TEXT, _VALUE, max_size=6),
                     st.dictionaries(st.text("abcdefghij", min_size=1, max_size=4), st.integers(0, 9),
                                     min_size=30, max_size=34))
# Mostly what a heartbeat holds, now and then something it must not: each field is valid
# seven times out of eight, so that whole frames are often valid and the mutations below
# (keys given twice, big numbers, cuts) hit frames the gate would otherwise vouch for.
_GOOD_TEXT = st.text(st.sampled_from(list("ab:Z09 -_.é€😀/")), max_size=8)
_GOOD_METRIC = st.one_of(st.integers(-(2**63), 2**63 - 1), _FLOATS, st.booleans(), st.none(), _GOOD_TEXT,
                         st.lists(st.one_of(st.integers(-3, 3), _FLOATS, st.none()), max_size=17))
_GOOD_METRICS = st.dictionaries(st.one_of(_GOOD_TEXT, st.text("ab:", min_size=60, max_size=66)),
                                st.one_of(_GOOD_METRIC, _GOOD_METRIC, _GOOD_METRIC, _VALUE), max_size=6)


def _mostly(good: Any, bad: Any) -> Any:
    return st.integers(0, 7).flatmap(lambda n: bad if n == 7 else good)


_DATA = st.fixed_dictionaries({}, optional={
    "system_metrics": _mostly(st.one_of(_GOOD_METRICS, _GOOD_METRICS, _METRICS), _VALUE),
    "status": _mostly(_GOOD_TEXT, st.one_of(_TEXT, _VALUE)),
    "active_tasks": _mostly(st.integers(0, 3), st.one_of(_INTS, _VALUE)),
    "last_activity": _mostly(st.one_of(_GOOD_TEXT, st.none()), st.one_of(_TEXT, _VALUE)),
    "accepting": _mostly(st.booleans(), _VALUE),
    "reason": _mostly(st.one_of(_GOOD_TEXT, st.none()), st.one_of(_TEXT, _VALUE)),
})
_FRAME = st.fixed_dictionaries(
    {"message_type": _mostly(st.just("heartbeat"), st.sampled_from(["heartbeats", "task_result", ""])),
     "message_id": _mostly(st.one_of(st.just("h-1"), _GOOD_TEXT.filter(bool)), st.one_of(_TEXT, _INTS)),
     "sender_id": _mostly(st.just("dev"), _TEXT),
     "data": _mostly(_DATA, _VALUE)},
    optional={"timestamp": _mostly(_GOOD_TEXT, st.one_of(_TEXT, _INTS)), "auth_token": _mostly(_GOOD_TEXT, _TEXT),
              "target_id": _mostly(_GOOD_TEXT.filter(bool), _TEXT)},
)


def _encode(obj: dict[str, Any], how: int) -> bytes:
    """The frame as different encoders write it (ours, stdlib json escaping non-ASCII, with spaces)."""
    if how == 0:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == 1:
        return json.dumps(obj, separators=(",", ":")).encode()
    return json.dumps(obj, indent=1).encode()


def _mutate(frame: bytes, how: int, cut: int) -> bytes:
    """Byte-level changes the JSON encoder would never make: keys given twice, big numbers, junk."""
    if how == 1:  # the first key of data given twice
        i = frame.find(b'"data":{"')
        if i >= 0:
            j = frame.find(b",", i)
            k = frame.find(b"}", i)
            end = min(x for x in (j, k) if x > 0) if max(j, k) > 0 else -1
            if end > 0:
                pair = frame[i + 8:end]
                return frame[: i + 8] + pair + b"," + frame[i + 8:]
    if how == 2:  # the sender given twice
        return frame.replace(b'"sender_id":', b'"sender_id":"dev","sender_id":', 1)
    if how == 3:  # an integer too big for 64 bits instead of a small one
        return frame.replace(b":0", b":99999999999999999999999", 1)
    if how == 4:
        return frame[:cut] + frame[cut + 1:]
    if how == 5:
        return frame[:cut] + b"\xff" + frame[cut:]
    if how == 6:
        return frame + b" 1"
    if how == 7:  # a field the schema allows in data, and one it does not allow in the envelope
        return frame.replace(b'"data":{', b'"data":{"more":1,', 1) if cut % 2 else frame.replace(b"{", b'{"more":1,', 1)
    return frame


def _general(frame: bytes, types: tuple[str, ...] = ("heartbeat",)) -> dict[str, Any] | None:
    """What the general path makes of the frame: its object when of one of ``types``, or None when it refuses it."""
    try:
        obj = loads(frame)
    except Exception:
        return None
    if type(obj) is not dict or obj.get("message_type") not in types or not VALIDATOR.valid(obj):
        return None
    return obj


def _both(gate: Any, frame: bytes, types: tuple[str, ...]) -> tuple[Any, dict[str, Any]] | None:
    """What ``gate`` vouched for and the general path's object; None when the gate says nothing.

    The general path must take every frame the gate vouches for.
    """
    vouched = gate.vouch(frame)
    if vouched is None:
        return None
    obj = _general(frame, types)
    assert obj is not None, f"vouched for a frame the general path refuses: {frame!r}"
    return vouched, obj


def _same(a: Any, b: Any) -> bool:
    """Equal with types: True is not 1, 1 is not 1.0."""
    return orjson.dumps(a) == orjson.dumps(b) and type(a) is type(b)


def _check(frame: bytes) -> bool:
    assert GATE is not None
    both = _both(GATE, frame, ("heartbeat",))
    if both is None:
        return False
    (message_id, sender_id, data), obj = both
    assert (message_id, sender_id) == (obj["message_id"], obj["sender_id"])
    for key in ("system_metrics", "accepting", "reason"):
        assert (key in data) == (key in obj["data"]), key
        if key in data:
            assert _same(data[key], obj["data"][key]), (key, data[key], obj["data"][key])
    return True


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_FRAME, st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 9), st.integers(0, 400))
def test_what_the_gate_vouches_for_the_general_path_takes_with_the_same_values(
        frame_obj: dict[str, Any], encoder: int, mutation: int, cut: int) -> None:
    frame = _mutate(_encode(frame_obj, encoder), mutation, cut % 400)
    _check(frame)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text("abc:", min_size=1, max_size=4),
                       st.one_of(st.integers(-(2**63), 2**63 - 1), _FLOATS, st.booleans(), st.none(),
                                 st.text("x: ", max_size=5), st.lists(st.one_of(_FLOATS, st.none()), max_size=16)),
                       max_size=32),
       st.booleans(), st.one_of(st.none(), st.text("r: ", max_size=20)))
def test_the_gate_vouches_for_valid_heartbeats(metrics: dict[str, Any], accepting: bool, reason: str | None) -> None:
    """Not a gate that says nothing: every valid heartbeat of this shape gets through it."""
    frame = encode(Message("heartbeat", "h-1", "dev", {"system_metrics": metrics, "status": "online",
                                                        "active_tasks": 0, "accepting": accepting, "reason": reason},
                           timestamp="2026-12-03T10:00:00.000Z", auth_token="t" * 43))
    assert frame.startswith(HEARTBEAT_PREFIX)
    assert _check(frame.rstrip(b"\n"))


def test_the_gate_vouches_for_what_our_worker_sends(tmp_path: Path) -> None:
    from retire_cluster.worker.agent import Agent
    from retire_cluster.worker.config import WorkerConfig

    agent = Agent(WorkerConfig(device_id="dev", data_dir=tmp_path, token="t" * 43))
    frame = encode(agent._message("heartbeat", agent._heartbeat_data())).rstrip(b"\n")
    assert frame.startswith(HEARTBEAT_PREFIX)
    assert _check(frame)


@pytest.mark.parametrize("frame", [
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"a":1,"a":2}}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"a":"x:y","a":2}}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","sender_id":"s","data":{}}',
    b'{"message_type":"heartbeat","message_id":"a\x7f","sender_id":"s","data":{}}',
    b'{"message_type":"heartbeat","message_id":"a\\u0001","sender_id":"s","data":{}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"status":"\\u003a","status":"b"}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"active_tasks":9223372036854775808}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"a":-9223372036854775809}}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"a":[1,[2]]}}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"more":1}}',
    b'{"message_type":"heartbeat","message_id":"","sender_id":"s","data":{}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s"}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{}} x',
    b'\xef\xbb\xbf{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"status":"\xff"}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"a":NaN}}}',
    # not UTF-8: a surrogate, overlong forms, past U+10FFFF, a cut sequence (in a value and in a name)
    *(b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"status":"%s"}}' % bad
      for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98")),
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{"system_metrics":{"\xed\xa0\x80":1}}}',
])
def test_the_gate_says_nothing_about_frames_it_cannot_vouch_for(frame: bytes) -> None:
    assert isinstance(GATE, HeartbeatGate)
    assert GATE.vouch(frame) is None


def _frame_with(envelope: dict[str, Any], data: dict[str, Any]) -> bytes:
    frame = {"message_type": "heartbeat", "message_id": "h-1", "sender_id": "dev", "data": data, **envelope}
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


_BOUNDS = [  # (what, a frame at the schema's bound, the same one step past it)
    ("metric list", ({}, {"system_metrics": {"l": [1.5] * 16}}), ({}, {"system_metrics": {"l": [1.5] * 17}})),
    ("metric text", ({}, {"system_metrics": {"s": "é" * 256}}), ({}, {"system_metrics": {"s": "é" * 257}})),
    ("metric name", ({}, {"system_metrics": {"n" * 64: 1}}), ({}, {"system_metrics": {"n" * 65: 1}})),
    ("metrics", ({}, {"system_metrics": {str(i): i for i in range(32)}}),
     ({}, {"system_metrics": {str(i): i for i in range(33)}})),
    ("metric int", ({}, {"system_metrics": {"i": 2**63 - 1, "j": -(2**63)}}), ({}, {"system_metrics": {"i": 2**64}})),
    ("metric negative int", ({}, {"system_metrics": {"j": -(2**63)}}), ({}, {"system_metrics": {"j": -(2**63) - 1}})),
    ("status", ({}, {"status": "s" * 256}), ({}, {"status": "s" * 257})),
    ("reason", ({}, {"reason": "r" * 256}), ({}, {"reason": "r" * 257})),
    ("active_tasks", ({}, {"active_tasks": 0}), ({}, {"active_tasks": -1})),
    ("active_tasks 64 bits", ({}, {"active_tasks": 2**63 - 1}), ({}, {"active_tasks": 2**64})),
    ("accepting", ({}, {"accepting": False}), ({}, {"accepting": 0})),
    ("message_id", ({"message_id": "m" * 128}, {}), ({"message_id": "m" * 129}, {})),
    ("empty message_id", ({"message_id": "m"}, {}), ({"message_id": ""}, {})),
    ("sender_id", ({"sender_id": "d" * 128}, {}), ({"sender_id": "d" * 129}, {})),
    ("target_id", ({"target_id": "t" * 128}, {}), ({"target_id": "t" * 129}, {})),
    ("timestamp", ({"timestamp": "t" * 64}, {}), ({"timestamp": "t" * 65}, {})),
    ("auth_token", ({"auth_token": "a" * 256}, {}), ({"auth_token": "a" * 257}, {})),
    ("last_activity", ({}, {"last_activity": None}), ({}, {"last_activity": 1})),
]


@pytest.mark.parametrize("what, at, past", _BOUNDS, ids=[case[0] for case in _BOUNDS])
def test_the_gate_keeps_each_bound_of_the_schema(what: str, at: tuple[dict[str, Any], dict[str, Any]],
                                                 past: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert GATE is not None
    assert _check(_frame_with(*at)), what
    beyond = _frame_with(*past)
    assert _general(beyond) is None, f"{what}: the schema takes it after all"
    assert GATE.vouch(beyond) is None, what


@pytest.mark.parametrize("data", [{"active_tasks": 2**63}, {"system_metrics": {"i": 2**64 - 1}}])
def test_an_integer_past_int64_goes_the_general_way(data: dict[str, Any]) -> None:
    """codec.loads takes integers up to 2**64 - 1; the gate vouches for int64 only, so the general path decides."""
    assert GATE is not None
    frame = _frame_with({}, data)
    assert GATE.vouch(frame) is None
    assert _general(frame) is not None


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"\A-?(0|[1-9][0-9]{0,3})\.[0-9]{1,40}([eE][-+]?[0-9]{1,3})?\Z"))
def test_a_long_decimal_is_read_as_the_general_path_reads_it(number: str) -> None:
    """Both parsers round a number with more digits than a float holds to the same float (or the gate says nothing)."""
    frame = b'{"message_type":"heartbeat","message_id":"h","sender_id":"d","data":{"system_metrics":{"x":%s}}}' % (
        number.encode())
    _check(frame)


# -- the task-frame gate: a worker's ack of an assignment and its task_result ---------------------

FRAME_GATE = task_frame_gate()

_GOOD_SCALAR = st.one_of(st.integers(-(2**63), 2**63 - 1), _FLOATS, st.booleans(), st.none(), _GOOD_TEXT)
_RESULT = st.fixed_dictionaries({}, optional={
    "output": _mostly(st.one_of(_GOOD_TEXT, st.none()), _VALUE),
    "exit_code": _mostly(st.one_of(st.integers(-3, 3), st.none()), st.one_of(_INTS, _VALUE)),
    "stderr": _mostly(st.one_of(_GOOD_TEXT, st.none()), _VALUE),
    "truncated": _mostly(st.booleans(), _VALUE),
    "error": _mostly(st.one_of(_GOOD_TEXT, st.none()), _VALUE),
    "metrics": _mostly(st.dictionaries(_GOOD_TEXT, _GOOD_SCALAR, max_size=4), st.one_of(_METRICS, _VALUE)),
    "fault": _mostly(st.sampled_from(["device", "task"]), st.one_of(_TEXT, _VALUE)),
    "stdout": st.one_of(_GOOD_TEXT, _VALUE),  # allowed by the schema; the gate says nothing about it
})
_RESULT_DATA = st.fixed_dictionaries(
    {"task_id": _mostly(st.one_of(st.just("t-1"), _GOOD_TEXT.filter(bool)), st.one_of(_TEXT, _INTS)),
     "attempt": _mostly(st.integers(1, 4), st.one_of(_INTS, _VALUE)),
     "status": _mostly(st.sampled_from(["completed", "failed", "cancelled", "timeout"]), st.one_of(_TEXT, _VALUE))},
    optional={"execution_time": _mostly(st.one_of(st.floats(0, 1e6), st.integers(0, 10)), st.one_of(_INTS, _FLOATS)),
              "result": _mostly(_RESULT, _VALUE)},
)
_ACK_DATA = st.fixed_dictionaries(
    {"original_message_id": _mostly(st.one_of(_GOOD_TEXT, st.none()), _VALUE)},
    optional={"result": _mostly(st.fixed_dictionaries({"task_id": _GOOD_TEXT}), _VALUE)},
)
_NUMBER = st.one_of(st.integers(-2, 4000), st.floats(-1, 4000), st.sampled_from([0, 0.0, 1e-300, 3600, 3600.5]))
_TASK = st.fixed_dictionaries(
    {"task_type": _mostly(st.one_of(st.just("echo"), _GOOD_TEXT.filter(bool)), st.one_of(_TEXT, _INTS))},
    optional={"payload": _mostly(st.dictionaries(_GOOD_TEXT, _GOOD_SCALAR, max_size=4), st.one_of(_METRICS, _VALUE)),
              "priority": _mostly(st.one_of(st.integers(0, 100), st.sampled_from(["low", "normal", "high", "urgent"])),
                                  st.one_of(_INTS, _TEXT, _VALUE)),
              "timeout": _mostly(st.one_of(st.integers(1, 100), st.floats(0.5, 1e5)), st.one_of(_NUMBER, _VALUE)),
              "max_retries": _mostly(st.integers(0, 100), st.one_of(_INTS, _VALUE)),
              "retry_on_timeout": _mostly(st.booleans(), _VALUE),
              "idempotency_key": _mostly(_GOOD_TEXT.filter(bool), st.one_of(_TEXT, _INTS)),
              "requirements": st.one_of(st.just({}), _VALUE)},  # allowed by the schema; not the gate's
)
_SUBMIT_DATA = st.fixed_dictionaries(
    {"task": _mostly(_TASK, _VALUE)},
    optional={"wait": _mostly(st.one_of(st.integers(1, 3600), st.floats(0.001, 3600)), st.one_of(_NUMBER, _VALUE))},
)
_END_FRAME = st.one_of(*(
    st.fixed_dictionaries(
        {"message_type": _mostly(st.just(kind), st.sampled_from(["heartbeat", "ack", "task_result", "error"])),
         "message_id": _mostly(st.one_of(st.just("m-1"), _GOOD_TEXT.filter(bool)), st.one_of(_TEXT, _INTS)),
         "sender_id": _mostly(st.just("dev"), _TEXT),
         "data": _mostly(data, _VALUE)},
        optional={"timestamp": _mostly(_GOOD_TEXT, st.one_of(_TEXT, _INTS)), "auth_token": _mostly(_GOOD_TEXT, _TEXT),
                  "target_id": _mostly(_GOOD_TEXT.filter(bool), _TEXT)})
    for kind, data in (("ack", _ACK_DATA), ("task_result", _RESULT_DATA), ("task_submit", _SUBMIT_DATA))))


_TASK_FRAME_TYPES = ("task_submit", "ack", "task_result")


def _general_end(frame: bytes) -> dict[str, Any] | None:
    return _general(frame, _TASK_FRAME_TYPES)


def _check_end(frame: bytes) -> bool:
    assert FRAME_GATE is not None
    both = _both(FRAME_GATE, frame, _TASK_FRAME_TYPES)
    if both is None:
        return False
    vouched, obj = both
    assert _same(vouched, obj) and list(vouched) == list(obj), (vouched, obj)
    return True


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_END_FRAME, st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 9), st.integers(0, 400))
def test_what_the_task_frame_gate_vouches_for_the_general_path_takes_with_the_same_values(
        frame_obj: dict[str, Any], encoder: int, mutation: int, cut: int) -> None:
    _check_end(_mutate(_encode(frame_obj, encoder), mutation, cut % 400))


@pytest.mark.parametrize("status", ["completed", "failed", "timeout", "cancelled"])
def test_the_task_frame_gate_vouches_for_what_our_worker_sends(tmp_path: Path, status: str) -> None:
    from retire_cluster.protocol.messages import ack
    from retire_cluster.worker.agent import Agent
    from retire_cluster.worker.config import WorkerConfig
    from retire_cluster.worker.executor import Outcome

    agent = Agent(WorkerConfig(device_id="dev", data_dir=tmp_path, token="t" * 43))
    accepted = encode(ack("m-1", {"task_id": "t-1"}, sender_id="dev")).rstrip(b"\n")
    outcome = Outcome(status, output="out: 1", exit_code=0 if status == "completed" else 1,
                      error=None if status == "completed" else "it: failed",
                      stderr=None if status == "completed" else "trace: x")
    data = agent._fit({"task_id": "t-1", "attempt": 2, "status": status, "execution_time": 0.25,
                       "result": outcome.result()})
    result = encode(agent._message("task_result", data)).rstrip(b"\n")
    for frame in (accepted, result):
        assert frame.startswith(TASK_FRAME_PREFIXES)
        assert _check_end(frame), frame


@pytest.mark.parametrize("data", [
    {"task": {"task_type": "echo", "payload": {"message": "hi"}}, "wait": 30},
    {"task": {"task_type": "sleep", "payload": {"seconds": 0.5}, "priority": "urgent", "timeout": 60.5,
              "max_retries": 0, "retry_on_timeout": True, "idempotency_key": "nightly: 2026-12-03"}},
    {"task": {"task_type": "command", "payload": {"cmd": "uptime", "shell": False}, "priority": 7}, "wait": 0.25},
])
def test_the_task_frame_gate_vouches_for_submissions_as_our_clients_send_them(data: dict[str, Any]) -> None:
    from retire_cluster.client.common import encode_request  # how Client and AsyncClient write a request

    frame = encode_request(Message("task_submit", "s-1", "client-1", data, timestamp="2026-12-03T10:00:00.000Z",
                                   auth_token="t" * 43), 1 << 20).rstrip(b"\n")
    assert frame.startswith(TASK_FRAME_PREFIXES)
    assert _check_end(frame)


_SUBMIT_BOUNDS = [  # (what, a submission's task and data at the schema's bound, the same one step past it)
    ("wait", ({}, {"wait": 3600}), ({}, {"wait": 3600.5})),
    ("wait above zero", ({}, {"wait": 1e-9}), ({}, {"wait": 0})),
    ("timeout", ({"timeout": 31536000}, {}), ({"timeout": 31536001}, {})),
    ("timeout above zero", ({"timeout": 0.001}, {}), ({"timeout": 0.0}, {})),
    ("priority", ({"priority": 100}, {}), ({"priority": 101}, {})),
    ("priority name", ({"priority": "urgent"}, {}), ({"priority": "hgih"}, {})),
    ("max_retries", ({"max_retries": 100}, {}), ({"max_retries": 101}, {})),
    ("task_type", ({"task_type": "t" * 64}, {}), ({"task_type": "t" * 65}, {})),
    ("empty task_type", ({"task_type": "t"}, {}), ({"task_type": ""}, {})),
    ("idempotency_key", ({"idempotency_key": "k" * 128}, {}), ({"idempotency_key": "k" * 129}, {})),
    ("retry_on_timeout", ({"retry_on_timeout": False}, {}), ({"retry_on_timeout": 0}, {})),
    ("payload", ({"payload": {}}, {}), ({"payload": []}, {})),
]


@pytest.mark.parametrize("what, at, past", _SUBMIT_BOUNDS, ids=[case[0] for case in _SUBMIT_BOUNDS])
def test_the_task_frame_gate_keeps_each_bound_of_a_submission(what: str, at: tuple[dict[str, Any], dict[str, Any]],
                                                             past: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert FRAME_GATE is not None

    def submit_frame(task: dict[str, Any], data: dict[str, Any]) -> bytes:
        obj = {"task": {"task_type": "echo", **task}, **data}
        return json.dumps({"message_type": "task_submit", "message_id": "s-1", "sender_id": "c", "data": obj},
                          separators=(",", ":"), ensure_ascii=False).encode()

    assert _check_end(submit_frame(*at)), what
    beyond = submit_frame(*past)
    assert _general_end(beyond) is None, f"{what}: the schema takes it after all"
    assert FRAME_GATE.vouch(beyond) is None, what


_END_BOUNDS = [  # (what, a result's data at the schema's bound, the same one step past it)
    ("attempt", {"attempt": 1}, {"attempt": 0}),
    ("task_id", {"task_id": "t" * 128}, {"task_id": "t" * 129}),
    ("empty task_id", {"task_id": "t"}, {"task_id": ""}),
    ("status", {"status": "cancelled"}, {"status": "lost"}),
    ("execution_time", {"execution_time": 0}, {"execution_time": -0.5}),
    ("exit_code", {"result": {"exit_code": None}}, {"result": {"exit_code": 1.5}}),
    ("truncated", {"result": {"truncated": False}}, {"result": {"truncated": 0}}),
    ("output", {"result": {"output": None}}, {"result": {"output": 1}}),
    ("fault", {"result": {"fault": "device"}}, {"result": {"fault": "worker"}}),
    ("metrics", {"result": {"metrics": {}}}, {"result": {"metrics": []}}),
]


@pytest.mark.parametrize("what, at, past", _END_BOUNDS, ids=[case[0] for case in _END_BOUNDS])
def test_the_task_frame_gate_keeps_each_bound_of_the_schema(what: str, at: dict[str, Any], past: dict[str, Any]) -> None:
    assert FRAME_GATE is not None

    def result_frame(change: dict[str, Any]) -> bytes:
        data = {"task_id": "t-1", "attempt": 1, "status": "completed", **change}
        return json.dumps({"message_type": "task_result", "message_id": "r-1", "sender_id": "dev", "data": data},
                          separators=(",", ":"), ensure_ascii=False).encode()

    assert _check_end(result_frame(at)), what
    beyond = result_frame(past)
    assert _general_end(beyond) is None, f"{what}: the schema takes it after all"
    assert FRAME_GATE.vouch(beyond) is None, what


@pytest.mark.parametrize("frame", [
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","status":"failed"}}',
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","result":{"exit_code":9223372036854775808}}}',  # uint64: the general path takes it
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","result":{"metrics":{"m":{"deep":1}}}}}',  # allowed, but not flat
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","result":{"output":"\\u003a","output":"b"}}}',
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","result":{"stdout":"x"}}}',  # allowed, but not named by common.json
    b'{"message_type":"task_result","message_id":"a\x7f","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed"}}',
    b'{"message_type":"task_result","message_id":"a","sender_id":"s","data":{"task_id":"t","attempt":1,'
    b'"status":"completed","more":1}}',
    b'{"message_type":"ack","message_id":"a","sender_id":"s","data":{"original_message_id":"m","result":{}}}',
    b'{"message_type":"ack","message_id":"a","sender_id":"s","data":{"original_message_id":"m",'
    b'"result":{"task_id":"t"}}} x',
    b'{"message_type":"ack","message_id":"a","sender_id":"s","data":{"original_message_id":"\xed\xa0\x80"}}',
    b'{"message_type":"ack","message_id":"a","sender_id":"s","colour":"red","data":{"original_message_id":"m"}}',
    b'{"message_type":"heartbeat","message_id":"a","sender_id":"s","data":{}}',
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo",'
    b'"requirements":{}}}}',  # allowed, but not the gate's
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo",'
    b'"payload":{"deep":{"a":1}}}}}',  # allowed, but not flat
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo",'
    b'"payload":{"n":18446744073709551615}}}}',  # uint64: the general path takes it
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo",'
    b'"payload":{"m":"\\n"}}}}',  # an escape
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo"},'
    b'"task":{"task_type":"sleep"}}}',
    b'{"message_type":"task_submit","message_id":"a","sender_id":"s","data":{"task":{"task_type":"echo"},'
    b'"wait":true}}',
])
def test_the_task_frame_gate_says_nothing_about_frames_it_cannot_vouch_for(frame: bytes) -> None:
    assert isinstance(FRAME_GATE, TaskFrameGate)
    assert FRAME_GATE.vouch(frame) is None
