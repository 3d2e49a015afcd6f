"""Where a single round trip's time goes, step by step.

    python benchmarks/round_trip_trace.py [--quick] [--round-trips N]

Starts the main node and one real worker (2 slots) with the hooks in
benchmarks/trace/ on their PYTHONPATH, then submits one `echo` task at a time
with `wait` and waits for the reply, as tasks.py's round trips do.
Every process records monotonic timestamps (receive, send, commit start and
end, the commit's own time in aiosqlite's thread); this script lines them up
per round trip and prints the median (and p10/p90) of each step. The hooks
add a few microseconds per step, so the total is a little above tasks.py's.

The submission's insert and assignment are held (the client waits for the
end), so one commit carries them with the running state and the result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import MainNode, Requester, emit, run

TRACE_HOOKS = Path(__file__).resolve().parent / "trace"

#: (name, process, event, detail that must be in the event's detail): matched in this order.
STEPS = [
    ("client -> main node", "main", "recv", "task_submit"),
    ("decode, validate, schedule, task_assign written", "main", "send", "task_assign"),
    ("main node -> worker socket", "worker", "transport-recv", "task_assign"),
    ("worker loop -> message handled", "worker", "recv", "task_assign"),
    ("worker: accept, run echo, write result", "worker", "send", "task_result"),
    ("worker -> main node", "main", "recv", "task_result"),
    ("decode, validate, queue the result", "main", "commit-start", ""),
    ("commit: hand-off to the SQLite thread", "main", "thread-start", ""),
    ("commit: the task and its result in SQLite", "main", "thread-end", ""),
    ("commit: hand-off back to the event loop", "main", "commit-end", ""),
    ("commit -> reply written", "main", "send", "client:ack"),
    ("main node -> client", "client", "recv", ""),
]


def load_events(trace_dir: Path, client: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str, str]]:
    events = list(client)
    for path in trace_dir.glob("*.txt"):
        for line in path.read_text().splitlines():
            t, role, what, *detail = line.split(" ", 3)
            events.append((int(t), role, what, detail[0] if detail else ""))
    events.sort()
    return events


def split_steps(events: list[tuple[int, str, str, str]]) -> list[list[float]]:
    """Per round trip, the microseconds of each step (round trips where a step is missing are skipped)."""
    starts = [i for i, e in enumerate(events) if e[1] == "client" and e[2] == "send"]
    ends = starts[1:] + [len(events)]
    out = []
    for a, b in zip(starts, ends):
        window, at, previous, durations = events[a:b], 0, events[a][0], []
        for _name, role, what, detail in STEPS:
            for k in range(at, len(window)):
                t, r, w, d = window[k]
                if r == role and w == what and detail in d:
                    durations.append((t - previous) / 1000)
                    previous, at = t, k + 1
                    break
            else:
                break
        if len(durations) == len(STEPS):
            out.append(durations)
    return out


async def drive(node: MainNode, count: int, marks: list[tuple[int, str, str, str]], pause_s: float = 0.0) -> None:
    client = await Requester(node.token, lambda _msg: None, sender_id="trace").open(node.port)
    await client.wait_for_devices(1)
    waited = {"task": {"task_type": "echo", "payload": {"message": "x"}}, "wait": 60}
    for _ in range(count):
        if pause_s:
            await asyncio.sleep(pause_s)  # every process falls asleep between round trips
        marks.append((time.perf_counter_ns(), "client", "send", "task_submit"))
        reply = await client.request("task_submit", waited)
        marks.append((time.perf_counter_ns(), "client", "recv", "ack"))
        assert reply["data"]["result"]["task"]["status"] == "completed", reply
    client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 round trips")
    ap.add_argument("--round-trips", type=int, default=500)
    ap.add_argument("--pause-ms", type=float, default=0.0,
                    help="wait this long before each round trip (one person's submissions, not a loop)")
    args = ap.parse_args()
    count = 100 if args.quick else args.round_trips
    with tempfile.TemporaryDirectory(prefix="rc-trace-") as tmp:
        trace_dir = Path(tmp)
        os.environ["RC_TRACE_DIR"] = str(trace_dir)
        os.environ["PYTHONPATH"] = str(TRACE_HOOKS) + os.pathsep + os.environ.get("PYTHONPATH", "")
        import tasks  # benchmarks/tasks.py: starts real workers

        node = MainNode("--synchronous", "normal").start()
        workers = tasks.start_workers(node, 1, 2)
        marks: list[tuple[int, str, str, str]] = []
        try:
            run(drive(node, count, marks, args.pause_ms / 1000))
        finally:
            tasks.stop_workers(workers)
            node.stop()
        rows = split_steps(load_events(trace_dir, marks))
    if not rows:
        sys.exit("no complete round trip was traced (are the hooks on PYTHONPATH?)")
    table, steps = [], {}
    for n, (name, *_rest) in enumerate(STEPS):
        values = sorted(r[n] for r in rows)
        p10, p50, p90 = (values[int(q * (len(values) - 1))] for q in (0.1, 0.5, 0.9))
        steps[name] = {"p10_us": round(p10, 1), "p50_us": round(p50, 1), "p90_us": round(p90, 1)}
        table.append((name, f"p50 {p50:7.1f} us   (p10 {p10:6.1f}, p90 {p90:7.1f})"))
    totals = sorted(sum(r) for r in rows)
    table.append(("total (median of the sums)", f"{statistics.median(totals):7.1f} us over {len(rows)} round trips"))
    emit("round_trip_trace", table, {"round_trips": len(rows), "pause_ms": args.pause_ms, "total_p50_us": round(statistics.median(totals), 1),
                                     "steps": steps})


if __name__ == "__main__":
    main()
