"""Instructions per waited round trip of the real main node and of a real worker (valgrind's cachegrind).

    python benchmarks/instructions.py [--quick] [--round-trips N]

This machine's speed drifts by 20-40% within minutes, so two commits' round
trips in wall time or CPU time differ by more than most changes make. The
number of instructions a process executes per round trip does not drift: at
600 round trips it is the same to within about 1% from run to run (with
`--quick`'s 200, what does not scale with round trips weighs more: the
worker's figure varied by up to 10%). For each of the two processes,
the script starts the main node and one worker (`--max-tasks 4`, heartbeats
hourly) with that one process under `valgrind --tool=cachegrind
--cache-sim=no`, waits for 20 round trips (`task_submit` with `wait`, one
at a time, as tasks.py's), then runs N more, and stops it; then the same
with no more. The difference over N is the process's instructions per round
trip (user space only: its threads, SQLite's and the interpreter's included,
the kernel's not). Then the same for durable_floor.py's throwaway main node
and its worker (the same frames and the same commit, nothing else): what
the least durable round trip runs, for scale. Under valgrind a process runs 20-50 times slower, so
timers that fire on wall time (the lease monitor, the lazy commit) fire more
often per round trip than without it; both runs share that.

To compare two commits, run it from each commit's own checkout (a `git
worktree`): `python -m retire_cluster` puts the current directory first on
`sys.path`. Needs valgrind (the Debian package valgrind).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import durable_floor
from _harness import MainNode, Requester, emit, env, free_port, run, spawn_ready, stop_all
from tasks import waited_round_trips

WARM_UP = 20


def valgrind(out: Path) -> tuple[str, ...]:
    return ("valgrind", "-q", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}")


def instructions(out: Path) -> int:
    """The total of a cachegrind output file (its ``summary:`` line)."""
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {out}")


def one_run(role: str, round_trips: int, tmp: Path) -> int:
    """Instructions of ``role``'s process over start, WARM_UP + ``round_trips`` round trips, and stop."""
    out = tmp / f"{role}-{round_trips}.cg"
    node = MainNode("--synchronous", "normal", prefix=valgrind(out) if role == "main" else ()).start()
    worker = subprocess.Popen(
        [*(valgrind(out) if role == "worker" else ()), sys.executable, "-m", "retire_cluster", "worker",
         "--main", f"127.0.0.1:{node.port}", "--token", node.token, "--device-id", "counted",
         "--data-dir", str(node.data_dir / "counted"), "--max-tasks", "4", "--heartbeat-interval", "3600",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())

    async def drive() -> None:
        client = await Requester(node.token, lambda _msg: None, sender_id="instructions").open(node.port)
        await client.wait_for_devices(1)
        echo = {"task": {"task_type": "echo", "payload": {"message": "x"}}}
        await waited_round_trips(client.request, echo, WARM_UP + round_trips)
        client.close()

    try:
        run(drive())
    finally:
        worker.terminate()
        worker.wait(300)
        node.stop()
    return instructions(out)


def floor_run(role: str, round_trips: int, tmp: Path) -> int:
    """The same for durable_floor.py's throwaway main node or its worker: what the least durable round trip runs."""
    out = tmp / f"floor-{role}-{round_trips}.cg"
    port = free_port()
    script = durable_floor.__file__
    procs = [spawn_ready(script, "--serve", str(port), str(tmp / f"floor-{role}-{round_trips}.db"),
                         prefix=valgrind(out) if role == "main" else ())]
    try:
        procs.append(spawn_ready(script, "--worker", str(port), prefix=valgrind(out) if role == "worker" else ()))
        time.sleep(1.0)  # its hello is in (the throwaway node has no register reply to wait for)
        run(durable_floor.floor_client(port, WARM_UP + round_trips))
    finally:
        stop_all(procs, timeout_s=300)
    return instructions(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 round trips")
    ap.add_argument("--round-trips", type=int, default=600)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind on PATH (the Debian package valgrind).")
    count = 200 if args.quick else args.round_trips
    described = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    commit = described.stdout.strip() if described.returncode == 0 else "(not a git checkout)"
    per: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="rc-instructions-") as name:
        tmp = Path(name)
        for role in ("main", "worker"):
            base = one_run(role, 0, tmp)
            per[role] = round((one_run(role, count, tmp) - base) / count)
        for role in ("main", "worker"):
            base = floor_run(role, 0, tmp)
            per[f"floor_{role}"] = round((floor_run(role, count, tmp) - base) / count)
    emit("instructions", [
        ("main node", f"{per['main']:,} instructions per waited round trip"),
        ("worker", f"{per['worker']:,} instructions per waited round trip"),
        ("throwaway main node", f"{per['floor_main']:,} (durable_floor.py's, same frames and commit)"),
        ("throwaway worker", f"{per['floor_worker']:,}"),
        ("code measured", f"{os.getcwd()} at {commit}"),
    ], {"round_trips": count, "commit": commit, "main_instructions_per_round_trip": per["main"],
        "worker_instructions_per_round_trip": per["worker"],
        "floor_main_instructions_per_round_trip": per["floor_main"],
        "floor_worker_instructions_per_round_trip": per["floor_worker"]})


if __name__ == "__main__":
    main()
