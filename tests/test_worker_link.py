"""The worker's connection protocol: frames are handled in the callback that receives them."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any, List

import pytest

from retire_cluster.link import ClosedByMainNode, Link
from retire_cluster.protocol.errors import FrameTooLarge
from retire_cluster.protocol.messages import Message


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: List[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 8080)}.get(name, default)


def frame(message_type: str, n: int) -> bytes:
    return json.dumps({"message_type": message_type, "message_id": f"m-{n}", "sender_id": "main-node",
                       "data": {}}).encode() + b"\n"


def link_with(seen: List[Message], limit: int = 1 << 20) -> "tuple[Link, FakeTransport]":
    link = Link(seen.append, limit)
    transport = FakeTransport()
    link.connection_made(transport)
    return link, transport


async def test_frames_are_handled_as_they_arrive() -> None:
    seen: List[Message] = []
    link, _ = link_with(seen)
    data = frame("task_assign", 1) + frame("task_cancel", 2)
    link.data_received(data + frame("ack", 3)[:10])
    assert [m.message_type for m in seen] == ["task_assign", "task_cancel"]  # no loop pass needed
    link.data_received(frame("ack", 3)[10:])
    assert [m.message_id for m in seen] == ["m-1", "m-2", "m-3"]
    assert not link.closed.done()


async def test_the_end_of_the_connection_fails_closed() -> None:
    link, _ = link_with([])
    link.eof_received()
    with pytest.raises(ConnectionError, match="main node closed the connection"):
        await link.closed
    link.connection_lost(None)  # a second ending changes nothing


async def test_an_oversized_frame_ends_the_connection() -> None:
    link, transport = link_with([], limit=64)
    link.data_received(b"x" * 200)
    assert transport.aborted  # the stream cannot go on: reconnect at once, not after a request times out
    with pytest.raises(FrameTooLarge):
        await link.closed


async def test_a_handler_error_ends_the_connection() -> None:
    def broken(msg: Message) -> None:
        raise RuntimeError("bug")

    link = Link(broken, 1 << 20)
    transport = FakeTransport()
    link.connection_made(transport)
    link.data_received(frame("ack", 1))
    assert transport.aborted
    with pytest.raises(RuntimeError, match="bug"):
        await link.closed


async def test_drain_waits_while_writing_is_paused() -> None:
    link, transport = link_with([])
    link.write(b"abc")
    assert transport.written == [b"abc"]
    await link.drain()  # not paused: returns at once
    link.pause_writing()
    draining = asyncio.ensure_future(link.drain())
    await asyncio.sleep(0)
    assert not draining.done()
    link.resume_writing()
    await asyncio.wait_for(draining, 10)
    link.pause_writing()
    lost = asyncio.ensure_future(link.drain())
    await asyncio.sleep(0)
    link.connection_lost(None)
    with pytest.raises(ConnectionError):
        await lost
    transport.closing = True
    with pytest.raises(ConnectionError):
        await link.drain()
    assert link.get_extra_info("peername") == ("127.0.0.1", 8080)


async def test_an_error_sent_unasked_before_closing_is_the_reason() -> None:
    seen: List[Message] = []
    link, _ = link_with(seen)
    link.data_received(json.dumps({"message_type": "error", "message_id": "m-1", "sender_id": "main-node",
                                   "data": {"original_message_id": None, "code": "conflict",
                                            "error": "Another connection registered as device 'x'."}}).encode()
                       + b"\n")
    assert link.messages == 1 and seen[0].message_type == "error"
    link.eof_received()
    with pytest.raises(ClosedByMainNode, match="main node closed the connection: Another connection") as closed:
        await link.closed
    assert closed.value.code == "conflict"


async def test_a_reply_is_not_a_reason_to_close() -> None:
    link, _ = link_with([])
    link.data_received(json.dumps({"message_type": "error", "message_id": "m-1", "sender_id": "main-node",
                                   "data": {"original_message_id": "r1", "code": "conflict",
                                            "error": "The task already ended."}}).encode() + b"\n")
    link.connection_lost(None)
    with pytest.raises(ConnectionError) as closed:
        await link.closed
    assert not isinstance(closed.value, ClosedByMainNode)


async def test_an_end_nobody_waits_for_is_not_reported_as_never_retrieved() -> None:
    loop = asyncio.get_running_loop()
    complaints: List[Any] = []
    loop.set_exception_handler(lambda _loop, context: complaints.append(context))
    try:
        link, _ = link_with([])
        link.connection_lost(ConnectionResetError("reset"))
        del link
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert complaints == []


async def test_the_end_of_each_read_is_announced_after_its_frames() -> None:
    """on_read_end follows the frames of each chunk (none for a chunk with no whole frame)."""
    events: List[str] = []
    link = Link(lambda m: events.append(m.message_id), 1 << 20, on_read_end=lambda: events.append("end"))
    link.connection_made(FakeTransport())
    link.data_received(frame("task_assign", 1) + frame("task_cancel", 2) + frame("ack", 3)[:10])
    link.data_received(frame("ack", 3)[10:])
    assert events == ["m-1", "m-2", "end", "m-3", "end"]


async def test_the_end_of_a_read_is_announced_when_handling_a_frame_failed() -> None:
    """What earlier frames of the read queued is still flushed (the connection is aborted, so nothing is sent)."""
    ends: List[int] = []

    def handle(message: Message) -> None:
        raise RuntimeError("a bug")

    link = Link(handle, 1 << 20, on_read_end=lambda: ends.append(1))
    transport = FakeTransport()
    link.connection_made(transport)
    link.data_received(frame("task_assign", 1))
    assert ends == [1] and transport.aborted


async def test_reads_land_in_one_buffer_kept_for_the_connection() -> None:
    """The transport reads into the Link's own buffer: no new bytes object (256 KiB, mmapped) per read."""
    seen: List[Message] = []
    link, _ = link_with(seen)
    assert isinstance(link, asyncio.BufferedProtocol)
    buf = link.get_buffer(-1)
    data = frame("task_assign", 1) + frame("ack", 2)[:7]
    buf[:len(data)] = data
    link.buffer_updated(len(data))
    assert [m.message_id for m in seen] == ["m-1"]
    again = link.get_buffer(-1)
    assert again is buf  # the same memory every read
    rest = frame("ack", 2)[7:]
    again[:len(rest)] = rest
    link.buffer_updated(len(rest))
    assert [m.message_id for m in seen] == ["m-1", "m-2"]


async def test_a_frame_longer_than_the_read_buffer_arrives_whole_over_a_socket() -> None:
    """Over a real loopback connection: a frame several times the buffer's size takes several reads."""
    from retire_cluster.link import READ_BUFFER_BYTES

    seen: List[Message] = []
    got = asyncio.Event()

    def on_message(msg: Message) -> None:
        seen.append(msg)
        if len(seen) == 2:
            got.set()

    big = json.dumps({"message_type": "task_assign", "message_id": "m-big", "sender_id": "main-node",
                      "data": {"blob": "x" * (3 * READ_BUFFER_BYTES + 123)}}).encode() + b"\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(big + frame("ack", 2))
        await writer.drain()
        await reader.read()  # until the Link closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reads: List[int] = []
    loop = asyncio.get_running_loop()
    transport, link = await loop.create_connection(lambda: Link(on_message, 1 << 20), "127.0.0.1", port)
    real = link.buffer_updated

    def counting(nbytes: int) -> None:
        reads.append(nbytes)
        real(nbytes)

    link.buffer_updated = counting  # type: ignore[method-assign]
    await asyncio.wait_for(got.wait(), 10)
    assert seen[0].data["blob"] == "x" * (3 * READ_BUFFER_BYTES + 123)
    assert seen[1].message_id == "m-2"
    assert len(reads) >= 4 and max(reads) <= READ_BUFFER_BYTES
    transport.close()
    server.close()
    await server.wait_closed()


async def test_reading_is_set_while_a_reads_frames_are_handled() -> None:
    """The agent queues, without scheduling a flush, what it sends while ``reading``: the read's end writes it."""
    states: List[str] = []
    link: Link

    def on_message(msg: Message) -> None:
        states.append(f"{msg.message_id}:{link.reading}")

    def on_read_end() -> None:
        states.append(f"end:{link.reading}")

    link = Link(on_message, 1 << 20, on_read_end=on_read_end)
    link.connection_made(FakeTransport())
    link.data_received(frame("task_assign", 1) + frame("ack", 2))
    assert states == ["m-1:True", "m-2:True", "end:False"]
    assert not link.reading
    plain = Link(lambda msg: states.append(f"plain:{plain.reading}"), 1 << 20)  # no read-end hook: never set
    plain.connection_made(FakeTransport())
    plain.data_received(frame("ack", 3))
    assert states[-1] == "plain:False"
