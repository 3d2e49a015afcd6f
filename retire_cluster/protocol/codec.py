"""Bytes to messages and back, without sockets.

:class:`MessageStream` is the whole receive side: ``feed(data)`` returns the
events the bytes completed, each a :class:`Message` or a :class:`BadFrame`
(the frame was refused; answer it with ``bad.error`` and close when
``bad.error.close``). ``encode(message)`` gives the bytes to send. JSON goes
through orjson when it is importable and the standard library otherwise, with
the same results either way.

Strict JSON: :func:`loads` refuses what RFC 8259 leaves to the parser and a
hostile peer could use to confuse one: NaN and Infinity, numbers that overflow
a double, integers outside the 64-bit range (orjson would silently turn them
into floats, the standard library would not), lone surrogates, invalid UTF-8,
duplicate keys in an object (two parsers may keep different values) and
nesting deeper than ``max_depth`` (32 by default). How the checks stay cheap on
the hot path:

- One ``translate`` gives the frame's shape (digits as ``0``, both openers as
  ``[``, colons and backslashes kept, the rest ``x``); counts and searches of
  it serve every check below.
- Depth is checked on the bytes *before* parsing, so no parser ever recurses
  deeper than ``max_depth``. A frame with at most ``max_depth`` ``[`` and ``{``
  bytes in total cannot be deeper (one ``count`` of the shape). Otherwise
  escapes and strings are cut out and the running depth
  before each closing bracket is computed with ``split`` and
  ``itertools.accumulate``: linear and in C, at worst 2-3 times the cost of
  orjson's own parse of the frame.
- Duplicate keys: orjson keeps the last value silently. Every key is followed
  by one ``:``; the parsed object re-serialised by orjson holds each kept key's
  ``:`` and every ``:`` inside kept strings, so it has fewer ``:`` than the
  frame exactly when a key was dropped. One ``orjson.dumps`` and two counts,
  instead of re-parsing every frame with ``object_pairs_hook`` (about 4x the
  cost of the parse). A ``\\u003a`` escape (``:``) would add a colon and could
  mask a dropped key, so frames containing ``\\u003`` are checked exactly
  with the standard library's ``object_pairs_hook``. The standard-library
  backend always uses ``object_pairs_hook``.
- Integers: a run of 19 or more digits (one ``in`` on the shape)
  sends the frame to that same exact check, which refuses integers outside
  [-2**63, 2**64 - 1]; the standard-library backend checks every integer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, count
from operator import sub
from typing import Any, Callable, Union

from .errors import FrameTooLarge, InvalidJSON, InvalidMessage, RemoteProtocolError
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder
from .messages import Message, new_message_id

try:  # pragma: no cover - which branch runs depends on the machine
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "BadFrame",
    "DuplicateKey",
    "Event",
    "MessageStream",
    "NestingTooDeep",
    "decode_message",
    "dumps",
    "encode",
    "encode_ack",
    "encode_frame",
    "loads",
]

#: The deepest nesting of arrays and objects accepted; the frame itself is level 1.
DEFAULT_MAX_DEPTH = 32


class NestingTooDeep(ValueError):
    """The JSON nests arrays and objects deeper than allowed (checked before parsing)."""


class DuplicateKey(ValueError):
    """A JSON object has the same key twice."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Integers outside this range would come out of orjson as (inexact) floats.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _int64(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"integer {text[:30]} is outside the 64-bit range")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKey("a JSON object has the same key twice")
    return obj


#: Brackets of both kinds become ( and ); everything else is deleted.
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
#: The frame's shape in one pass: digits become 0, both openers [, and everything but : and
#: backslashes x. Then counts and searches of it give the openers, colons, escapes, and
#: runs of 19 digits (a number that may overflow 64 bits).
_SHAPE = bytes.maketrans(
    bytes(range(256)),
    bytes(48 if 48 <= b <= 57 else 91 if b in b"[{" else b if b in b":\\" else 120 for b in range(256)),
)
_LONG_NUMBER = b"0" * 19


def _nesting_ok(data: bytes, max_depth: int) -> bool:
    """Whether ``data`` nests at most ``max_depth`` deep, without parsing it.

    Call it only when ``data`` holds more than ``max_depth`` opening brackets
    (otherwise the answer is yes). Brackets inside strings do not count. The
    depth found is the deepest any parser reading ``data`` from the start can
    get, even when ``data`` is not JSON (unbalanced, cut short).
    """
    if b"\\" in data:
        # Escapes first, left to right as a parser reads them: \\ then \".
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _NOT_STRUCTURE)  # only [ ] { } and "
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])  # drop what is inside strings
    # Between two closing brackets there are only openers: the depth just before
    # the i-th closer is (openers so far) - i. All of it runs in C.
    runs = structure.translate(_PARENS).split(b")")
    deepest: int = max(map(sub, accumulate(map(len, runs)), count()))
    return deepest <= max_depth


_TOO_DEEP = "JSON nested deeper than {} levels"

if _orjson is not None:
    _orjson_loads = _orjson.loads
    _orjson_dumps = _orjson.dumps
    _exact_decoder = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_int=_int64)

    def loads(data: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
        """Parse strict JSON text (see the module docstring).

        Raises:
            NestingTooDeep: deeper than ``max_depth``.
            DuplicateKey: an object has a key twice.
            ValueError: anything else that is not strict JSON, including
                integers outside the 64-bit range.
        """
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        shape = data.translate(_SHAPE)
        if shape.count(b"[") > max_depth and not _nesting_ok(data, max_depth):
            raise NestingTooDeep(_TOO_DEEP.format(max_depth))
        obj = _orjson_loads(data)
        # find() rather than `in`: `needle in data` first tries the needle as an integer
        # (a byte value) and formats the TypeError it then clears, about 1,700 instructions each.
        if (shape.find(b"\\") >= 0 and data.find(b"\\u003") >= 0) or shape.find(_LONG_NUMBER) >= 0:
            # Rare: an escaped colon, or a number orjson may have turned into a float.
            _exact_decoder.decode(data.decode("utf-8"))
        else:
            colons = shape.count(b":")
            if colons and _orjson_dumps(obj).count(b":") != colons:
                raise DuplicateKey("a JSON object has the same key twice")
        return obj

    def dumps(obj: Any) -> bytes:
        """Serialise to compact UTF-8 JSON bytes."""
        return _orjson_dumps(obj)

else:  # pragma: no cover - exercised by the stdlib-only worker test
    import math

    _JSON_SPACE = " \t\r\n"

    def _finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        return value

    _json_decoder = json.JSONDecoder(
        parse_constant=_reject_constant,
        parse_float=_finite,
        parse_int=_int64,
        object_pairs_hook=_unique_pairs,
    )
    _json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def loads(data: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
        """Parse strict JSON text (see the module docstring).

        Raises:
            NestingTooDeep: deeper than ``max_depth`` (checked before parsing,
                so the recursive parser stays within ``max_depth`` levels).
            DuplicateKey: an object has a key twice.
            ValueError: anything else that is not strict JSON.
        """
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        if raw.count(b"[") + raw.count(b"{") > max_depth and not _nesting_ok(raw, max_depth):
            raise NestingTooDeep(_TOO_DEEP.format(max_depth))
        data = raw.decode("utf-8")
        text = data.strip(_JSON_SPACE)
        obj, end = _json_decoder.raw_decode(text)
        if end != len(text):
            raise ValueError("extra data after the JSON value")
        if "\\u" in text:  # only escapes can smuggle in lone surrogates
            _json_encoder.encode(obj).encode("utf-8")  # raises UnicodeEncodeError on one
        return obj

    def dumps(obj: Any) -> bytes:
        """Serialise to compact UTF-8 JSON bytes."""
        return _json_encoder.encode(obj).encode("utf-8")


#: The main node's ``ack`` frame with its fixed parts written once (the key order of encode()).
_MAIN_ACK = (b'{"message_type":"ack","message_id":"%s","sender_id":"main-node","data":{"original_message_id":%s,'
             b'"result":%s},"timestamp":"%s"}\n')


def encode_ack(original_message_id: str | None, result: Any, timestamp: str | None,
               sender_id: str = "main-node") -> bytes:
    """The ``ack`` frame, built without a Message object (the main node's commonest reply).

    The main node's own acks (``sender_id`` main-node, with a timestamp) fill a
    byte template: the message id and timestamp are ours and ASCII, and only
    the original id and the result are serialised.
    """
    if sender_id == "main-node" and timestamp is not None:
        return _MAIN_ACK % (new_message_id().encode(), dumps(original_message_id),
                            dumps({} if result is None else result), timestamp.encode())  # fmt: skip
    frame: dict[str, Any] = {
        "message_type": "ack",
        "message_id": new_message_id(),
        "sender_id": sender_id,
        "data": {"original_message_id": original_message_id, "result": {} if result is None else result},
    }
    if timestamp is not None:
        frame["timestamp"] = timestamp
    return dumps(frame) + b"\n"


def encode(message: Message) -> bytes:
    """The frame for ``message``: its JSON and a newline."""
    return dumps(message.to_wire()) + b"\n"


def encode_frame(message_type: str, message_id: str, sender_id: str, data: dict[str, Any], *,
                 target_id: str | None = None, timestamp: str | None = None,
                 auth_token: str | None = None) -> bytes:
    """The bytes ``encode(Message(...))`` makes of these fields, without the frozen Message.

    For the frames of a task's round trip: building a Message (a setattr per
    field) cost more than encoding it.
    """
    frame: dict[str, Any] = {"message_type": message_type, "message_id": message_id, "sender_id": sender_id,
                             "data": data}
    if target_id is not None:
        frame["target_id"] = target_id
    if timestamp is not None:
        frame["timestamp"] = timestamp
    if auth_token is not None:
        frame["auth_token"] = auth_token
    return dumps(frame) + b"\n"


_new_object = object.__new__
_OPTIONAL_STR_FIELDS = ("target_id", "timestamp", "auth_token")
_ENVELOPE_FIELDS = frozenset({"message_type", "message_id", "sender_id", "data", *_OPTIONAL_STR_FIELDS})


def _parse(frame: bytes, max_depth: int) -> Any:
    try:
        return loads(frame, max_depth)
    except NestingTooDeep:
        raise InvalidJSON(f"JSON nested deeper than {max_depth} levels; flatten the message.") from None
    except DuplicateKey:
        raise InvalidJSON("A JSON object in the frame has the same key twice; send each key once.") from None
    except ValueError:  # includes UnicodeDecodeError and orjson's JSONDecodeError
        raise InvalidJSON("Frame is not valid JSON; send one JSON object per line, UTF-8 encoded.") from None


def decode_message(frame: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Message:
    """Parse one frame into a :class:`Message`, checking the envelope only.

    The ``data`` content is checked by the validator of its message type.

    Raises:
        InvalidJSON: the frame is not strict JSON (see :func:`loads`), or nests
            deeper than ``max_depth``.
        InvalidMessage: the JSON is not an envelope (``path`` names the field).
    """
    obj = _parse(frame, max_depth)
    if not isinstance(obj, dict):
        raise InvalidMessage("A frame must be a JSON object.", path="$")
    get = obj.get
    mtype = get("message_type")
    if not isinstance(mtype, str) or not mtype:
        raise InvalidMessage("message_type is missing or not a string.", path="$.message_type")
    mid = get("message_id")
    if not isinstance(mid, str) or not mid:
        raise InvalidMessage("message_id is missing or not a string.", path="$.message_id")
    sender = get("sender_id")
    if not isinstance(sender, str) or not sender:
        raise InvalidMessage("sender_id is missing or not a string.", path="$.sender_id")
    data = get("data", {})
    if not isinstance(data, dict):
        raise InvalidMessage("data must be a JSON object.", path="$.data")
    if len(obj) > 4 or "data" not in obj:  # some optional or unknown field is there
        for name in _OPTIONAL_STR_FIELDS:
            if name in obj and not isinstance(obj[name], str):
                raise InvalidMessage(f"{name} must be a string when present.", path=f"$.{name}")
        if not _ENVELOPE_FIELDS.issuperset(obj):
            key = next(k for k in obj if k not in _ENVELOPE_FIELDS)
            raise InvalidMessage(
                f"Unknown envelope field {key!r}; put message content inside data.", path=f"$.{key}"
            )
    # Message(...) without its frozen __init__ (a setattr call per field): a third of the cost.
    message: Message = _new_object(Message)
    message.__dict__.update(
        message_type=mtype,
        message_id=mid,
        sender_id=sender,
        data=data,
        target_id=get("target_id"),
        timestamp=get("timestamp"),
        auth_token=get("auth_token"),
    )
    return message


def _envelope_hints(frame: bytes, max_depth: int) -> tuple[str | None, str | None]:
    """Best effort, for a refused frame: its ``message_id`` and ``auth_token``."""
    try:
        obj = loads(frame, max_depth)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    mid, tok = obj.get("message_id"), obj.get("auth_token")
    return (mid if isinstance(mid, str) else None, tok if isinstance(tok, str) else None)


@dataclass(frozen=True)
class BadFrame:
    """A frame that was refused. Reply with ``error``; close if ``error.close``."""

    error: RemoteProtocolError
    message_id: str | None = None
    auth_token: str | None = None


Event = Union[Message, BadFrame]


class MessageStream:
    """Receive side of one connection: bytes in, messages out.

    Args:
        max_frame_bytes: frames larger than this end the stream with a
            :class:`BadFrame` carrying :class:`FrameTooLarge`.
        decode: the frame parser (tests and the main node may swap in one
            that also validates); by default :func:`decode_message` with
            ``max_depth``.
        max_depth: the deepest JSON nesting accepted (see :func:`loads`).
    """

    __slots__ = ("_decode", "closed", "decoder", "max_depth")

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        decode: Callable[[bytes], Message] | None = None,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.decoder = FrameDecoder(max_frame_bytes)
        self.max_depth = max_depth
        if decode is None:
            decode = partial(decode_message, max_depth=max_depth)
        self._decode = decode
        self.closed = False

    @property
    def max_frame_bytes(self) -> int:
        return self.decoder.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        """Takes effect from the next byte fed (e.g. larger once authenticated)."""
        self.decoder.max_frame_bytes = value

    def at_frame_end(self, data: bytes) -> bool:
        """Whether ``data`` is whole frames: no partial frame is held and ``data`` ends one.

        Such bytes may be split and decoded frame by frame without feeding them
        (the main node's express lane); whatever is not taken that way is fed.
        """
        return not self.closed and not self.decoder.buffered_bytes and data.endswith(b"\n")

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes (``b""`` at end of input); return completed events.

        After a :class:`FrameTooLarge` event the stream is closed and further
        calls return nothing.
        """
        if self.closed:
            return []
        too_large: FrameTooLarge | None = None
        decoder = self.decoder
        if (type(data) is bytes and data.endswith(b"\n") and not decoder.buffered_bytes
                and len(data) <= decoder.max_frame_bytes):
            # Whole frames, none of them too large (the commonest read): split at once, as the decoder would.
            frames = [f[:-1] if f.endswith(b"\r") else f for f in data.split(b"\n") if f.strip()]
        else:
            try:
                frames = decoder.feed(data)
            except FrameTooLarge as exc:
                self.closed = True
                frames, too_large = exc.frames, exc
        if not data:
            self.closed = True
        events: list[Event] = []
        decode = self._decode
        for frame in frames:
            try:
                events.append(decode(frame))
            except RemoteProtocolError as err:
                events.append(BadFrame(err, *_envelope_hints(frame, self.max_depth)))
        if too_large is not None:
            events.append(BadFrame(too_large))
        return events
