"""Errors of the wire protocol, one class per error code.

Each error carries the reply it turns into: ``code`` is the wire code sent in
``error.data.code`` and ``str(error)`` is the sentence a person can act on.
``close`` says whether the connection must be closed after the reply (framing
is lost, or the peer must not be served any longer).

The tree::

    ProtocolError                      base; never raised itself
     +-- RemoteProtocolError           the peer did it: reply, carry on
     |    +-- InvalidJSON              invalid_json
     |    +-- FrameTooLarge            frame_too_large (closes)
     |    +-- InvalidMessage           invalid_message (with .path)
     |    +-- UnknownMessageType       unknown_message_type
     |    +-- Unauthorized             unauthorized
     |    +-- NotRegistered            not_registered
     |    +-- Forbidden                forbidden
     |    +-- NotFound                 not_found
     |    +-- Conflict                 conflict
     |    +-- Overloaded               overloaded
     +-- InternalError                 internal: we did it; no details on the wire
    LocalProtocolError                 a bug on our side (raised, never sent)

Clients turn an ``error`` reply back into the same class with
:func:`error_from_code`, so ``except NotFound:`` works on both sides.
"""

from __future__ import annotations

from typing import ClassVar, Iterable

__all__ = [
    "ERROR_CODES",
    "Conflict",
    "Forbidden",
    "FrameTooLarge",
    "InternalError",
    "InvalidJSON",
    "InvalidMessage",
    "LocalProtocolError",
    "NotFound",
    "NotRegistered",
    "Overloaded",
    "ProtocolError",
    "RemoteProtocolError",
    "Unauthorized",
    "UnknownMessageType",
    "did_you_mean",
    "error_from_code",
]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'X'? "`` for the choice closest to a mistyped ``word``, or ``""`` when none is close.

    For error sentences (an unknown message type, setting or task type). difflib is imported only
    here, on an error: the worker imports this module, and keeps what it loads at start small.
    """
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class ProtocolError(Exception):
    """An error that has a wire code. Subclasses set ``code``."""

    code: ClassVar[str] = "internal"
    close: ClassVar[bool] = False

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def to_data(self) -> dict[str, object]:
        """Return the ``data`` of the ``error`` reply (without original_message_id)."""
        data: dict[str, object] = {"code": self.code, "error": self.message}
        if self.path is not None:
            data["path"] = self.path
        return data


class RemoteProtocolError(ProtocolError):
    """The peer sent something we refuse; answered with an ``error`` reply."""


class InvalidJSON(RemoteProtocolError):
    code = "invalid_json"


class FrameTooLarge(RemoteProtocolError):
    code = "frame_too_large"
    close = True
    #: Complete frames that arrived before the oversized one (set by FrameDecoder).
    frames: list[bytes] = []


class InvalidMessage(RemoteProtocolError):
    code = "invalid_message"


class UnknownMessageType(RemoteProtocolError):
    code = "unknown_message_type"


class Unauthorized(RemoteProtocolError):
    code = "unauthorized"


class NotRegistered(RemoteProtocolError):
    code = "not_registered"


class Forbidden(RemoteProtocolError):
    code = "forbidden"


class NotFound(RemoteProtocolError):
    code = "not_found"


class Conflict(RemoteProtocolError):
    code = "conflict"


class Overloaded(RemoteProtocolError):
    code = "overloaded"


class InternalError(ProtocolError):
    """Something failed on our side. The wire gets a generic sentence only."""

    code = "internal"


class LocalProtocolError(Exception):
    """We tried to send something the protocol forbids: a bug, never sent."""


ERROR_CODES: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        InvalidJSON,
        FrameTooLarge,
        InvalidMessage,
        UnknownMessageType,
        Unauthorized,
        NotRegistered,
        Forbidden,
        NotFound,
        Conflict,
        Overloaded,
        InternalError,
    )
}


def error_from_code(code: str, message: str, *, path: str | None = None) -> ProtocolError:
    """Build the exception matching a wire ``error`` reply.

    Unknown codes (a newer main node) become :class:`InternalError` so callers
    can always catch :class:`ProtocolError`.
    """
    cls = ERROR_CODES.get(code, InternalError)
    return cls(message, path=path)
