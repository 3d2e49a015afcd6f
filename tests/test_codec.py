"""Codec, errors and message helpers, driven by the golden vectors in protocol/vectors/.

Each vector is fed through :class:`MessageStream` whole, byte by byte, unterminated
before EOF, and followed by a valid frame in the same chunk (as h11's tests do).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import Vector, load_vectors, vector_params

from retire_cluster.protocol import codec
from retire_cluster.protocol.codec import (
    BadFrame,
    Event,
    MessageStream,
    decode_message,
    dumps,
    encode,
    encode_ack,
    loads,
)
from retire_cluster.protocol.errors import (
    ERROR_CODES,
    FrameTooLarge,
    InternalError,
    InvalidMessage,
    ProtocolError,
    RemoteProtocolError,
    error_from_code,
)
from retire_cluster.protocol.messages import (
    PRIORITY_NAMES,
    Message,
    ack,
    error_reply,
    new_message_id,
    parse_priority,
    utc_timestamp,
)
from retire_cluster.protocol.validation import MessageValidator

VECTORS_FILE = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "frames.json"
VECTORS = load_vectors(VECTORS_FILE)
MESSAGE_VECTORS = [v for v in VECTORS if v["decode"] == "message"]
REFUSED_VECTORS = [v for v in VECTORS if v["decode"] != "message"]

#: The codes DESIGN.md lists, in its order.
DESIGN_CODES = [
    "invalid_json",
    "frame_too_large",
    "invalid_message",
    "unknown_message_type",
    "unauthorized",
    "not_registered",
    "forbidden",
    "not_found",
    "conflict",
    "overloaded",
    "internal",
]

FOLLOW = b'{"message_type":"cluster_status","message_id":"follow","sender_id":"client-1","data":{}}'

VALIDATOR = MessageValidator()


def kind(event: Event) -> str:
    """``message`` or the refused frame's error code."""
    if isinstance(event, Message):
        return "message"
    assert isinstance(event, BAD_FRAME_TYPES)
    return event.error.code


def validation_result(message: Message) -> str:
    try:
        VALIDATOR.validate(message)
    except ProtocolError as exc:
        return exc.code
    return "ok"


def expected_hint(frame: bytes) -> Tuple[Optional[str], Optional[str]]:
    """The message_id and auth_token a refused frame should still report."""
    try:
        obj = loads(frame)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    mid, tok = obj.get("message_id"), obj.get("auth_token")
    return (mid if isinstance(mid, str) else None, tok if isinstance(tok, str) else None)


# -- the vector file itself -----------------------------------------------------------


def test_vector_file_is_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    assert len(VECTORS) >= 40
    allowed = {"name", "frame", "frame_hex", "decode", "validate", "reply", "reply_unauthenticated", "note",
               "frame_bytes"}
    for v in VECTORS:
        assert set(v) <= allowed, v["name"]
        assert ("frame" in v) != ("frame_hex" in v), v["name"]
        assert v["decode"] in ("message", "invalid_json", "invalid_message"), v["name"]
        if v["decode"] == "message":
            assert v["validate"] in ("ok", "invalid_message", "unknown_message_type"), v["name"]
        else:
            assert "validate" not in v, v["name"]
        assert "reply" in v, v["name"]
        assert v["reply"] is None or v["reply"] == "ack" or v["reply"] in ERROR_CODES, v["name"]
        assert v.get("reply_unauthenticated", "frame_too_large") in ("frame_too_large", "invalid_json"), v["name"]
        assert b"\n" not in v["frame_bytes"], v["name"]


def test_vectors_cover_every_message_type_valid() -> None:
    valid_types = {loads(v["frame_bytes"])["message_type"] for v in MESSAGE_VECTORS if v["validate"] == "ok"}
    assert valid_types == VALIDATOR.types


# -- decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", vector_params(VECTORS))
def test_decode_message(vector: Vector) -> None:
    try:
        result = decode_message(vector["frame_bytes"])
    except RemoteProtocolError as exc:
        assert exc.code == vector["decode"]
        if isinstance(exc, InvalidMessage):
            assert exc.path is not None and exc.path.startswith("$")
    else:
        assert isinstance(result, Message)
        assert vector["decode"] == "message"


@pytest.mark.parametrize("vector", vector_params(VECTORS))
def test_stream_whole_frame(vector: Vector) -> None:
    stream = MessageStream()
    events = stream.feed(vector["frame_bytes"] + b"\n")
    assert [kind(e) for e in events] == [vector["decode"]]
    assert stream.feed(b"") == []


@pytest.mark.parametrize("vector", vector_params(VECTORS))
def test_stream_byte_by_byte(vector: Vector) -> None:
    stream = MessageStream()
    data = vector["frame_bytes"] + b"\r\n"
    events: List[Event] = []
    for i in range(len(data)):
        got = stream.feed(data[i : i + 1])
        assert got == [] or i == len(data) - 1
        events += got
    assert [kind(e) for e in events] == [vector["decode"]]
    if vector["decode"] == "message":
        assert events == [decode_message(vector["frame_bytes"])]


@pytest.mark.parametrize("vector", vector_params(VECTORS))
def test_stream_unterminated_frame_at_eof(vector: Vector) -> None:
    stream = MessageStream()
    assert stream.feed(vector["frame_bytes"]) == []
    assert [kind(e) for e in stream.feed(b"")] == [vector["decode"]]
    assert stream.closed
    assert stream.feed(b"more\n") == []


@pytest.mark.parametrize("vector", vector_params(VECTORS))
def test_stream_with_a_following_valid_frame(vector: Vector) -> None:
    stream = MessageStream()
    events = stream.feed(b"\n" + vector["frame_bytes"] + b"\n" + FOLLOW + b"\n" + FOLLOW[:10])
    assert [kind(e) for e in events] == [vector["decode"], "message"]
    follow = events[1]
    assert isinstance(follow, Message) and follow.message_id == "follow"
    assert stream.decoder.buffered_bytes == 10


@pytest.mark.parametrize("vector", vector_params(MESSAGE_VECTORS))
def test_validate(vector: Vector) -> None:
    message = decode_message(vector["frame_bytes"])
    assert validation_result(message) == vector["validate"]


@pytest.mark.parametrize("vector", vector_params(MESSAGE_VECTORS))
def test_validate_obj_of_the_wire_form(vector: Vector) -> None:
    wire = decode_message(vector["frame_bytes"]).to_wire()
    try:
        VALIDATOR.validate_obj(wire)
    except InvalidMessage as exc:
        assert vector["validate"] == "invalid_message"
        assert exc.path is not None and exc.path.startswith("$")
        assert exc.to_data()["path"] == exc.path
    except ProtocolError as exc:
        assert exc.code == vector["validate"]
    else:
        assert vector["validate"] == "ok"


@pytest.mark.parametrize("vector", vector_params(MESSAGE_VECTORS))
def test_encode_decode_roundtrip(vector: Vector) -> None:
    message = decode_message(vector["frame_bytes"])
    frame = encode(message)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert decode_message(frame[:-1]) == message
    assert MessageStream().feed(frame) == [message]
    assert encode(decode_message(frame[:-1])) == frame


@pytest.mark.parametrize("vector", vector_params(REFUSED_VECTORS))
def test_bad_frame_carries_message_id_and_token_when_it_had_them(vector: Vector) -> None:
    (event,) = MessageStream().feed(vector["frame_bytes"] + b"\n")
    assert isinstance(event, BadFrame)
    assert not event.error.close
    assert (event.message_id, event.auth_token) == expected_hint(vector["frame_bytes"])


@pytest.mark.parametrize(
    "name, message_id",
    [
        ("missing_sender_id", "vec-no-sender"),
        ("data_not_object_list", "vec-data-list"),
        ("message_type_not_string", "vec-type-int"),
        ("missing_message_id", None),
        ("message_id_not_string", None),
        ("not_json", None),
        ("truncated_json", None),
        ("json_array", None),
    ],
)
def test_bad_frame_message_id_examples(name: str, message_id: Optional[str]) -> None:
    (vector,) = [v for v in VECTORS if v["name"] == name]
    (event,) = MessageStream().feed(vector["frame_bytes"] + b"\n")
    assert isinstance(event, BadFrame)
    assert event.message_id == message_id


def test_bad_frame_keeps_auth_token_for_authentication() -> None:
    frame = b'{"message_type":"task_status","message_id":"m1","sender_id":"c","data":[],"auth_token":"tok"}'
    (event,) = MessageStream().feed(frame + b"\n")
    assert isinstance(event, BadFrame)
    assert (event.error.code, event.message_id, event.auth_token) == ("invalid_message", "m1", "tok")
    assert event.error.path == "$.data"


def test_decoder_fills_defaults_and_keeps_optional_fields() -> None:
    message = decode_message(b'{"message_type":"x","message_id":"m","sender_id":"s"}')
    assert message == Message("x", "m", "s", {})
    full = decode_message(
        b'{"message_type":"x","message_id":"m","sender_id":"s","data":{"k":[1]},'
        b'"target_id":"t","timestamp":"2024-01-15T10:30:00Z","auth_token":"a"}'
    )
    assert full == Message("x", "m", "s", {"k": [1]}, "t", "2024-01-15T10:30:00Z", "a")
    assert decode_message(encode(full).rstrip(b"\n")) == full


def test_to_wire_leaves_out_unset_optional_fields() -> None:
    assert Message("x", "m", "s").to_wire() == {
        "message_type": "x",
        "message_id": "m",
        "sender_id": "s",
        "data": {},
    }


# -- frame_too_large through the stream ----------------------------------------------


def test_stream_refuses_a_frame_too_large_and_closes() -> None:
    stream = MessageStream(max_frame_bytes=len(FOLLOW))
    assert [kind(e) for e in stream.feed(FOLLOW + b"\n")] == ["message"]
    (event,) = stream.feed(FOLLOW + b" \n")
    assert isinstance(event, BadFrame) and isinstance(event.error, FrameTooLarge)
    assert event.error.close and event.error.code == "frame_too_large"
    assert event.message_id is None
    assert stream.closed
    assert stream.feed(FOLLOW + b"\n") == []
    assert stream.feed(b"") == []


def test_stream_refuses_an_unterminated_frame_too_large() -> None:
    stream = MessageStream(max_frame_bytes=1024)
    (event,) = stream.feed(b"{" + b" " * 1024)
    assert kind(event) == "frame_too_large"


def test_stream_frame_too_large_after_a_good_frame_in_the_same_chunk() -> None:
    stream = MessageStream(max_frame_bytes=len(FOLLOW))
    events = stream.feed(FOLLOW + b"\n" + b"x" * (len(FOLLOW) + 1) + b"\n")
    assert [kind(e) for e in events][-1:] == ["frame_too_large"]
    assert stream.closed


def test_stream_max_frame_bytes_can_be_changed() -> None:
    stream = MessageStream(max_frame_bytes=4096)
    stream.max_frame_bytes = len(FOLLOW) - 1
    assert stream.decoder.max_frame_bytes == len(FOLLOW) - 1
    assert [kind(e) for e in stream.feed(FOLLOW + b"\n")] == ["frame_too_large"]


def test_stream_with_a_custom_decode() -> None:
    def strict(frame: bytes) -> Message:
        message = decode_message(frame)
        VALIDATOR.validate(message)
        return message

    stream = MessageStream(decode=strict)
    bad = b'{"message_type":"task_status","message_id":"m","sender_id":"c","data":{}}'
    events = stream.feed(bad + b"\n" + FOLLOW + b"\n")
    assert [kind(e) for e in events] == ["invalid_message", "message"]
    assert isinstance(events[0], BadFrame) and events[0].message_id == "m"


# -- errors --------------------------------------------------------------------------


def test_error_codes_are_the_ones_design_lists() -> None:
    assert list(ERROR_CODES) == DESIGN_CODES


@pytest.mark.parametrize("code", DESIGN_CODES)
def test_error_from_code_roundtrip(code: str) -> None:
    exc = error_from_code(code, "Do this instead.", path="$.data.task")
    assert type(exc) is ERROR_CODES[code]
    assert exc.code == code and str(exc) == "Do this instead." and exc.path == "$.data.task"
    assert exc.to_data() == {"code": code, "error": "Do this instead.", "path": "$.data.task"}
    assert exc.close == (code == "frame_too_large")
    assert isinstance(exc, RemoteProtocolError) == (code != "internal")
    reply = error_reply("m-1", code, str(exc), path=exc.path)
    VALIDATOR.validate(reply)
    back = error_from_code(reply.data["code"], reply.data["error"], path=reply.data.get("path"))
    assert type(back) is type(exc) and back.to_data() == exc.to_data()


def test_error_without_path_has_no_path_in_data() -> None:
    assert error_from_code("not_found", "No task.").to_data() == {"code": "not_found", "error": "No task."}


@pytest.mark.parametrize("code", ["teapot", "", "NOT_FOUND", "internal_error"])
def test_error_from_unknown_code_is_internal(code: str) -> None:
    exc = error_from_code(code, "from a newer main node")
    assert type(exc) is InternalError
    assert isinstance(exc, ProtocolError) and not isinstance(exc, RemoteProtocolError)
    assert exc.code == "internal"


# -- message helpers -----------------------------------------------------------------


def test_ack_and_error_reply_are_valid_messages() -> None:
    for message in (
        ack("m-1"),
        ack(None, {"task_id": "t"}, timestamp=utc_timestamp(0)),
        error_reply(None, "invalid_json", "Not JSON."),
        error_reply("m-2", "invalid_message", "$.data: bad", path="$.data", sender_id="w"),
    ):
        VALIDATOR.validate(message)
        assert decode_message(encode(message).rstrip(b"\n")) == message
    assert ack("m-1").data == {"original_message_id": "m-1", "result": {}}


def test_new_message_id_is_unique() -> None:
    ids = {new_message_id() for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize(
    "value, expected",
    [
        *PRIORITY_NAMES.items(),
        ("HIGH", 10),
        (" Urgent ", 20),
        (0, 0),
        (7, 7),
        (100, 100),
        ("0", 0),
        ("42", 42),
        (5.0, 5),
    ],
)
def test_parse_priority(value: Any, expected: int) -> None:
    assert parse_priority(value) == expected


def test_priority_names_are_the_designed_ones() -> None:
    assert PRIORITY_NAMES == {"low": 1, "normal": 5, "high": 10, "urgent": 20}


@pytest.mark.parametrize(
    "value", ["asap", "", " ", "-1", "101", "1e2", "5.0", "\u00b2", "\u0663", 101, -1, 5.5, 101.0, True, False,
              None, [5], {"p": 5}]
)
def test_parse_priority_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="priority"):
        parse_priority(value)


TIMESTAMP_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")


@pytest.mark.parametrize(
    "epoch_s, expected",
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1705314600, "2024-01-15T10:30:00.000Z"),
        (1705314600.5, "2024-01-15T10:30:00.500Z"),
        (1705314600.0999, "2024-01-15T10:30:00.099Z"),
        (1705314659.9999, "2024-01-15T10:30:59.999Z"),
    ],
)
def test_utc_timestamp(epoch_s: float, expected: str) -> None:
    assert utc_timestamp(epoch_s) == expected


def test_utc_timestamp_now_is_rfc3339_utc() -> None:
    before = datetime.now(timezone.utc)
    stamp = utc_timestamp()
    assert TIMESTAMP_RE.match(stamp)
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs((parsed - before).total_seconds()) < 5


# -- the standard-library JSON backend (workers without orjson) ----------------------


def load_stdlib_codec() -> ModuleType:
    """A second copy of the codec module, imported as if orjson were missing."""
    name = "retire_cluster.protocol._codec_without_orjson"
    spec = importlib.util.spec_from_file_location(name, codec.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]  # makes `import orjson` fail
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        if saved is None:
            del sys.modules["orjson"]
        else:
            sys.modules["orjson"] = saved
    assert module._orjson is None
    return module


STDLIB_CODEC = load_stdlib_codec()

BAD_FRAME_TYPES = (BadFrame, STDLIB_CODEC.BadFrame)

#: Frames the stdlib backend accepts although they are not strict JSON; orjson, which
#: the main node uses, refuses them. See test_stdlib_backend_decodes_like_orjson.
STDLIB_LENIENT: set = set()


def stdlib_params() -> List[Any]:
    params = []
    for v in VECTORS:
        marks = []
        if v["name"] in STDLIB_LENIENT:
            marks.append(pytest.mark.xfail(strict=True, reason="stdlib loads() is laxer than orjson"))
        params.append(pytest.param(v, id=v["name"], marks=marks))
    return params


@pytest.mark.parametrize("vector", stdlib_params())
def test_stdlib_backend_decodes_like_orjson(vector: Vector) -> None:
    """codec.py promises the same results with or without orjson.

    Known gaps: the fallback strips with ``str.strip()`` (which also removes U+00A0,
    U+2028, \\x1c-\\x1f ... that JSON does not call whitespace), turns 1e400 into inf and
    accepts lone surrogate escapes.
    """
    events = STDLIB_CODEC.MessageStream().feed(vector["frame_bytes"] + b"\n")
    assert [kind(e) for e in events] == [vector["decode"]]
    if vector["decode"] == "message":
        (message,) = events
        assert message == decode_message(vector["frame_bytes"])
        assert STDLIB_CODEC.decode_message(encode(message)[:-1]) == message
        assert decode_message(STDLIB_CODEC.encode(message)[:-1]) == message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_stdlib_backend_refuses_nan_and_infinity(literal: bytes) -> None:
    with pytest.raises(ValueError):
        STDLIB_CODEC.loads(b'{"a":' + literal + b"}")


# -- any bytes: messages or refused frames, nothing else ------------------------------

SMALL_MAX = 256
SHORT_FRAMES = [v["frame_bytes"] for v in VECTORS if len(v["frame_bytes"]) <= SMALL_MAX]
FRAMEISH = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([FOLLOW, *SHORT_FRAMES]),
    st.sampled_from([b"\n", b"\r\n", b"{", b"}", b'"', b"\\", b"\xff", b"\xe2\x82", b"[" * 40]),
)
STREAMS = st.one_of(
    st.binary(max_size=600),
    st.lists(FRAMEISH, max_size=12).map(b"".join),
    st.lists(FRAMEISH, max_size=12).map(b"\n".join),
)
STREAM_MODULES = [
    pytest.param(codec, id="orjson" if codec._orjson is not None else "stdlib"),
    pytest.param(STDLIB_CODEC, id="stdlib-fallback"),
]


def summary(events: List[Event]) -> List[Tuple[str, Any]]:
    """Comparable events: refused frames compare by code, message_id and auth_token."""
    out: List[Tuple[str, Any]] = []
    for event in events:
        if isinstance(event, Message):
            out.append(("message", event))
        else:
            out.append((kind(event), (event.message_id, event.auth_token)))
    return out


def check_events(events: List[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, (Message, *BAD_FRAME_TYPES))
        if not isinstance(event, Message):
            assert isinstance(event.error, RemoteProtocolError)
            assert event.error.code in ERROR_CODES
            if event.error.close:
                assert i == len(events) - 1


def run_stream(module: ModuleType, chunks: List[bytes]) -> List[Event]:
    stream = module.MessageStream(max_frame_bytes=SMALL_MAX)
    events: List[Event] = []
    for chunk in chunks:
        if chunk:
            events += stream.feed(chunk)
            assert stream.decoder.buffered_bytes <= SMALL_MAX
    events += stream.feed(b"")
    return events


@pytest.mark.parametrize("module", STREAM_MODULES)
@settings(max_examples=300, deadline=None)
@given(data=STREAMS)
def test_any_bytes_give_messages_or_bad_frames(module: ModuleType, data: bytes) -> None:
    whole = run_stream(module, [data])
    check_events(whole)
    split = run_stream(module, [data[i : i + 1] for i in range(len(data))])
    check_events(split)
    if not any(kind(e) == "frame_too_large" for e in whole + split):
        # Without an oversized frame, how the bytes are split changes nothing.
        assert summary(whole) == summary(split)


@pytest.mark.parametrize("module", STREAM_MODULES)
@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.one_of(st.binary(max_size=40), FRAMEISH), max_size=20))
def test_any_chunks_give_messages_or_bad_frames(module: ModuleType, chunks: List[bytes]) -> None:
    events = run_stream(module, chunks)
    check_events(events)


@pytest.mark.parametrize("original, result", [
    ("m-1", {"active_tasks": 0}),
    (None, None),
    ('quote " backslash \\ and \u00e9\U0001f600', {"nested": {"list": [1, 2.5, None, True]}}),
    ("x" * 128, {}),
])  # fmt: skip
def test_the_main_nodes_ack_template_gives_the_bytes_of_the_generic_encoding(original, result) -> None:
    timestamp = utc_timestamp(1_800_000_000.123)
    fast = encode_ack(original, result, timestamp)
    frame = json.loads(fast)
    generic = dumps({"message_type": "ack", "message_id": frame["message_id"], "sender_id": "main-node",
                     "data": {"original_message_id": original, "result": {} if result is None else result},
                     "timestamp": timestamp}) + b"\n"  # fmt: skip
    assert fast == generic
    assert encode_ack(original, result, timestamp, sender_id="dev-1").startswith(b'{"message_type":"ack"')


def test_encode_frame_makes_the_bytes_encode_makes_of_a_message() -> None:
    """The round trip's frames skip the frozen Message (codec.encode_frame); the bytes must not change."""
    from retire_cluster.protocol.codec import encode_frame

    for optional in ({}, {"target_id": "w1"}, {"timestamp": "2026-12-04T08:00:00.000Z", "auth_token": "tok"},
                     {"target_id": "w1", "timestamp": "2026-12-04T08:00:00.000Z", "auth_token": "tok"}):
        data = {"task": {"task_id": "t", "payload": {"message": "é"}}}
        assert encode_frame("task_assign", "m-1", "main-node", data, **optional) == encode(
            Message("task_assign", "m-1", "main-node", data, **optional))
