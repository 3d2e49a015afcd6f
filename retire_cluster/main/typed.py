"""A heartbeat decoded and checked in one C call (msgspec typed structs), for the express lane.

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

msgspec is a main-node dependency; without it (a platform with no wheel)
there is no gate and heartbeats take the rest of the express lane.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

try:
    import msgspec
    from msgspec import UNSET, Meta, Struct, UnsetType
except ImportError:  # pragma: no cover - msgspec is in install_requires
    msgspec = None  # type: ignore[assignment]

__all__ = ["HEARTBEAT_PREFIX", "MAX_NESTING", "HeartbeatGate", "heartbeat_gate"]

#: How our worker (and most encoders of a dict built in this order) start a heartbeat frame:
#: only frames that start so are offered to the gate.
HEARTBEAT_PREFIX = b'{"message_type":"heartbeat"'

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

    class _Heartbeat(Struct, forbid_unknown_fields=True):
        message_type: Literal["heartbeat"]
        message_id: _Id
        sender_id: _Id
        data: _Data
        target_id: Union[_Id, UnsetType] = UNSET
        timestamp: Union[Annotated[str, Meta(max_length=64)], UnsetType] = UNSET
        auth_token: Union[Annotated[str, Meta(max_length=256)], UnsetType] = UNSET


class HeartbeatGate:
    """Decodes a heartbeat frame and vouches for it, or says nothing (see the module docstring)."""

    def __init__(self) -> None:
        assert msgspec is not None
        self._decode = msgspec.json.Decoder(_Heartbeat).decode
        self._encode = msgspec.json.Encoder().encode
        self._error = msgspec.DecodeError

    def vouch(self, frame: bytes) -> tuple[str, str, dict[str, Any]] | None:
        """``(message_id, sender_id, data)`` of a heartbeat the general path would take as it is, or None.

        ``frame`` is one frame without its newline. ``data`` holds what
        ``Handlers.beat`` reads: ``system_metrics``, ``accepting`` and
        ``reason``, each when the frame has it.
        """
        if b"\\" in frame or b"\x7f" in frame:
            return None
        try:
            beat = self._decode(frame)
        except self._error:
            return None
        if frame.count(b":") != self._encode(beat).count(b":"):
            return None  # a key given twice (msgspec keeps the last)
        fields = beat.data
        data = {name: value for name in _BEAT_READS if (value := getattr(fields, name)) is not UNSET}
        return beat.message_id, beat.sender_id, data


def heartbeat_gate() -> HeartbeatGate | None:
    """The gate, or None without msgspec."""
    return HeartbeatGate() if msgspec is not None else None
