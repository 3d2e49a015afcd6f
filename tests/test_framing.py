"""FrameDecoder: newline framing with a bounded buffer (retire_cluster/protocol/framing.py)."""

from __future__ import annotations

from typing import Callable, List

import pytest

from retire_cluster.protocol.errors import FrameTooLarge, LocalProtocolError
from retire_cluster.protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder

MAX = 16


def whole(data: bytes) -> List[bytes]:
    return [data]


def byte_by_byte(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def in_threes(data: bytes) -> List[bytes]:
    return [data[i : i + 3] for i in range(0, len(data), 3)]


CHUNKINGS = [
    pytest.param(whole, id="whole"),
    pytest.param(byte_by_byte, id="byte_by_byte"),
    pytest.param(in_threes, id="in_threes"),
]

Chunker = Callable[[bytes], List[bytes]]


def feed_all(decoder: FrameDecoder, data: bytes, chunker: Chunker) -> List[bytes]:
    frames: List[bytes] = []
    for chunk in chunker(data):
        frames += decoder.feed(chunk)
        assert decoder.buffered_bytes <= decoder.max_frame_bytes
    return frames


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 1024 * 1024
    assert FrameDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_frames_whole_and_split(chunker: Chunker) -> None:
    decoder = FrameDecoder(MAX)
    data = b'{"a":1}\n{"b":2}\n{"c":3}\n'
    assert feed_all(decoder, data, chunker) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert decoder.buffered_bytes == 0
    assert decoder.feed(b"") == []


def test_trailing_partial_data_is_kept_for_the_next_feed() -> None:
    decoder = FrameDecoder(MAX)
    assert decoder.feed(b"one\ntw") == [b"one"]
    assert decoder.buffered_bytes == 2
    assert decoder.feed(b"o") == []
    assert decoder.feed(b"\nthree\nfo") == [b"two", b"three"]
    assert decoder.feed(b"ur\n") == [b"four"]
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_crlf_line_ends(chunker: Chunker) -> None:
    decoder = FrameDecoder(MAX)
    assert feed_all(decoder, b"a\r\nbb\r\nc\n", chunker) == [b"a", b"bb", b"c"]


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_empty_and_blank_lines_are_skipped(chunker: Chunker) -> None:
    decoder = FrameDecoder(MAX)
    data = b"\n\n\r\n \t \nx\n\n  y \n\r\n"
    # Blank lines vanish; a frame keeps its own surrounding blanks (JSON ignores them).
    assert feed_all(decoder, data, chunker) == [b"x", b"  y "]


def test_eof_returns_the_unterminated_last_frame() -> None:
    decoder = FrameDecoder(MAX)
    assert decoder.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert decoder.feed(b":2}") == []
    assert decoder.feed(b"") == [b'{"b":2}']
    assert decoder.eof
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("tail", [b"", b"\n", b"   ", b"\r\n\r\n", b"\n \t\n"])
def test_eof_without_a_pending_frame_returns_nothing(tail: bytes) -> None:
    decoder = FrameDecoder(MAX)
    assert decoder.feed(b"x\n" + tail) == [b"x"]
    assert decoder.feed(b"") == []


def test_feed_after_eof_raises() -> None:
    decoder = FrameDecoder(MAX)
    decoder.feed(b"")
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x\n")


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_frame_of_exactly_max_bytes_is_accepted(chunker: Chunker) -> None:
    decoder = FrameDecoder(MAX)
    frame = b"x" * MAX
    assert feed_all(decoder, frame + b"\n" + frame + b"\n", chunker) == [frame, frame]


def test_unterminated_frame_of_exactly_max_bytes_is_accepted_at_eof() -> None:
    decoder = FrameDecoder(MAX)
    frame = b"y" * MAX
    assert decoder.feed(frame) == []
    assert decoder.buffered_bytes == MAX
    assert decoder.feed(b"") == [frame]


def test_carriage_return_counts_towards_the_limit() -> None:
    # The limit applies to the bytes before "\n", so a CRLF frame may hold MAX - 1 bytes.
    assert FrameDecoder(MAX).feed(b"z" * (MAX - 1) + b"\r\n") == [b"z" * (MAX - 1)]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(MAX).feed(b"z" * MAX + b"\r\n")


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_terminated_frame_of_max_plus_one_is_refused(chunker: Chunker) -> None:
    decoder = FrameDecoder(MAX)
    with pytest.raises(FrameTooLarge) as info:
        feed_all(decoder, b"x" * (MAX + 1) + b"\n", chunker)
    assert info.value.code == "frame_too_large"
    assert info.value.close
    assert decoder.broken


@pytest.mark.parametrize("chunker", CHUNKINGS)
def test_unterminated_frame_of_max_plus_one_is_refused_without_waiting_for_newline(
    chunker: Chunker,
) -> None:
    decoder = FrameDecoder(MAX)
    with pytest.raises(FrameTooLarge):
        feed_all(decoder, b"x" * (MAX + 1), chunker)
    assert decoder.buffered_bytes == 0


def test_byte_by_byte_refusal_happens_at_byte_max_plus_one() -> None:
    decoder = FrameDecoder(MAX)
    for _ in range(MAX):
        assert decoder.feed(b"x") == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"x")


@pytest.mark.parametrize("terminated", [True, False], ids=["terminated", "unterminated"])
def test_big_frame_after_a_good_one_in_the_same_chunk_is_refused(terminated: bool) -> None:
    decoder = FrameDecoder(MAX)
    big = b"x" * (MAX + 1) + (b"\n" if terminated else b"")
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"good\n" + big)
    assert decoder.broken


def test_big_frame_after_a_good_one_in_an_earlier_chunk_is_refused() -> None:
    decoder = FrameDecoder(MAX)
    assert decoder.feed(b"good\nxx") == [b"good"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"x" * (MAX - 1))


@pytest.mark.parametrize("after", [b"ok\n", b"", b"x" * (MAX + 1)], ids=["frame", "eof", "big"])
def test_feed_after_failure_raises_local_protocol_error(after: bytes) -> None:
    decoder = FrameDecoder(MAX)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"x" * (MAX + 1))
    with pytest.raises(LocalProtocolError):
        decoder.feed(after)


@pytest.mark.parametrize("chunk", [
    b'{"a":1}\n',
    b'{"a":1}\r\n\n  \n{"b":2}\n',
    b"\r\n\n",
    b'{"a":1}\n{"b":"\\r"}\r\n' * 3,
    b'not json\n{"message_type":"x"}\n',
])
def test_a_read_of_whole_frames_splits_as_the_decoder_does(chunk: bytes) -> None:
    """MessageStream splits a bytes read that ends a frame (the commonest) without the decoder's buffer:
    the same events as the decoder's way (a memoryview read takes that way)."""
    from retire_cluster.protocol.codec import BadFrame, MessageStream

    def events(data: bytes | memoryview) -> list[object]:
        stream = MessageStream(max_frame_bytes=1024)
        got = stream.feed(b'{"message_type":"ping"')  # a partial frame first: the decoder's way
        got += stream.feed(b"}\n")
        got += stream.feed(data)  # nothing buffered now: bytes take the split
        return [(e.error.message if isinstance(e, BadFrame) else e) for e in got]

    assert events(chunk) == events(memoryview(chunk))
    stream = MessageStream(max_frame_bytes=8)
    assert isinstance(stream.feed(b'{"a":"0123456789"}\n')[-1], BadFrame)  # too large: the decoder says so
