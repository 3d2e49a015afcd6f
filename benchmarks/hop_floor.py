"""The floor under a single round trip on this machine: the same hops with no work.

    python benchmarks/hop_floor.py [--quick] [--round-trips N]

Three processes on uvloop and 127.0.0.1 relay one line along the round trip's
path (client -> relay -> echoer -> relay -> client), with nothing done at each
stop but what `asyncio.Protocol` does. Then the relay also passes each line
through a thread and back on the way in and on the way out, as the main node
does for its commits (with no SQLite in the thread). The p50s are what the
hops cost when no process sleeps long between its turns (the whole loop takes
well under 0.1 ms); in a real round trip each process sleeps longer, and waking
an idle CPU costs more, so benchmarks/durable_floor.py (a throwaway durable
node) is the floor to compare a round trip with. Until 2026-12-03 the stops
were asyncio streams, whose reader tasks made these figures about a quarter higher.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from _harness import emit, env, percentile, run


class _Lines(asyncio.Protocol):
    """Hands each complete line to ``on_line(transport, line)``: no reader task, no wake-up of one."""

    def __init__(self, on_line: Any) -> None:
        self.on_line, self.buf, self.transport = on_line, b"", None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.on_line(self.transport, line + b"\n")


async def echoer(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Lines(lambda t, line: t.write(line)), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def relay(port: int, echo_port: int, thread_hops: int) -> None:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def in_thread() -> None:  # a stand-in for aiosqlite's thread: hand back at once
        while True:
            callback, arg = work.get()
            loop.call_soon_threadsafe(callback, arg)

    threading.Thread(target=in_thread, daemon=True).start()
    asked: list[Any] = []  # the client transports, in the order their lines went up

    def through_thread(then: Any, arg: Any, hops: int) -> None:
        if hops == 0:
            then(arg)
        else:
            work.put((lambda a: through_thread(then, a, hops - 1), arg))

    def answer(line: bytes) -> None:
        asked.pop(0).write(line)

    def from_echoer(_t: Any, line: bytes) -> None:
        through_thread(answer, line, thread_hops)

    up, _ = await loop.create_connection(lambda: _Lines(from_echoer), "127.0.0.1", echo_port)

    def send_up(line: bytes) -> None:
        up.write(line)

    def from_client(t: Any, line: bytes) -> None:
        asked.append(t)
        through_thread(send_up, line, thread_hops)

    server = await loop.create_server(lambda: _Lines(from_client), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def client(port: int, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[bytes]] = []
    transport, _ = await loop.create_connection(lambda: _Lines(lambda _t, line: waiting.pop().set_result(line)),
                                                "127.0.0.1", port)
    samples = []
    for _ in range(count + 100):  # the first 100 warm up
        fut = loop.create_future()
        waiting.append(fut)
        start = time.perf_counter()
        transport.write(b"x\n")
        await fut
        samples.append(time.perf_counter() - start)
    transport.close()
    return sorted(samples[100:])


def spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(thread_hops: int, count: int) -> list[float]:
    echo_port, relay_port = free_port(), free_port()
    procs = [spawn("--echoer", str(echo_port))]
    try:
        procs.append(spawn("--relay", str(relay_port), str(echo_port), str(thread_hops)))
        return run(client(relay_port, count))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def main() -> None:
    if sys.argv[1:2] == ["--echoer"]:
        run(echoer(int(sys.argv[2])))
        return
    if sys.argv[1:2] == ["--relay"]:
        run(relay(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 round trips")
    ap.add_argument("--round-trips", type=int, default=3000)
    args = ap.parse_args()
    count = 500 if args.quick else args.round_trips
    table, results = [], {}
    for hops, name in ((0, "4 socket hops"), (1, "4 socket hops + 2 thread round trips")):
        samples = measure(hops, count)
        p50, p99 = percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6
        table.append((name, f"p50 {p50:6.1f} us  p99 {p99:7.1f} us"))
        results["thread_hops" if hops else "socket_hops"] = {"p50_us": round(p50, 1), "p99_us": round(p99, 1)}
    emit("hop_floor", table, {"round_trips": count, **results})


if __name__ == "__main__":
    main()
