"""The single round trip with its processes placed on this machine's CPUs in several ways, ours and the floor's.

    python benchmarks/placement.py [--quick] [--round-trips N] [--rounds N]

The waited round trip (submit one `echo` task with `wait`, read the reply
that carries its result) crosses four processes or threads: the client, the
main node's event loop, the worker and the main node's SQLite thread. How
much each hand-over costs depends on whether the one woken runs on the CPU of
the one that woke it, or on another CPU that first has to be woken itself (on
a VM, an idle virtual CPU is a halted thread of the host: waking it is far
dearer than on bare metal). This script measures the round trip p50 of our
main node with one real worker (as `tasks.py`'s waited round trips) and of
`durable_floor.py`'s throwaway node (the same frames and commit, nothing
else), each with the processes (every thread of each) left free on all CPUs,
all on CPU 0, and split: the main node on CPU 0, the worker and the client
on CPU 1. Each placement is measured `--rounds` times, alternating, and the
median of those p50s is printed. The free placement is what a user's machine
does and what the other scripts measure; the others say how much of it is
hand-overs between CPUs. Needs Linux and at least 2 CPUs; talks to 127.0.0.1
only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import durable_floor
from _harness import (
    MainNode,
    Requester,
    dumps,
    emit,
    env,
    free_port,
    loads,
    run,
    spawn_ready,
    stop_all,
    timed_lines,
)
from tasks import waited_round_trips

#: name -> (CPUs of the main node, of the worker, of the client); None: every CPU
PLACEMENTS: dict[str, tuple[set[int] | None, set[int] | None, set[int] | None]] = {
    "free (every process on every CPU)": (None, None, None),
    "all on CPU 0": ({0}, {0}, {0}),
    "main node on CPU 0, worker and client on CPU 1": ({0}, {1}, {1}),
}
WARM_UP = 200
#: the CPUs this script may use (free placement: all of them)
ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}


def pin(pid: int, cpus: set[int] | None) -> None:
    """Every thread of ``pid`` on ``cpus`` (every CPU when None)."""
    allowed = cpus if cpus is not None else ALL_CPUS
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def ours(placement: tuple[set[int] | None, set[int] | None, set[int] | None], count: int) -> float:
    """Our waited round trip p50 (ms), one real worker, with the processes placed so."""
    node = MainNode("--synchronous", "normal").start()
    assert node.proc is not None
    worker = subprocess.Popen(
        [sys.executable, "-m", "retire_cluster", "worker", "--main", f"127.0.0.1:{node.port}", "--token",
         node.token, "--device-id", "placed", "--data-dir", str(node.data_dir / "placed"), "--max-tasks", "4",
         "--heartbeat-interval", "3600", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())

    async def drive() -> list[float]:
        client = await Requester(node.token, lambda _msg: None, sender_id="placement").open(node.port)
        await client.wait_for_devices(1)
        echo = {"task": {"task_type": "echo", "payload": {"message": "x"}}}
        await waited_round_trips(client.request, echo, WARM_UP)  # its SQLite thread exists by now
        assert node.proc is not None
        pin(node.proc.pid, placement[0])
        pin(worker.pid, placement[1])
        pin(os.getpid(), placement[2])
        try:
            return await waited_round_trips(client.request, echo, count)
        finally:
            pin(os.getpid(), None)
            client.close()

    try:
        samples = run(drive())
    finally:
        worker.terminate()
        worker.wait(30)
        node.stop()
    return samples[len(samples) // 2] * 1e3


def floor(placement: tuple[set[int] | None, set[int] | None, set[int] | None], count: int) -> float:
    """The throwaway node's round trip p50 (ms), with the processes placed so."""
    port = free_port()
    script = str(Path(durable_floor.__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        procs = [spawn_ready(script, "--serve", str(port), os.path.join(tmp, "floor.db"))]
        try:
            procs.append(spawn_ready(script, "--worker", str(port)))
            time.sleep(0.2)  # the worker's hello is in

            def line(i: int) -> bytes:
                return dumps({"type": "submit", "id": str(i), "message": "x"}) + b"\n"

            def check(reply: bytes) -> None:
                assert loads(reply)["type"] == "ack", reply

            run(timed_lines(port, WARM_UP, line, check))
            pin(procs[0].pid, placement[0])
            pin(procs[1].pid, placement[1])
            pin(os.getpid(), placement[2])
            try:
                samples = sorted(run(timed_lines(port, count, line, check)))
            finally:
                pin(os.getpid(), None)
        finally:
            stop_all(procs)
    return samples[len(samples) // 2] * 1e3


def compare(p50s: dict[str, dict[str, list[float]]], name: str) -> tuple[str, dict[str, Any]]:
    """One arrangement's medians, ours and the throwaway's: the table's text and the JSON line's fields."""
    ours_, floors = p50s["ours"][name], p50s["floor"][name]
    mine, theirs = statistics.median(ours_), statistics.median(floors)
    text = (f"ours p50 {mine:.3f} ms  the throwaway's {theirs:.3f} ms  ({mine / theirs:.2f}x)  "
            f"[ours {', '.join(f'{v:.3f}' for v in ours_)}; the throwaway's {', '.join(f'{v:.3f}' for v in floors)}]")
    return text, {"round_trip_p50_ms": round(mine, 3), "floor_round_trip_p50_ms": round(theirs, 3),
                  "round_trip_p50s_ms": [round(v, 3) for v in ours_],
                  "floor_round_trip_p50s_ms": [round(v, 3) for v in floors]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 round trips per measure, 2 rounds")
    ap.add_argument("--round-trips", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="measures of each placement, alternating")
    args = ap.parse_args()
    if not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2:
        sys.exit("placement.py needs Linux (it sets CPU affinities) and at least 2 CPUs to run on.")
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError as exc:
        sys.exit(f"placement.py cannot set CPU affinities here ({exc.strerror}); run it where sched_setaffinity "
                 "is allowed.")
    count, rounds = (300, 2) if args.quick else (args.round_trips, args.rounds)
    p50s: dict[str, dict[str, list[float]]] = {"ours": {}, "floor": {}}
    for _ in range(rounds):
        for name, placement in PLACEMENTS.items():
            p50s["ours"].setdefault(name, []).append(ours(placement, count))
            p50s["floor"].setdefault(name, []).append(floor(placement, count))
    table: list[tuple[str, Any]] = []
    results: list[dict[str, Any]] = []
    for name in PLACEMENTS:
        text, result = compare(p50s, name)
        table.append((name, text))
        results.append({"placement": name, **result})
    emit("placement", table, {"round_trips": count, "rounds": rounds, "results": results})


if __name__ == "__main__":
    main()
