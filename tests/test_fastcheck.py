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


#: Keywords and shapes the message schemas do not all use, each checked against jsonschema.
SYNTHETIC = {
    "$id": "https://x/syn.json",
    "$defs": {
        "tree": {"type": "object", "required": ["v"], "additionalProperties": False,
                 "properties": {"v": {"type": "integer", "minimum": 0, "exclusiveMaximum": 10},
                                "kids": {"type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/tree"}}}},
        "word": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
    },
    "type": "object",
    "properties": {
        "tree": {"$ref": "#/$defs/tree"},
        "any": {"anyOf": [{"$ref": "#/$defs/word"}, {"type": "number", "maximum": 3.5}]},
        "one": {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 2}]},
        "not": {"not": {"type": "array", "minItems": 2}},
        "enum": {"enum": [1, "a", None, [1, 2], {"k": True}, False]},
        "const": {"const": {"a": [1, 2.0]}},
        "extra": {"type": "object", "additionalProperties": {"$ref": "#/$defs/word"}, "properties": {"n": {"type": "null"}}},
        "untyped": {"minLength": 2, "maxItems": 1, "minimum": -1, "required": ["x"], "items": {"type": "boolean"}},
        "all": {"allOf": [{"type": ["integer", "string"]}, {"not": {"const": 7}}, {"maximum": 100}]},
        "sized": {"type": "object", "minProperties": 1, "maxProperties": 2, "propertyNames": {"maxLength": 1},
                  "additionalProperties": {"type": ["number", "array"], "maxItems": 2}},
        "named": {"propertyNames": {"pattern": "^[a-z]+$"}},
    },
}
_leaf = (st.none() | st.booleans() | st.integers(-3, 12) | st.sampled_from([1.0, 2.5, 3.5, 4.0, -0.5, 7.0, 1e300])
         | st.sampled_from(["", "a", "ab", "abcdef", "A", "x y", "hello"]))
_values = st.recursive(_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(["v", "kids", "x", "k", "a", "n", "w", "ab", "Up"]), c, max_size=3), max_leaves=10)
_trees = st.recursive(st.fixed_dictionaries({"v": st.integers(-1, 11)}),
                      lambda c: st.fixed_dictionaries({"v": st.integers(0, 9), "kids": st.lists(c, max_size=4)}),
                      max_leaves=8)


@settings(max_examples=600, deadline=None)
@given(value=st.dictionaries(st.sampled_from(sorted(SYNTHETIC["properties"])), _values | _trees, max_size=4))
def test_synthetic_schema_same_verdict(value: dict) -> None:
    """Recursion, anyOf/oneOf/not, enum and const of any JSON value, untyped keywords: as jsonschema says."""
    from jsonschema import Draft202012Validator

    check = compile_schema(SYNTHETIC, {SYNTHETIC["$id"]: SYNTHETIC})
    assert check(value) == Draft202012Validator(SYNTHETIC).is_valid(value), value


def test_recursive_reference_and_deep_nesting() -> None:
    check = compile_schema(SYNTHETIC, {SYNTHETIC["$id"]: SYNTHETIC})
    tree: dict = {"v": 1}
    for _ in range(60):  # deeper than the inlined code goes: the recursive ref is a call
        tree = {"v": 2, "kids": [tree]}
    assert check({"tree": tree})
    tree["kids"][0]["kids"][0]["v"] = 10
    assert not check({"tree": tree})
    nested: dict = {"type": "integer"}
    for _ in range(40):  # past _MAX_INLINE_DEPTH of inline properties: compiles to calls
        nested = {"type": "object", "properties": {"a": nested}}
    deep = {"$id": "https://x/deep.json", **nested}
    value: object = 5
    for _ in range(40):
        value = {"a": value}
    assert compile_schema(deep, {deep["$id"]: deep})(value)
    assert "def " in compile_schema(deep, {deep["$id"]: deep}).__source__


@pytest.mark.parametrize("value", [
    {"one": 5}, {"one": 1}, {"one": 2.5}, {"one": 1.5}, {"one": "x"},      # oneOf: both, first, second, none
    {"enum": True}, {"enum": 1}, {"enum": 1.0}, {"enum": False}, {"enum": 0}, {"enum": [1, 2]}, {"enum": {"k": 1}},
    {"const": {"a": [1, 2]}}, {"const": {"a": [True, 2]}}, {"any": "abc"}, {"any": 4}, {"any": "ABC"},
    {"not": [1]}, {"not": [1, 2]}, {"not": "ab"}, {"all": 7}, {"all": 7.0}, {"all": "7"}, {"all": 101}, {"all": 2.5},
    {"extra": {"n": None, "w": "ab"}}, {"extra": {"w": "toolong"}}, {"extra": {"n": "ab"}},
    {"untyped": "a"}, {"untyped": [True, False]}, {"untyped": {"y": 1}}, {"untyped": -2}, {"untyped": True},
    {"sized": {}}, {"sized": {"a": 1}}, {"sized": {"a": 1, "b": [1]}}, {"sized": {"a": 1, "b": 2, "c": 3}},
    {"sized": {"ab": 1}}, {"sized": {"a": [1, 2, 3]}}, {"sized": {"a": "x"}}, {"named": {"ok": 1}}, {"named": {"No": 1}},
    {"named": "not an object"},
    {"tree": {"v": 9.0}}, {"tree": {"v": 10}}, {"tree": {"v": 1, "kids": [{"v": True}]}}, {"tree": {"v": 1, "x": 1}},
])
def test_synthetic_schema_edge_values(value: dict) -> None:
    from jsonschema import Draft202012Validator

    check = compile_schema(SYNTHETIC, {SYNTHETIC["$id"]: SYNTHETIC})
    assert check(value) == Draft202012Validator(SYNTHETIC).is_valid(value), value
