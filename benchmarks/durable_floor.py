"""The least a durable round trip costs on this machine, next to ours in the same run.

    python benchmarks/durable_floor.py [--quick] [--round-trips N]

DESIGN.md's performance facts come from a throwaway main node: uvloop,
asyncio.Protocol, orjson, one group commit through a thread, replies after the
commit, 6 frames per task. This script runs such a node (the hundred lines
below) with the same frames as ours: submit, assign, the worker's ack and
result in one write, then, once the task and its attempt are committed with
our own schema and pragmas (WAL, synchronous NORMAL), the reply to the client
and the ack of the result to the worker. Nothing is validated, authenticated,
scheduled or recorded beyond that. One client submits one echo task at a time
and waits for its result, as tasks.py's waited round trips do. The script
measures the floor, then our round trip (tasks.py with 2 real workers), then
the floor again, and prints both p50s and their ratio: how much of our round
trip this machine costs any durable design, and how much is our own work.
For each side it also prints the mean round trip and the CPU per round trip
of the main node (its event loop's thread and the others: SQLite's), the
worker and the submitting process; on a VM where they take turns on one
vCPU, their sum is about the mean (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _harness import (
    REPO,
    Lines,
    cpu_s,
    emit,
    free_port,
    loop_thread_cpu_s,
    percentile,
    run,
    spawn_ready,
    stop_all,
    timed_lines,
    user_kernel_s,
)

try:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover - orjson is a main-node dependency
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    loads = json.loads


def open_db(path: str) -> sqlite3.Connection:
    sys.path.insert(0, str(REPO))
    from retire_cluster.main.store import MIGRATIONS

    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for script in MIGRATIONS:
        db.executescript(script)
    db.commit()
    return db


INSERT = ("INSERT INTO tasks (task_id, seq, task_type, payload, priority, timeout_s, requirements, max_retries, "
          "status, attempt, assigned_device, result, created_at, assigned_at, started_at, finished_at) "
          "VALUES (?, ?, 'echo', ?, 5, 3600, '{}', 3, 'completed', 1, 'w1', ?, ?, ?, ?, ?)")
ATTEMPT = ("INSERT INTO task_attempts (task_id, attempt, device_id, assigned_at, started_at, finished_at, outcome) "
           "VALUES (?, 1, 'w1', ?, ?, ?, 'completed')")


async def serve_floor(port: int, db_path: str) -> None:
    """The throwaway main node: submit -> worker -> result -> one commit -> reply."""
    loop = asyncio.get_running_loop()
    db = open_db(db_path)
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    state: dict[str, Any] = {"worker": None, "seq": 0, "queued": [], "in_flight": False, "waiting": {}}

    def sqlite_thread() -> None:
        while True:
            rows, replies = jobs.get()
            db.executemany(INSERT, [r[0] for r in rows])
            db.executemany(ATTEMPT, [r[1] for r in rows])
            db.commit()
            loop.call_soon_threadsafe(committed, replies)

    def start_commit() -> None:
        if state["in_flight"] or not state["queued"]:
            return
        batch, state["queued"], state["in_flight"] = state["queued"], [], True
        jobs.put(([b[0] for b in batch], [b[1] for b in batch]))

    def committed(replies: list[tuple[Any, bytes, bytes]]) -> None:
        state["in_flight"] = False
        for transport, frame, worker_ack in replies:
            transport.write(frame)  # the waited reply first, as ours
            state["worker"].write(worker_ack)
        start_commit()

    def on_line(conn: Lines, line: bytes) -> None:
        msg = loads(line)
        kind = msg["type"]
        if kind == "hello":  # the worker
            state["worker"] = conn.transport
        elif kind == "submit":
            state["seq"] += 1
            task_id = f"{state['seq']:016x}"
            state["waiting"][task_id] = (conn.transport, msg["id"], msg["message"], time.time())
            state["worker"].write(dumps({"type": "assign", "task_id": task_id, "message": msg["message"]}) + b"\n")
        elif kind == "ack":  # the worker took the task
            pass
        elif kind == "result":
            transport, message_id, message, created = state["waiting"].pop(msg["task_id"])
            now = time.time()
            result = dumps({"output": msg["output"]}).decode()
            rows = ((msg["task_id"], state["seq"], dumps({"message": message}).decode(), result, created, created,
                     created, now), (msg["task_id"], created, created, now))
            reply = dumps({"type": "ack", "id": message_id, "task_id": msg["task_id"], "result": result}) + b"\n"
            worker_ack = dumps({"type": "ack", "id": msg["task_id"]}) + b"\n"
            state["queued"].append((rows, (transport, reply, worker_ack)))
            if not state["in_flight"]:
                loop.call_soon(start_commit)  # one commit per loop pass, as ours

    threading.Thread(target=sqlite_thread, daemon=True).start()
    server = await loop.create_server(lambda: Lines(on_line), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def floor_worker(port: int) -> None:
    def on_line(conn: Lines, line: bytes) -> None:
        msg = loads(line)
        if msg["type"] == "assign":  # the ack and the result in one write, as ours
            conn.transport.write(dumps({"type": "ack", "task_id": msg["task_id"]}) + b"\n" + dumps(
                {"type": "result", "task_id": msg["task_id"], "output": msg["message"]}) + b"\n")

    transport, _ = await asyncio.get_running_loop().create_connection(lambda: Lines(on_line), "127.0.0.1", port)
    transport.write(b'{"type": "hello"}\n')
    print("ready", flush=True)
    await asyncio.Event().wait()


async def floor_client(port: int, count: int) -> list[float]:
    def check(reply: bytes) -> None:
        assert loads(reply)["type"] == "ack", reply

    return await timed_lines(port, count, lambda i: dumps({"type": "submit", "id": str(i), "message": "x"}) + b"\n",
                             check)


def spawn(*args: str) -> subprocess.Popen[str]:
    return spawn_ready(__file__, *args)


#: Round trips of the throwaway pair before those measured (ours are measured after tasks.py's
#: 1,000 tasks): the first ones prepare statements and start the WAL file.
WARM_UP = 50


def floor(count: int) -> tuple[list[float], float, float, float, float, tuple[float, float], tuple[float, float]]:
    """The throwaway's round trips (seconds), the CPU seconds its main node, its worker, this process
    and its main node's event loop thread spent on them, and the (user, kernel) seconds of that thread
    and of the worker."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [spawn("--serve", str(port), os.path.join(tmp, "floor.db"))]
        try:
            procs.append(spawn("--worker", str(port)))
            time.sleep(0.2)  # the worker's hello is in
            run(floor_client(port, WARM_UP))  # first statements prepared, first pages of the WAL written
            main, worker, me = (psutil.Process(p.pid) for p in (*procs, psutil.Process()))
            main_cpu0, worker_cpu0, my_cpu0, loop_cpu0 = cpu_s(main), cpu_s(worker), cpu_s(me), loop_thread_cpu_s(main)
            loop_uk0, worker_uk0 = user_kernel_s(main.pid, thread_only=True), user_kernel_s(worker.pid)
            samples = run(floor_client(port, count))
            loop_uk, worker_uk = user_kernel_s(main.pid, thread_only=True), user_kernel_s(worker.pid)
            return (samples, cpu_s(main) - main_cpu0, cpu_s(worker) - worker_cpu0, cpu_s(me) - my_cpu0,
                    loop_thread_cpu_s(main) - loop_cpu0, (loop_uk[0] - loop_uk0[0], loop_uk[1] - loop_uk0[1]),
                    (worker_uk[0] - worker_uk0[0], worker_uk[1] - worker_uk0[1]))
        finally:
            stop_all(procs)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        run(serve_floor(int(sys.argv[2]), sys.argv[3]))
        return
    if sys.argv[1:2] == ["--worker"]:
        run(floor_worker(int(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 round trips of each")
    ap.add_argument("--round-trips", type=int, default=1000)
    args = ap.parse_args()
    count = 300 if args.quick else args.round_trips
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tasks import measure

    first = floor(count // 2)
    ours = measure("normal", 1000, count, 200)
    second = floor(count - count // 2)
    samples = sorted(first[0] + second[0])
    p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
    mean = 1e3 * sum(samples) / len(samples)
    floor_main_us, floor_worker_us, floor_submitter_us, floor_loop_us = (
        round(1e6 * (first[i] + second[i]) / count) for i in (1, 2, 3, 4))
    floor_total_us = floor_main_us + floor_worker_us + floor_submitter_us
    floor_loop_user_us, floor_loop_kernel_us, floor_worker_user_us, floor_worker_kernel_us = (
        round(1e6 * (first[i][j] + second[i][j]) / count) for i in (5, 6) for j in (0, 1))
    ours_total_us = sum(ours[f"round_trip_{k}_cpu_us"] for k in ("main", "worker", "submitter"))
    ratio = round(ours["round_trip_p50_ms"] / p50, 2)

    def cpu(main_us: int, loop_us: int, worker_us: int, submitter_us: int, total_us: int) -> str:
        return (f"CPU per round trip: main {main_us} µs (event loop {loop_us}, other threads {main_us - loop_us}), "
                f"worker {worker_us}, submitter {submitter_us}; together {total_us}")

    def user_kernel(loop_user: int, loop_kernel: int, worker_user: int, worker_kernel: int) -> str:
        return (f"user / kernel: event loop {loop_user} / {loop_kernel} µs, worker {worker_user} / {worker_kernel} "
                "(10 ms clock ticks)")

    # The CPU figures are per round trip on average: the mean is what they add up to, not the p50
    # (the throwaway's round trips have a long tail, so its p50 is well under its mean).
    emit("durable_floor", [
        ("the throwaway node (floor)", f"round trip p50 {p50:.3f} ms  p99 {p99:.3f} ms  mean {mean:.3f} ms"),
        ("", cpu(floor_main_us, floor_loop_us, floor_worker_us, floor_submitter_us, floor_total_us)),
        ("", user_kernel(floor_loop_user_us, floor_loop_kernel_us, floor_worker_user_us, floor_worker_kernel_us)),
        ("retire-cluster", f"round trip p50 {ours['round_trip_p50_ms']} ms  p99 {ours['round_trip_p99_ms']} ms  "
                           f"mean {ours['round_trip_mean_ms']} ms"),
        ("", cpu(ours["round_trip_main_cpu_us"], ours["round_trip_main_loop_cpu_us"],
                 ours["round_trip_worker_cpu_us"], ours["round_trip_submitter_cpu_us"], ours_total_us)),
        ("", user_kernel(ours["round_trip_main_loop_user_us"], ours["round_trip_main_loop_kernel_us"],
                         ours["round_trip_worker_user_us"], ours["round_trip_worker_kernel_us"])),
        ("ours / floor", f"{ratio}x  (ours above the floor: {ours['round_trip_p50_ms'] - p50:.3f} ms)"),
    ], {"round_trips": count, "floor": {"round_trip_p50_ms": round(p50, 3), "round_trip_p99_ms": round(p99, 3),
                                        "round_trip_mean_ms": round(mean, 3),
                                        "round_trip_main_cpu_us": floor_main_us,
                                        "round_trip_main_loop_cpu_us": floor_loop_us,
                                        "round_trip_worker_cpu_us": floor_worker_us,
                                        "round_trip_submitter_cpu_us": floor_submitter_us,
                                        "round_trip_main_loop_user_us": floor_loop_user_us,
                                        "round_trip_main_loop_kernel_us": floor_loop_kernel_us,
                                        "round_trip_worker_user_us": floor_worker_user_us,
                                        "round_trip_worker_kernel_us": floor_worker_kernel_us},
        "retire_cluster": {k: ours[k] for k in ("round_trip_p50_ms", "round_trip_p99_ms", "round_trip_mean_ms",
                                                "round_trip_main_cpu_us", "round_trip_main_loop_cpu_us",
                                                "round_trip_worker_cpu_us", "round_trip_submitter_cpu_us",
                                                "round_trip_main_loop_user_us", "round_trip_main_loop_kernel_us",
                                                "round_trip_worker_user_us", "round_trip_worker_kernel_us")},
        "ratio": ratio})


if __name__ == "__main__":
    main()
