"""Frames decoded and checked in one C call each (msgspec typed structs), for the express lane.

Heartbeats (:class:`HeartbeatGate`), and a task's submission, its worker's
accept and its result (:class:`TaskFrameGate`).

A device's heartbeat is the commonest frame the main node reads (one a
minute from every device, and a load test sends tens of thousands a second).
The general way costs about 9 us of Python for a heartbeat like our worker's:
strict JSON (``codec.loads``), then its schema (the compiled check). msgspec
decodes the frame straight into structs that carry the same bounds (1.5 us);
with the checks below the gate takes about 4 us (benchmarks/README.md).

This is a gate, not a second validator. :meth:`HeartbeatGate.vouch` answers
only when it is certain that the general path would accept the frame as a
heartbeat and read the same values from it; otherwise it returns None and the
frame goes the general way (which gives the exact error when there is one).
What it vouches for:

- strict JSON as ``codec.loads`` wants it: msgspec refuses what is not RFC 8259
  JSON; a frame with a backslash (an escape) is not vouched for, so no
  escaped character can hide (nor a control character in an id: JSON
  strings hold U+0000-U+001F only escaped, and a frame with U+007F is not
  vouched for either); integers are bounded to int64 by the types
  (``codec.loads`` takes them to 2**64 - 1); no key appears twice (the
  frame has as many colons as the decoded value encoded again: a repeated
  key, and any colon in the value it replaced, would leave more in the
  frame); and the nesting is at most four levels,
  which is all the types allow (the caller checks it against its limit);
- the schemas (``heartbeat.json`` with ``common.json``'s envelope): every
  field the frame may hold is typed with the schema's bounds, and a frame
  with any other field (the schema allows more in ``data``) is not vouched
  for. String lengths are counted in code points by both.

``tests/test_typed_gate.py`` checks, on generated frames good and bad, that
whatever the gate vouches for the general path accepts with the same values,
and that it vouches for the heartbeats our worker sends.

:class:`TaskFrameGate` does the same for the other frames of a task's round
trip: a ``task_submit``, and the two frames a worker sends for each task in
one write, its ``ack`` of the ``task_assign`` (the "accepted" reply) and its
``task_result`` (``task_submit.json``, ``ack.json``, ``task_result.json``, and
``common.json``'s ``priority`` and ``result``). It vouches only for the common
shapes: a submission with a flat ``payload`` (names to numbers, booleans,
strings and nulls) and no ``requirements``; an ack whose ``result`` is
``{"task_id": ...}`` (or absent); a result whose ``result`` object holds the
fields ``common.json`` names, with a flat ``metrics`` object. The strict JSON
checks are the heartbeat gate's. It answers with the frame's object as
``codec.loads`` makes it (orjson's), so the handlers get the same values.
``tests/test_typed_gate.py`` checks it as it checks the heartbeat gate.

msgspec is a main-node dependency; without it (a platform with no wheel)
there are no gates, and these frames take the rest of the express lane.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

try:
    import msgspec
    from msgspec import UNSET, Meta, Struct, UnsetType
except ImportError:  # pragma: no cover - msgspec is in install_requires
    msgspec = None  # type: ignore[assignment]
try:
    import orjson
except ImportError:  # pragma: no cover - orjson is in install_requires
    orjson = None  # type: ignore[assignment]

__all__ = ["HEARTBEAT_PREFIX", "MAX_NESTING", "TASK_FRAME_PREFIXES", "HeartbeatGate", "TaskFrameGate",
           "heartbeat_gate", "task_frame_gate"]

#: How our worker (and most encoders of a dict built in this order) start a heartbeat frame:
#: only frames that start so are offered to the gate.
HEARTBEAT_PREFIX = b'{"message_type":"heartbeat"'

#: How our clients start a task_submit, and our worker its ack of an assignment and its task_result:
#: the frames offered to TaskFrameGate.
TASK_FRAME_PREFIXES = (b'{"message_type":"task_submit"', b'{"message_type":"ack"', b'{"message_type":"task_result"')

#: What Handlers.beat reads from a heartbeat's data (vouch() hands on those the frame has).
_BEAT_READS = ("system_metrics", "accepting", "reason")

#: The deepest a frame the gate vouches for nests (frame, data, system_metrics, a list).
MAX_NESTING = 4

#: The integers vouched for: int64 (msgspec bounds no wider). codec.loads takes uint64 too;
#: a frame with an integer above 2**63 - 1 goes the general way.
_INT64 = (-(2**63), 2**63 - 1)

if msgspec is not None:
    # common.json: an id is 1-128 characters, none of them a control character. JSON has
    # U+0000-U+001F in a string only escaped, and vouch() takes no escape and no U+007F.
    _Id = Annotated[str, Meta(min_length=1, max_length=128)]
    _Int64 = Annotated[int, Meta(ge=_INT64[0], le=_INT64[1])]
    _Str256 = Annotated[str, Meta(max_length=256)]
    # heartbeat.json's system_metrics: at most 32 names of at most 64 characters, each a number,
    # a boolean, null, a string of at most 256 characters, or at most 16 numbers or nulls.
    _Metric = Union[_Int64, float, bool, None, _Str256,
                    Annotated[list[Union[_Int64, float, None]], Meta(max_length=16)]]
    _Metrics = Annotated[dict[Annotated[str, Meta(max_length=64)], _Metric], Meta(max_length=32)]

    class _Data(Struct, forbid_unknown_fields=True):
        system_metrics: Union[_Metrics, UnsetType] = UNSET
        status: Union[_Str256, UnsetType] = UNSET
        active_tasks: Union[Annotated[int, Meta(ge=0, le=_INT64[1])], UnsetType] = UNSET
        last_activity: Union[str, None, UnsetType] = UNSET
        accepting: Union[bool, UnsetType] = UNSET
        reason: Union[_Str256, None, UnsetType] = UNSET

    class _Envelope(Struct, forbid_unknown_fields=True, kw_only=True):
        """common.json's envelope but for message_type and data, which each frame's struct types."""

        message_id: _Id
        sender_id: _Id
        target_id: Union[_Id, UnsetType] = UNSET
        timestamp: Union[Annotated[str, Meta(max_length=64)], UnsetType] = UNSET
        auth_token: Union[Annotated[str, Meta(max_length=256)], UnsetType] = UNSET

    class _Heartbeat(_Envelope, kw_only=True):
        message_type: Literal["heartbeat"]
        data: _Data

    # ack.json: original_message_id a string or null, result anything (vouched for in the shape of
    # our worker's "accepted" reply only).
    class _AckResult(Struct, forbid_unknown_fields=True):
        task_id: str

    class _AckData(Struct, forbid_unknown_fields=True):
        original_message_id: Union[str, None]
        result: Union[_AckResult, UnsetType] = UNSET

    class _Ack(_Envelope, kw_only=True, tag_field="message_type", tag="ack"):
        data: _AckData

    # common.json's result: these fields typed as it types them (more are allowed there, and go the
    # general way here); metrics, any object there, vouched for when flat.
    _Scalar = Union[_Int64, float, bool, None, str]

    class _Result(Struct, forbid_unknown_fields=True):
        output: Union[str, None, UnsetType] = UNSET
        exit_code: Union[_Int64, None, UnsetType] = UNSET
        stderr: Union[str, None, UnsetType] = UNSET
        truncated: Union[bool, UnsetType] = UNSET
        error: Union[str, None, UnsetType] = UNSET
        metrics: Union[dict[str, _Scalar], UnsetType] = UNSET
        fault: Union[Literal["device", "task"], UnsetType] = UNSET

    # task_result.json
    class _ResultData(Struct, forbid_unknown_fields=True):
        task_id: Annotated[str, Meta(min_length=1, max_length=128)]
        attempt: Annotated[int, Meta(ge=1, le=_INT64[1])]
        status: Literal["completed", "failed", "cancelled", "timeout"]
        execution_time: Union[Annotated[int, Meta(ge=0, le=_INT64[1])], Annotated[float, Meta(ge=0)],
                              UnsetType] = UNSET
        result: Union[_Result, UnsetType] = UNSET

    # task_submit.json, with a flat payload and no requirements (common.json's priority).
    class _Task(Struct, forbid_unknown_fields=True):
        task_type: Annotated[str, Meta(min_length=1, max_length=64)]
        payload: Union[dict[str, _Scalar], UnsetType] = UNSET
        priority: Union[Annotated[int, Meta(ge=0, le=100)], Literal["low", "normal", "high", "urgent"],
                        UnsetType] = UNSET
        timeout: Union[Annotated[int, Meta(gt=0, le=31536000)], Annotated[float, Meta(gt=0, le=31536000)],
                       UnsetType] = UNSET
        max_retries: Union[Annotated[int, Meta(ge=0, le=100)], UnsetType] = UNSET
        retry_on_timeout: Union[bool, UnsetType] = UNSET
        idempotency_key: Union[_Id, UnsetType] = UNSET

    class _SubmitData(Struct, forbid_unknown_fields=True):
        task: _Task
        wait: Union[Annotated[int, Meta(gt=0, le=3600)], Annotated[float, Meta(gt=0, le=3600)], UnsetType] = UNSET

    class _TaskSubmit(_Envelope, kw_only=True, tag_field="message_type", tag="task_submit"):
        data: _SubmitData

    class _TaskResult(_Envelope, kw_only=True, tag_field="message_type", tag="task_result"):
        data: _ResultData


class _Gate:
    """Decodes a frame into typed structs and checks what the structs cannot (see the module docstring)."""

    def __init__(self, kind: Any) -> None:
        assert msgspec is not None
        self._decode = msgspec.json.Decoder(kind).decode
        self._encode = msgspec.json.Encoder().encode
        self._error = msgspec.DecodeError

    def _checked(self, frame: bytes) -> Any:
        """The frame decoded into the gate's structs when the general path would take it as it is, else None."""
        if frame.find(b"\\") >= 0 or frame.find(b"\x7f") >= 0:  # not `in`: see codec.loads
            return None
        try:
            value = self._decode(frame)
        except self._error:
            return None
        if frame.count(b":") != self._encode(value).count(b":"):
            return None  # a key given twice (msgspec keeps the last)
        return value


class HeartbeatGate(_Gate):
    """Decodes a heartbeat frame and vouches for it, or says nothing (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(_Heartbeat)

    def vouch(self, frame: bytes) -> tuple[str, str, dict[str, Any]] | None:
        """``(message_id, sender_id, data)`` of a heartbeat the general path would take as it is, or None.

        ``frame`` is one frame without its newline. ``data`` holds what
        ``Handlers.beat`` reads: ``system_metrics``, ``accepting`` and
        ``reason``, each when the frame has it.
        """
        beat = self._checked(frame)
        if beat is None:
            return None
        fields = beat.data
        data = {name: value for name in _BEAT_READS if (value := getattr(fields, name)) is not UNSET}
        return beat.message_id, beat.sender_id, data


class TaskFrameGate(_Gate):
    """Vouches for a task_submit, or a worker's ack of an assignment or task_result, or says nothing (module docstring)."""

    def __init__(self) -> None:
        super().__init__(Union[_TaskSubmit, _Ack, _TaskResult])
        self._loads = orjson.loads

    def vouch(self, frame: bytes) -> dict[str, Any] | None:
        """The frame's object as ``codec.loads`` makes it, if the general path would take it as it is; else None.

        ``frame`` is one frame without its newline.
        """
        return None if self._checked(frame) is None else self._loads(frame)


def heartbeat_gate() -> HeartbeatGate | None:
    """The gate, or None without msgspec."""
    return HeartbeatGate() if msgspec is not None else None


def task_frame_gate() -> TaskFrameGate | None:
    """The gate, or None without msgspec (or orjson)."""
    return TaskFrameGate() if msgspec is not None and orjson is not None else None
