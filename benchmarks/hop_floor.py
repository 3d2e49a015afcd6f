"""The floor under a single round trip on this machine: the same hops with no work.

    python benchmarks/hop_floor.py [--quick] [--round-trips N]

Three processes on uvloop and 127.0.0.1 relay one line along the round trip's
path (client -> relay -> echoer -> relay -> client), with nothing done at each
stop. Then the relay also passes each line through a thread and back on the
way in and on the way out, as the main node does for its two commits (with no
SQLite in the thread). The p50s are what a round trip costs before any
decoding, validating, scheduling or committing.
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


async def echoer(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def relay(port: int, echo_port: int, thread_hops: int) -> None:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def in_thread() -> None:  # a stand-in for aiosqlite's thread: hand back at once
        while True:
            fut = work.get()
            loop.call_soon_threadsafe(fut.set_result, None)

    threading.Thread(target=in_thread, daemon=True).start()
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", echo_port)

    async def through_thread() -> None:
        for _ in range(thread_hops):
            fut = loop.create_future()
            work.put(fut)
            await fut

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            await through_thread()
            up_writer.write(line)
            answer = await up_reader.readline()
            await through_thread()
            writer.write(answer)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def client(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    for _ in range(count + 100):  # the first 100 warm up
        start = time.perf_counter()
        writer.write(b"x\n")
        await reader.readline()
        samples.append(time.perf_counter() - start)
    writer.close()
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
