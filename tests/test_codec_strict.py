"""Strict JSON in the codec: nesting depth and duplicate keys, against a reference.

The codec checks depth on the bytes before parsing and finds duplicate keys by
counting colons (see retire_cluster/protocol/codec.py). Here hypothesis builds
JSON texts whose depth and duplicates are known by construction, spelled with
escapes, whitespace and brackets, colons and quotes inside strings, and both
backends (orjson and the standard-library fallback) must agree with that.
"""

from __future__ import annotations

import json
import random
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import STDLIB_CODEC

from retire_cluster.protocol import codec
from retire_cluster.protocol.codec import (
    DEFAULT_MAX_DEPTH,
    DuplicateKey,
    MessageStream,
    decode_message,
)
from retire_cluster.protocol.errors import InvalidJSON

BACKENDS = [
    pytest.param(codec, id="orjson" if codec._orjson is not None else "stdlib"),
    pytest.param(STDLIB_CODEC, id="stdlib-fallback"),
]


class Obj:
    """A JSON object as written: its pairs in order, duplicates allowed."""

    def __init__(self, pairs: List[Tuple[str, Any]]) -> None:
        self.pairs = pairs


KEYS = st.sampled_from(["a", "b", "k", ":", "a:", "[", "{", '"', "\\", "é", "\u003a", "\\u003a", "😀"])
SCALARS = st.one_of(
    st.integers(-10, 10),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "x", ":", "::", "[[", "]}", '"', '\\"', "\\", "a\\\\", "\u0000", "é😀"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(st.tuples(KEYS, inner), max_size=3).map(Obj)
    ),
    max_leaves=40,
)


def depth(node: Any) -> int:
    if isinstance(node, Obj):
        return 1 + max((depth(v) for _, v in node.pairs), default=0)
    if isinstance(node, list):
        return 1 + max((depth(v) for v in node), default=0)
    return 0


def has_duplicates(node: Any) -> bool:
    if isinstance(node, Obj):
        keys = [k for k, _ in node.pairs]
        return len(keys) != len(set(keys)) or any(has_duplicates(v) for _, v in node.pairs)
    if isinstance(node, list):
        return any(has_duplicates(v) for v in node)
    return False


def plain(node: Any) -> Any:
    """What a parser gives (the last value of a duplicate key)."""
    if isinstance(node, Obj):
        return {k: plain(v) for k, v in node.pairs}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def spell_string(text: str, rng: random.Random) -> str:
    """A JSON string literal, some characters written as \\uXXXX escapes."""
    out = ['"']
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20:
            out.append(json.dumps(ch)[1:-1] if rng.random() < 0.5 else f"\\u{ord(ch):04x}")
        elif rng.random() < 0.2 and ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(node: Any, rng: random.Random) -> str:
    ws = (lambda: rng.choice(["", "", " ", "\n", "\t "])) if rng.random() < 0.5 else (lambda: "")
    if isinstance(node, Obj):
        items = [f"{ws()}{spell_string(k, rng)}{ws()}:{ws()}{render(v, rng)}{ws()}" for k, v in node.pairs]
        return "{" + ",".join(items) + ws() + "}"
    if isinstance(node, list):
        return "[" + ",".join(f"{ws()}{render(v, rng)}{ws()}" for v in node) + ws() + "]"
    if isinstance(node, str):
        return spell_string(node, rng)
    return json.dumps(node)


@pytest.mark.parametrize("module", BACKENDS)
@settings(max_examples=400, deadline=None)
@given(node=VALUES, seed=st.integers(0, 2**32), max_depth=st.sampled_from([2, 3, 5, 32]))
def test_depth_and_duplicates_match_the_reference(module: Any, node: Any, seed: int, max_depth: int) -> None:
    text = render(node, random.Random(seed)).encode("utf-8")
    if depth(node) > max_depth:
        with pytest.raises(module.NestingTooDeep):
            module.loads(text, max_depth)
    elif has_duplicates(node):
        with pytest.raises(module.DuplicateKey):
            module.loads(text, max_depth)
    else:
        assert module.loads(text, max_depth) == plain(node)


@pytest.mark.parametrize("module", BACKENDS)
@pytest.mark.parametrize("levels", [1, 2, 31, 32, 33, 100, 5000])
def test_nesting_limit_is_exact(module: Any, levels: int) -> None:
    for opener, closer in (("[", "]"), ('{"k":', "}"), ('[{"k":', "}]")):
        reps = levels if len(opener) < 5 else levels // 2
        total = reps * (2 if len(opener) == 6 else 1)
        text = (opener * reps + "1" + closer * reps).encode()
        if total <= DEFAULT_MAX_DEPTH:
            module.loads(text)
        else:
            with pytest.raises(ValueError, match="nested deeper than 32"):
                module.loads(text)


@pytest.mark.parametrize("module", BACKENDS)
def test_unclosed_deep_nesting_is_refused_without_recursing(module: Any) -> None:
    for text in (b"[" * 100_000, b'{"a":' * 50_000, b"[" * 40 + b"]" * 39):
        with pytest.raises(module.NestingTooDeep):
            module.loads(text)
    with pytest.raises(ValueError):  # closers first: no parser gets deep, it is just not JSON
        module.loads(b"]" * 40 + b"[" * 40)


@pytest.mark.parametrize("module", BACKENDS)
def test_brackets_in_strings_do_not_count(module: Any) -> None:
    for inner in ("[" * 100, "{" * 100, '\\"' + "[" * 100, "\\\\" + "[" * 40, "[\\u005b" * 50):
        text = ('{"a":"' + inner + '","b":[[1]]}').encode()
        assert module.loads(text)["b"] == [[1]]
    # an escaped backslash ends the string: these brackets are structure
    with pytest.raises(ValueError):
        module.loads(b'{"a":"\\\\",' + b"[" * 40 + b"]" * 40 + b"}")


@pytest.mark.parametrize("module", BACKENDS)
def test_max_depth_is_a_parameter(module: Any) -> None:
    text = b'{"a":{"b":{"c":1}}}'
    assert module.loads(text, 3) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ValueError):
        module.loads(text, 2)
    stream = module.MessageStream(max_depth=2)
    frame = b'{"message_type":"x","message_id":"m","sender_id":"s","data":{"a":{"b":1}}}\n'
    (event,) = stream.feed(frame)
    assert getattr(event, "error", None) is not None and event.error.code == "invalid_json"
    assert "nested deeper than 2" in event.error.message
    (event,) = module.MessageStream(max_depth=3).feed(frame)
    assert event.data == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b'{"message_type":"x","message_id":"m","message_id":"n","sender_id":"s"}', "same key twice"),
        (
            b'{"message_type":"x","message_id":"m","sender_id":"s","data":{"a":1,"\\u0061":2}}',
            "same key twice",
        ),
        (
            b'{"message_type":"x","message_id":"m","sender_id":"s","data":' + b"[" * 40 + b"]" * 40 + b"}",
            "nested deeper than 32",
        ),
        (b'{"message_type":"x","message_id":"m","sender_id":"s","data":{"v":NaN}}', "not valid JSON"),
    ],
)
def test_refusals_say_why(frame: bytes, reason: str) -> None:
    with pytest.raises(InvalidJSON, match=reason):
        decode_message(frame)
    (event,) = MessageStream().feed(frame + b"\n")
    assert event.error.code == "invalid_json" and reason in event.error.message
    assert event.message_id is None  # an ambiguous frame tells us nothing, not even its id


def test_duplicate_check_handles_escaped_colons_exactly() -> None:
    ok = b'{"a":"\\u003a\\u003A","b":"x"}'
    assert codec.loads(ok) == {"a": "::", "b": "x"}
    for bad in (b'{"a":1,"a":"\\u003a"}', b'{"a":"\\u003a\\u003a","a":"x:y:z"}', b'{"\\u003a":1,":":2}'):
        with pytest.raises(DuplicateKey):
            codec.loads(bad)


def test_str_input_is_checked_too() -> None:
    assert codec.loads('{"a":"é"}') == {"a": "é"}
    with pytest.raises(DuplicateKey):
        codec.loads('{"a":1,"a":1}')
    with pytest.raises(ValueError):
        codec.loads('{"a":"\ud800"}')
