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
from typing import Any

from _harness import Lines, emit, free_port, percentile, run, spawn_ready, stop_all, timed_lines


async def echoer(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Lines(lambda c, line: c.transport.write(line)), "127.0.0.1", port)
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

    def from_echoer(_c: Lines, line: bytes) -> None:
        through_thread(answer, line, thread_hops)

    up, _ = await loop.create_connection(lambda: Lines(from_echoer), "127.0.0.1", echo_port)

    def send_up(line: bytes) -> None:
        up.write(line)

    def from_client(c: Lines, line: bytes) -> None:
        asked.append(c.transport)
        through_thread(send_up, line, thread_hops)

    server = await loop.create_server(lambda: Lines(from_client), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def client(port: int, count: int) -> list[float]:
    return await timed_lines(port, count, lambda _i: b"x\n")


def spawn(*args: str) -> subprocess.Popen[str]:
    return spawn_ready(__file__, *args)


def measure(thread_hops: int, count: int) -> list[float]:
    echo_port, relay_port = free_port(), free_port()
    procs = [spawn("--echoer", str(echo_port))]
    try:
        procs.append(spawn("--relay", str(relay_port), str(echo_port), str(thread_hops)))
        return run(client(relay_port, count))
    finally:
        stop_all(procs)


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
