"""Newline-delimited framing with a bounded buffer.

Theory of operation: bytes arrive in arbitrary pieces. :class:`FrameDecoder`
keeps at most ``max_frame_bytes`` of an unfinished frame; the moment a frame
would exceed that (terminated or not) it raises :class:`FrameTooLarge` and is
dead from then on, because after an oversized frame we no longer know where the
next one starts and must never resynchronise in the middle of it. Empty lines
are skipped. ``feed(b"")`` signals end of input; an unterminated last frame is
returned then, so a one-shot script that forgets the final newline still works.
"""

from __future__ import annotations

from .errors import FrameTooLarge, LocalProtocolError

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "FrameDecoder"]

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


class FrameDecoder:
    """Split a byte stream into frames (without their trailing newline).

    Args:
        max_frame_bytes: the largest frame accepted, newline excluded.
    """

    __slots__ = ("_buf", "_scan_from", "broken", "eof", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._scan_from = 0
        self.broken = False
        self.eof = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an unfinished frame held right now."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes and return every frame they complete.

        Pass ``b""`` at end of input. Raises :class:`FrameTooLarge` when a frame
        exceeds ``max_frame_bytes``; the frames completed before it in the same
        call are on the exception as ``frames`` (answer them, then close).
        """
        if self.broken:
            raise LocalProtocolError("feed() after FrameTooLarge; close the connection")
        if self.eof:
            raise LocalProtocolError("feed() after end of input")
        frames: list[bytes] = []
        if not data:
            self.eof = True
            rest = bytes(self._buf).strip()
            self._buf.clear()
            if rest:
                frames.append(rest)
            return frames
        buf = self._buf
        buf += data
        start = 0
        scan = self._scan_from
        limit = self.max_frame_bytes
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            if nl - start > limit:
                self._fail(frames)
            frame = bytes(buf[start:nl])
            if frame.endswith(b"\r"):
                frame = frame[:-1]
            if frame.strip():
                frames.append(frame)
            start = nl + 1
            scan = start
        if start:
            del buf[:start]
        if len(buf) > limit:
            self._fail(frames)
        self._scan_from = len(buf)
        return frames

    def _fail(self, frames: list[bytes]) -> None:
        self.broken = True
        self._buf = bytearray()
        exc = FrameTooLarge(
            f"Frame larger than {self.max_frame_bytes} bytes; send smaller messages "
            "(the connection is closed)."
        )
        exc.frames = frames
        raise exc
