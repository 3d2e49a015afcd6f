"""Bytes to messages and back, without sockets.

:class:`MessageStream` is the whole receive side: ``feed(data)`` returns the
events the bytes completed, each a :class:`Message` or a :class:`BadFrame`
(the frame was refused; answer it with ``bad.error`` and close when
``bad.error.close``). ``encode(message)`` gives the bytes to send. JSON goes
through orjson when it is importable and the standard library otherwise, with
the same results either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import FrameTooLarge, InvalidJSON, InvalidMessage, RemoteProtocolError
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder
from .messages import Message

try:  # pragma: no cover - which branch runs depends on the machine
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

__all__ = ["BadFrame", "Event", "MessageStream", "decode_message", "dumps", "encode", "loads"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


if _orjson is not None:
    _orjson_loads = _orjson.loads
    _orjson_dumps = _orjson.dumps

    def loads(data: bytes | str) -> Any:
        """Parse JSON text. Raises ValueError on anything that is not strict JSON."""
        return _orjson_loads(data)

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

    _json_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
    _json_encoder = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )

    def loads(data: bytes | str) -> Any:
        """Parse JSON text. Raises ValueError on anything that is not strict JSON."""
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("utf-8")
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


def encode(message: Message) -> bytes:
    """The frame for ``message``: its JSON and a newline."""
    return dumps(message.to_wire()) + b"\n"


_OPTIONAL_STR_FIELDS = ("target_id", "timestamp", "auth_token")
_ENVELOPE_FIELDS = frozenset(
    {"message_type", "message_id", "sender_id", "data", *_OPTIONAL_STR_FIELDS}
)


def decode_message(frame: bytes) -> Message:
    """Parse one frame into a :class:`Message`, checking the envelope only.

    The ``data`` content is checked by the validator of its message type.

    Raises:
        InvalidJSON: the frame is not JSON.
        InvalidMessage: the JSON is not an envelope (``path`` names the field).
    """
    try:
        obj = loads(frame)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidJSON(
            "Frame is not valid JSON; send one JSON object per line, UTF-8 encoded."
        ) from None
    if not isinstance(obj, dict):
        raise InvalidMessage("A frame must be a JSON object.", path="$")
    mtype = obj.get("message_type")
    if not isinstance(mtype, str) or not mtype:
        raise InvalidMessage("message_type is missing or not a string.", path="$.message_type")
    mid = obj.get("message_id")
    if not isinstance(mid, str) or not mid:
        raise InvalidMessage("message_id is missing or not a string.", path="$.message_id")
    sender = obj.get("sender_id")
    if not isinstance(sender, str) or not sender:
        raise InvalidMessage("sender_id is missing or not a string.", path="$.sender_id")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise InvalidMessage("data must be a JSON object.", path="$.data")
    for name in _OPTIONAL_STR_FIELDS:
        if name in obj and not isinstance(obj[name], str):
            raise InvalidMessage(f"{name} must be a string when present.", path=f"$.{name}")
    for key in obj:
        if key not in _ENVELOPE_FIELDS:
            raise InvalidMessage(
                f"Unknown envelope field {key!r}; put message content inside data.", path=f"$.{key}"
            )
    return Message(
        message_type=mtype,
        message_id=mid,
        sender_id=sender,
        data=data,
        target_id=obj.get("target_id"),
        timestamp=obj.get("timestamp"),
        auth_token=obj.get("auth_token"),
    )


def _envelope_hints(frame: bytes) -> tuple[str | None, str | None]:
    """Best effort, for a refused frame: its ``message_id`` and ``auth_token``."""
    try:
        obj = loads(frame)
    except (ValueError, UnicodeDecodeError, RecursionError):
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
            that also validates).
    """

    __slots__ = ("_decode", "closed", "decoder")

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        decode: Callable[[bytes], Message] = decode_message,
    ) -> None:
        self.decoder = FrameDecoder(max_frame_bytes)
        self._decode = decode
        self.closed = False

    @property
    def max_frame_bytes(self) -> int:
        return self.decoder.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self.decoder.max_frame_bytes = value

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes (``b""`` at end of input); return completed events.

        After a :class:`FrameTooLarge` event the stream is closed and further
        calls return nothing.
        """
        if self.closed:
            return []
        too_large: FrameTooLarge | None = None
        try:
            frames = self.decoder.feed(data)
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
                events.append(BadFrame(err, *_envelope_hints(frame)))
        if too_large is not None:
            events.append(BadFrame(too_large))
        return events

