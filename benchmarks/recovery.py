"""Time from start to serving with many tasks in the store.

    python benchmarks/recovery.py [--quick] [--tasks N]

Fills a data dir with N tasks through the store's own statements (a tenth
pending, a tenth assigned to devices that were online, the rest finished),
then starts `retire-cluster main` on it and measures until the first
`cluster_status` is answered. Default 100,000 tasks.
"""

from __future__ import annotations

import argparse
import random
import socket
import tempfile
import time
from pathlib import Path

from _harness import REPO, MainNode, emit, run  # noqa: F401  (REPO puts the package on sys.path)

from retire_cluster.main.registry import Device
from retire_cluster.main.store import Store
from retire_cluster.main.tasks import Attempt, Task
from retire_cluster.protocol.codec import dumps, loads
from retire_cluster.protocol.messages import DeviceStatus, TaskStatus


async def fill(path: Path, tasks: int) -> None:
    store = Store(path, synchronous="normal")
    await store.open()
    rng = random.Random(7)
    devices = [Device(f"dev-{i}", device_info={"platform": "linux"}, hardware_specs={"cpu_cores": 4},
                      task_types=frozenset({"echo"}), max_tasks=64, status=DeviceStatus.ONLINE,
                      registered_at=1.0, last_seen=2.0) for i in range(100)]
    await store.write([Store.upsert_device(d) for d in devices])
    batch = []
    for n in range(tasks):
        t = Task(f"task-{n:07d}", "echo", {"message": f"m{n}"}, rng.choice([1, 5, 10]), 60.0, {}, 3, 1000.0 + n, n + 1)
        roll = n % 10
        if roll == 0:
            pass  # pending
        elif roll == 1:
            t.status, t.attempt, t.assigned_device, t.assigned_at = TaskStatus.RUNNING, 1, f"dev-{n % 100}", 2000.0
            t.attempts.append(Attempt(1, t.assigned_device, 2000.0))
        else:
            t.status, t.attempt, t.assigned_device, t.finished_at = TaskStatus.COMPLETED, 1, f"dev-{n % 100}", 3000.0
            t.result = {"output": f"m{n}", "exit_code": 0}
            t.attempts.append(Attempt(1, t.assigned_device, 2000.0, 2001.0, 3000.0, "completed"))
        batch.append(Store.insert_task(t))
        if t.attempts:
            batch.extend(Store.update_task(t)[1:])
        if len(batch) >= 5000:
            await store.write(batch)
            batch = []
    if batch:
        await store.write(batch)
    await store.close()


def first_answer(port: int, token: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(dumps({"message_type": "cluster_status", "message_id": "1", "sender_id": "bench",
                                 "auth_token": token}) + b"\n")
                reply = loads(s.makefile("rb").readline())
                assert reply["message_type"] == "ack", reply
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 tasks")
    ap.add_argument("--tasks", type=int, default=100_000)
    args = ap.parse_args()
    if args.quick:
        args.tasks = 20_000
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "main"
        t0 = time.perf_counter()
        run(fill(data_dir / "cluster.db", args.tasks))
        fill_s = time.perf_counter() - t0
        empty = MainNode(data_dir=Path(tmp) / "empty")
        t0 = time.perf_counter()
        empty.start()
        first_answer(empty.port, empty.token)
        baseline_s = time.perf_counter() - t0
        empty.stop()
        node = MainNode(data_dir=data_dir)
        t0 = time.perf_counter()
        node.start()
        first_answer(node.port, node.token)
        serving_s = time.perf_counter() - t0
        rss = node.rss_mib()
        node.stop()
    result = {"tasks": args.tasks, "start_to_serving_s": round(serving_s, 3),
              "empty_store_start_s": round(baseline_s, 3), "fill_s": round(fill_s, 1), "main_rss_mib": round(rss, 1)}
    emit("recovery", [(f"{args.tasks:,} stored tasks", f"serving after {serving_s:.2f} s "
                       f"(empty store: {baseline_s:.2f} s), RSS {rss:.1f} MiB")], result)


if __name__ == "__main__":
    main()
