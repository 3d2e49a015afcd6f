"""The compiled schema checks give jsonschema's verdict, on the vectors and on mutated messages."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import load_vectors

from retire_cluster.protocol.errors import InvalidMessage
from retire_cluster.protocol.fastcheck import UnsupportedSchema, compile_schema
from retire_cluster.protocol.validation import MessageValidator

VALIDATOR = MessageValidator()
MESSAGES = [json.loads(v["frame_bytes"]) for v in load_vectors()
            if v["decode"] == "message" and v.get("validate") != "unknown_message_type"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["low", "urgent", "completed", "echo", "", "x" * 300]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def paths(obj: Any, prefix: tuple = ()) -> list:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, prefix + (i,))
    return out


@pytest.mark.parametrize("message", MESSAGES, ids=[m.get("message_id", "?") for m in MESSAGES])
def test_vectors_same_verdict(message: dict) -> None:
    assert VALIDATOR.fast_ok(message) == VALIDATOR.reference_ok(message)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), value=json_values)
def test_mutated_messages_same_verdict(data: st.DataObject, value: Any) -> None:
    message = copy.deepcopy(data.draw(st.sampled_from(MESSAGES)))
    path = data.draw(st.sampled_from(paths(message)[1:]))
    target = message
    for part in path[:-1]:
        target = target[part]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = value
    if not isinstance(message.get("message_type"), str) or message["message_type"] not in VALIDATOR.types:
        return
    assert VALIDATOR.fast_ok(message) == VALIDATOR.reference_ok(message), message


@settings(max_examples=200, deadline=None)
@given(data=st.data(), key=st.text(min_size=1, max_size=10), value=json_values)
def test_added_fields_same_verdict(data: st.DataObject, key: str, value: Any) -> None:
    message = copy.deepcopy(data.draw(st.sampled_from(MESSAGES)))
    dicts = [p for p in paths(message) if isinstance(_get(message, p), dict)]
    _get(message, data.draw(st.sampled_from(dicts)))[key] = value
    if message.get("message_type") in VALIDATOR.types:
        assert VALIDATOR.fast_ok(message) == VALIDATOR.reference_ok(message), message


def _get(obj: Any, path: tuple) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def test_invalid_message_error_comes_from_jsonschema() -> None:
    bad = {"message_type": "task_submit", "message_id": "1", "sender_id": "c",
           "data": {"task": {"task_type": "echo", "requirements": {"min_cpus": 2}}}}
    with pytest.raises(InvalidMessage) as err:
        VALIDATOR.validate_obj(bad)
    assert err.value.path == "$.data.task.requirements" and "min_cpus" in err.value.message


def test_unknown_keyword_is_refused_at_compile_time() -> None:
    schema = {"$id": "https://x/s.json", "type": "object", "dependentRequired": {"a": ["b"]}}
    with pytest.raises(UnsupportedSchema, match="dependentRequired"):
        compile_schema(schema, {"https://x/s.json": schema})


def test_bool_is_not_a_number_and_integral_floats_are_integers() -> None:
    schema = {"$id": "https://x/s.json", "type": "object",
              "properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "e": {"enum": [1, "a"]}}}
    check = compile_schema(schema, {"https://x/s.json": schema})
    assert check({"n": 5.0, "x": 1, "e": 1.0})
    assert not check({"n": True})
    assert not check({"x": False})
    assert not check({"e": True})


def test_nan_and_infinity_are_not_numbers_on_either_path() -> None:
    """JSON cannot carry them, but an in-process caller can, and NaN passes every bound."""
    from retire_cluster.protocol.validation import MessageValidator

    validator = MessageValidator()
    for value in (float("nan"), float("inf"), float("-inf")):
        for data in ({"task": {"task_type": "echo", "timeout": value}}, {"task": {"task_type": "echo"}, "wait": value},
                     {"task": {"task_type": "echo", "requirements": {"min_memory_gb": value}}}):
            message = {"message_type": "task_submit", "message_id": "1", "sender_id": "c", "data": data}
            assert not validator.fast_ok(message) and not validator.reference_ok(message), data
    fine = {"message_type": "task_submit", "message_id": "1", "sender_id": "c",
            "data": {"task": {"task_type": "echo", "timeout": 2.5}, "wait": 1}}
    assert validator.fast_ok(fine) and validator.reference_ok(fine)
