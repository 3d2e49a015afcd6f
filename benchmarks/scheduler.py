"""Scheduling decision cost with many devices and a long queue (in-process, no sockets).

    python benchmarks/scheduler.py [--quick] [--devices N] [--tasks N] [--strategy NAME]

Builds N devices (a mix of sizes, platforms and roles) and M pending tasks in
a few requirement classes and priorities, then times single decisions: each
round frees one slot and asks for one assignment. Then, with the same devices
and an empty queue, tasks arriving one at a time ("trickle": push one, place
it, its device is free again). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retire_cluster.main.registry import Device
from retire_cluster.main.scheduler import Scheduler
from retire_cluster.main.strategies import STRATEGIES
from retire_cluster.main.tasks import Task
from retire_cluster.protocol.messages import DeviceStatus, TaskStatus


class _Conn:
    closed = False


def build(devices: int, tasks: int, strategy: str, seed: int = 1) -> tuple[Scheduler, list[Device]]:
    rng = random.Random(seed)
    sched = Scheduler(strategy)
    devs = []
    for i in range(devices):
        d = Device(
            f"dev-{i:05d}",
            device_info={"platform": rng.choice(["linux", "android"]), "architecture": "aarch64",
                         "role": rng.choice(["worker", "mobile", "storage"])},
            hardware_specs={"cpu_cores": rng.choice([1, 2, 4, 8]), "memory_total": rng.choice([1, 2, 4, 16]) * 2**30},
            capabilities=frozenset({"computational"}), task_types=frozenset({"echo", "sleep", "python_eval"}),
            max_tasks=rng.choice([1, 2, 4]), status=DeviceStatus.ONLINE, conn=_Conn(),
            metrics={"cpu_usage": rng.random() * 100}, weight=rng.choice([1.0, 2.0, 5.0]),
        )
        devs.append(d)
        sched.update_device(d, 0.0)
    classes = [{}, {"min_cpu_cores": 2}, {"min_memory_gb": 4}, {"platform": "android"}, {"role": "storage"},
               {"min_cpu_cores": 4, "min_memory_gb": 8}]
    for n in range(tasks):
        sched.push(Task(f"t{n}", rng.choice(["echo", "python_eval"]), {}, rng.choice([1, 5, 10, 20]), 60.0,
                        rng.choice(classes), 3, 0.0, n), 0.0)
    return sched, devs


def run(devices: int, tasks: int, strategy: str, rounds: int) -> dict:
    t0 = time.perf_counter()
    sched, devs = build(devices, tasks, strategy)
    build_s = time.perf_counter() - t0
    # Fill every slot first (this is the cluster at full load).
    t0 = time.perf_counter()
    first = sched.pick(0.0)
    fill_s = time.perf_counter() - t0
    held = {d.device_id: list(d.running) for d in devs}
    by_id = {t.task_id: t for t, _ in first}
    for t, _ in first:
        t.status = TaskStatus.RUNNING
    rng = random.Random(2)
    samples = []
    for _ in range(rounds):
        d = rng.choice(devs)
        if not held[d.device_id]:
            continue
        task_id = held[d.device_id].pop()
        by_id[task_id].status = TaskStatus.COMPLETED
        d.running.discard(task_id)
        t0 = time.perf_counter()
        sched.update_device(d, 0.0)  # what the node does when a result frees a slot
        plan = sched.pick(0.0, limit=1)
        samples.append(time.perf_counter() - t0)
        for t, dev in plan:
            t.status = TaskStatus.RUNNING
            by_id[t.task_id] = t
            held[dev.device_id].append(t.task_id)
    samples.sort()
    trickle = trickle_us(devices, strategy, max(rounds // 10, 50))
    return {
        "strategy": strategy, "devices": devices, "pending": tasks, "build_s": round(build_s, 2),
        "trickle_p50_us": trickle,
        "first_fill_assignments": len(first), "first_fill_us_each": round(1e6 * fill_s / max(len(first), 1), 1),
        "decisions": len(samples), "p50_us": round(1e6 * statistics.median(samples), 1),
        "p99_us": round(1e6 * samples[int(len(samples) * 0.99) - 1], 1), "max_us": round(1e6 * samples[-1], 1),
        "queue_left": len(sched),
    }


def trickle_us(devices: int, strategy: str, rounds: int) -> float:
    """p50 of one task into an empty queue: push, place, and its device is free again."""
    sched, _devs = build(devices, 0, strategy)
    samples = []
    for n in range(rounds):
        task = Task(f"trickle-{n}", "echo", {}, 5, 60.0, {}, 3, 0.0, n)
        t0 = time.perf_counter()
        sched.push(task, 0.0)
        plan = sched.pick(0.0)
        samples.append(time.perf_counter() - t0)
        for t, dev in plan:  # it ended at once
            dev.running.discard(t.task_id)
            sched.update_device(dev, 0.0)
    return round(1e6 * statistics.median(samples), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 devices and 10,000 tasks")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--strategy", choices=[*STRATEGIES, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=5_000)
    args = ap.parse_args()
    if args.quick:
        args.devices, args.tasks, args.rounds = 1_000, 10_000, 1_000
    names = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    rows = [run(args.devices, args.tasks, name, args.rounds) for name in names]
    print(f"{'strategy':<22}{'devices':>8}{'pending':>9}{'p50 us':>9}{'p99 us':>9}{'max us':>9}{'fill us/each':>14}"
          f"{'trickle p50 us':>16}")
    for r in rows:
        print(f"{r['strategy']:<22}{r['devices']:>8}{r['pending']:>9}{r['p50_us']:>9}{r['p99_us']:>9}"
              f"{r['max_us']:>9}{r['first_fill_us_each']:>14}{r['trickle_p50_us']:>16}")
    print(json.dumps({"benchmark": "scheduler", "results": rows}))


if __name__ == "__main__":
    main()
