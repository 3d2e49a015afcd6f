"""End-to-end no-op task throughput and single round trip, with real workers.

    python benchmarks/tasks.py [--quick] [--tasks N] [--round-trips N]

Starts the main node and 2 real `retire-cluster worker` processes, then a
client (this process) submits `echo` tasks with a window of submissions in
flight and counts completions from `task_update` pushes: tasks/s from first
submission to last recorded result; then the same tasks again, 500 per
request (`task_submit` with `tasks`, as `submit_many()` and `submit-batch`
send them), 4 requests in flight. Then one task at a time for the
round-trip p50/p99, three ways (in alternating blocks): `task_submit` with
`wait` from a bare client (one request, one reply with the result: the round
trip reported), the same through the Python client's `AsyncClient.run()`
(what a user's code pays), and, for comparison, submit then wait for the
`task_update` push of a subscribed connection. Runs with `--synchronous
normal` and `full`; reports RSS of the main node and workers.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

import psutil
from _harness import MainNode, Requester, cpu_s, emit, env, loop_thread_cpu_s, percentile, run, user_kernel_s

#: The round trips run in this many alternating blocks of each kind.
ROUND_TRIP_BLOCKS = 5
#: The batched throughput run: tasks per task_submit request (as submit_many() sends them), requests in flight.
BATCH = 500
BATCH_REQUESTS = 4


def start_workers(node: MainNode, count: int, slots: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "retire_cluster", "worker", "--main", f"127.0.0.1:{node.port}",
             "--token", node.token, "--device-id", f"bench-w{i}", "--data-dir", str(node.data_dir / f"w{i}"),
             "--max-tasks", str(slots), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()))
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM all at once, then wait for each (they hand back what they hold and exit)."""
    for w in procs:
        w.terminate()
    for w in procs:
        w.wait(30)


async def drive(node: MainNode, tasks: int, round_trips: int, window: int,
                workers: list[psutil.Process]) -> dict[str, Any]:
    done = asyncio.Event()
    state: dict[str, Any] = {"completed": 0, "waiting": {}, "devices": 0, "finished_at": {}}

    def on_push(msg: dict[str, Any]) -> None:
        if msg["message_type"] == "task_update":
            task = msg["data"]["task"]
            if task["status"] == "completed" and task["task_id"] not in state["finished_at"]:
                # Count each task once, however many updates say it completed.
                state["completed"] += 1
                state["finished_at"][task["task_id"]] = time.perf_counter()
                waiter = state["waiting"].pop(task["task_id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(time.perf_counter())
                if state["completed"] == state.get("target"):
                    done.set()

    client = await Requester(node.token, on_push).open(node.port)
    request = client.request
    await request("subscribe", {})
    await client.wait_for_devices(len(workers))
    echo = {"task": {"task_type": "echo", "payload": {"message": "x"}}}

    # Throughput: keep `window` submissions outstanding.
    state["target"] = tasks
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        async with sem:
            reply = await request("task_submit", echo)
            assert reply["message_type"] == "ack", reply

    t0, main_cpu0, worker_cpu0 = time.perf_counter(), node.cpu_s(), sum(map(cpu_s, workers))
    await asyncio.gather(*(one() for _ in range(tasks)))
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - t0
    main_cpu, worker_cpu = node.cpu_s() - main_cpu0, sum(map(cpu_s, workers)) - worker_cpu0

    # The same tasks again, 500 per request (task_submit with tasks, as submit_many() and submit-batch
    # send them), BATCH_REQUESTS requests in flight: what the end-to-end rate is when submitting is cheap.
    state["completed"], state["target"] = 0, tasks
    done.clear()
    batch_sem = asyncio.Semaphore(BATCH_REQUESTS)

    async def hundreds(count: int) -> None:
        async with batch_sem:
            reply = await request("task_submit", {"tasks": [echo["task"]] * count})
            assert reply["message_type"] == "ack", reply

    t0, main_cpu0 = time.perf_counter(), node.cpu_s()
    await asyncio.gather(*(hundreds(min(BATCH, tasks - start)) for start in range(0, tasks, BATCH)))
    await asyncio.wait_for(done.wait(), 600)
    batched_elapsed = time.perf_counter() - t0
    batched_main_cpu = node.cpu_s() - main_cpu0

    client.close()
    # The two ways in alternating blocks, each on a fresh connection (a
    # subscription to all would add a push to every waited round trip), so a
    # drift of the machine's speed does not favour either.
    updated: list[float] = []
    samples: list[float] = []
    through_client: list[float] = []
    # main node, workers, this process (the submitter), the main node's event loop thread: CPU seconds
    # spent during the waited round trips
    waited_cpu = [0.0, 0.0, 0.0, 0.0]
    # user and kernel seconds of the main node's event loop thread, and of the workers
    loop_user_kernel, worker_user_kernel = [0.0, 0.0], [0.0, 0.0]
    me = psutil.Process()
    block = max(1, round_trips // ROUND_TRIP_BLOCKS)
    for done_trips in range(0, round_trips, block):
        count = min(block, round_trips - done_trips)
        client = await Requester(node.token, on_push).open(node.port)
        await client.request("subscribe", {})
        updated += await round_trip_samples(client.request, state, echo, count)
        client.close()
        waiter = await Requester(node.token, lambda _msg: None, sender_id="bench-wait").open(node.port)
        main_cpu0, worker_cpu0, my_cpu0 = node.cpu_s(), sum(map(cpu_s, workers)), cpu_s(me)
        loop_cpu0 = loop_thread_cpu_s(node.process)
        loop_uk0 = user_kernel_s(node.process.pid, thread_only=True)
        worker_uk0 = [user_kernel_s(w.pid) for w in workers]
        samples += await waited_round_trips(waiter.request, echo, count)
        for i, value in enumerate(user_kernel_s(node.process.pid, thread_only=True)):
            loop_user_kernel[i] += value - loop_uk0[i]
        for w, before in zip(workers, worker_uk0):
            for i, value in enumerate(user_kernel_s(w.pid)):
                worker_user_kernel[i] += value - before[i]
        waited_cpu[0] += node.cpu_s() - main_cpu0
        waited_cpu[1] += sum(map(cpu_s, workers)) - worker_cpu0
        waited_cpu[2] += cpu_s(me) - my_cpu0
        waited_cpu[3] += loop_thread_cpu_s(node.process) - loop_cpu0
        waiter.close()
        through_client += await client_round_trips(node, echo, count)
    updated.sort()
    samples.sort()
    through_client.sort()
    return {"tasks_per_s": round(tasks / elapsed), "seconds": round(elapsed, 2),
            "tasks_per_s_batched": round(tasks / batched_elapsed),
            "main_cpu_us_per_task_batched": round(1e6 * batched_main_cpu / tasks),
            # CPU per task is steadier than wall time on a shared 2-core machine.
            "main_cpu_us_per_task": round(1e6 * main_cpu / tasks),
            "worker_cpu_us_per_task": round(1e6 * worker_cpu / tasks),
            "round_trip_p50_ms": round(1000 * percentile(samples, 0.5), 3),
            "round_trip_p99_ms": round(1000 * percentile(samples, 0.99), 3),
            # The CPU figures below are per round trip on average: compare them with the mean, not the p50.
            "round_trip_mean_ms": round(1000 * sum(samples) / len(samples), 3),
            # A round trip's path is serial (client, main node, SQLite's thread, worker), and on a
            # VM that packs tasks onto one vCPU they take turns: it costs about the CPU all of them
            # spend on it (benchmarks/README.md, "Why the round trip follows CPU here").
            "round_trip_main_cpu_us": round(1e6 * waited_cpu[0] / round_trips),
            # ... of which its event loop's thread (the rest is SQLite's thread: the commits)
            "round_trip_main_loop_cpu_us": round(1e6 * waited_cpu[3] / round_trips),
            "round_trip_worker_cpu_us": round(1e6 * waited_cpu[1] / round_trips),
            "round_trip_submitter_cpu_us": round(1e6 * waited_cpu[2] / round_trips),
            # user and kernel time (in 10 ms clock ticks, so rough below a thousand round trips): how much
            # of the event loop's and the workers' CPU is our own code, and how much the system calls
            "round_trip_main_loop_user_us": round(1e6 * loop_user_kernel[0] / round_trips),
            "round_trip_main_loop_kernel_us": round(1e6 * loop_user_kernel[1] / round_trips),
            "round_trip_worker_user_us": round(1e6 * worker_user_kernel[0] / round_trips),
            "round_trip_worker_kernel_us": round(1e6 * worker_user_kernel[1] / round_trips),
            "round_trip_update_p50_ms": round(1000 * percentile(updated, 0.5), 3),
            "round_trip_update_p99_ms": round(1000 * percentile(updated, 0.99), 3),
            "round_trip_client_p50_ms": round(1000 * percentile(through_client, 0.5), 3),
            "round_trip_client_p99_ms": round(1000 * percentile(through_client, 0.99), 3)}


async def client_round_trips(node: MainNode, echo: dict[str, Any], count: int) -> list[float]:
    """The waited round trip through the Python client, ``AsyncClient.run()`` (what a user's code calls)."""
    from retire_cluster.client import AsyncClient

    samples = []
    async with AsyncClient(f"127.0.0.1:{node.port}", node.token, timeout_s=60, client_id="bench-client") as client:
        for _ in range(count):
            start = time.perf_counter()
            record = await client.run("echo", echo["task"]["payload"], wait_s=60)
            samples.append(time.perf_counter() - start)
            assert record["status"] == "completed", record
    return samples


async def waited_round_trips(request: Any, echo: dict[str, Any], count: int) -> list[float]:
    """One task at a time with ``task_submit`` ``wait``: its one reply carries the result; sorted seconds."""
    samples = []
    waited = dict(echo, wait=60)
    for _ in range(count):
        start = time.perf_counter()
        reply = await request("task_submit", waited)
        samples.append(time.perf_counter() - start)
        assert reply["data"]["result"]["task"]["status"] == "completed", reply
    samples.sort()
    return samples


async def round_trip_samples(request: Any, state: dict[str, Any], echo: dict[str, Any], count: int) -> list[float]:
    """One task at a time: submit, then wait for its ``task_update`` (subscribed); sorted seconds."""
    samples = []
    state["target"] = None
    for _ in range(count):
        start = time.perf_counter()
        reply = await request("task_submit", echo)
        task_id = reply["data"]["result"]["task_id"]
        finished = state["finished_at"].get(task_id)  # the update may come in the same read as the ack
        if finished is None:
            waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            state["waiting"][task_id] = waiter
            finished = await asyncio.wait_for(waiter, 60)
        samples.append(finished - start)
    samples.sort()
    return samples


def measure(synchronous: str, tasks: int, round_trips: int, window: int, slots: int = 256) -> dict[str, Any]:
    node = MainNode("--synchronous", synchronous).start()
    workers = start_workers(node, 2, slots)
    try:
        rss_rest = node.rss_mib()
        time.sleep(3)  # the workers start, register and settle
        worker_rest = [round(psutil.Process(w.pid).memory_info().rss / 2**20, 1) for w in workers]
        result = run(drive(node, tasks, round_trips, window, [psutil.Process(w.pid) for w in workers]))
        result.update({
            "synchronous": synchronous, "tasks": tasks, "main_rss_mib": round(node.rss_mib(), 1),
            "main_rss_at_rest_mib": round(rss_rest, 1), "worker_slots": slots,
            "worker_rss_at_rest_mib": worker_rest,
            "worker_rss_mib": [round(psutil.Process(w.pid).memory_info().rss / 2**20, 1) for w in workers],
        })
        return result
    finally:
        stop_workers(workers)
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 tasks, 100 round trips, normal only")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--round-trips", type=int, default=500)
    ap.add_argument("--window", type=int, default=2_000)
    ap.add_argument("--synchronous", nargs="+", default=["normal", "full"])
    ap.add_argument("--slots", type=int, default=256, help="task slots per worker (--max-tasks)")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.round_trips, args.synchronous = 2_000, 100, ["normal"]
    rows = [measure(s, args.tasks, args.round_trips, args.window, args.slots) for s in args.synchronous]
    table = [(f"synchronous={r['synchronous']}",
              f"{r['tasks_per_s']:,} tasks/s (main CPU {r['main_cpu_us_per_task']} µs/task, workers "
              f"{r['worker_cpu_us_per_task']}; submitted 500 per request: {r['tasks_per_s_batched']:,} tasks/s, main CPU "
              f"{r['main_cpu_us_per_task_batched']} µs/task)  round trip p50 {r['round_trip_p50_ms']} ms  "
              f"p99 {r['round_trip_p99_ms']} ms (CPU per round trip: main {r['round_trip_main_cpu_us']} µs, "
              f"workers {r['round_trip_worker_cpu_us']}, submitter {r['round_trip_submitter_cpu_us']}; via task_update p50 {r['round_trip_update_p50_ms']} ms, "
              f"via AsyncClient.run() p50 {r['round_trip_client_p50_ms']} ms)  main RSS {r['main_rss_mib']} MiB (rest "
              f"{r['main_rss_at_rest_mib']})  workers {r['worker_rss_mib']} MiB (rest {r['worker_rss_at_rest_mib']}, "
              f"{r['worker_slots']} slots)") for r in rows]
    emit("tasks", table, {"results": rows})


if __name__ == "__main__":
    main()
