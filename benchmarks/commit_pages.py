"""One waited task's commit, on the store's schema and on schema 2's, in the same run.

    python benchmarks/commit_pages.py [--quick] [--stored N] [--commits N]

The commit that ends a waited round trip carries the task's row (its insert
folded with its final state) and its attempt. This script times that commit
in one thread, with sqlite3 and the main node's pragmas (WAL, synchronous
NORMAL, foreign keys), on a database that already holds N tasks: once with
the schema the store creates now and once with schema 2's (before 8491ba0:
8 b-tree pages per such commit, now 4), alternating, and prints the p50, the
p90 and the mean (the mean carries the WAL checkpoints, every 1,000 pages)
and the WAL frames each commit wrote. The main node runs the same statements
(`Store.insert_task`, `Store.update_task`) in aiosqlite's thread; there the
step takes longer (benchmarks/round_trip_trace.py), as its caches are cold.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from _harness import REPO, emit, percentile  # noqa: F401 - REPO puts the repository on sys.path

from retire_cluster.main.store import _INSERT_TASK, _UPSERT_ATTEMPT, MIGRATIONS


def _row(seq: int) -> tuple[tuple[object, ...], tuple[object, ...]]:
    task_id = os.urandom(8).hex()  # as MainNode.new_task_id: 64 random bits
    task = (task_id, seq, "echo", '{"message":"x"}', 5, 3600.0, "{}", 3, 0, None, "completed", 1, 0, "w1",
            '{"output":"x"}', None, 0.00001, 1.0, 1.0, 1.0, 1.0)
    return task, (task_id, 1, "w1", 1.0, 1.0, 1.0, "completed")


def measure(path: Path, migrations: list[str], stored: int, commits: int) -> dict[str, float]:
    db = sqlite3.connect(path, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for script in migrations:
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript(script)
    db.execute("PRAGMA foreign_keys=ON")
    for seq in range(1, stored + 1):
        task, attempt = _row(seq)
        db.execute(_INSERT_TASK, task)
        db.execute(_UPSERT_ATTEMPT, attempt)
        if seq % 1000 == 0:
            db.commit()
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    wal = Path(f"{path}-wal")
    samples, frames = [], []
    for seq in range(stored + 1, stored + commits + 1):
        task, attempt = _row(seq)
        before = wal.stat().st_size if wal.exists() else 0
        start = time.perf_counter()
        db.execute(_INSERT_TASK, task)
        db.execute(_UPSERT_ATTEMPT, attempt)
        db.commit()
        samples.append(time.perf_counter() - start)
        after = wal.stat().st_size
        if after > before:  # not the commit that restarted the WAL after a checkpoint
            frames.append((after - max(before, 32)) // (24 + page))
    db.close()
    samples.sort()
    return {"p50_us": round(percentile(samples, 0.5) * 1e6, 1), "p90_us": round(percentile(samples, 0.9) * 1e6, 1),
            "mean_us": round(statistics.mean(samples) * 1e6, 1), "wal_frames": statistics.median(frames)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 stored tasks, 1,000 commits")
    ap.add_argument("--stored", type=int, default=20_000)
    ap.add_argument("--commits", type=int, default=3_000)
    args = ap.parse_args()
    stored, commits, rounds = (5_000, 1_000, 2) if args.quick else (args.stored, args.commits, 2)
    sides = {"schema 2": MIGRATIONS[:2], f"schema {len(MIGRATIONS)} (now)": MIGRATIONS}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="rc-commit-") as tmp:
        for n in range(rounds):
            for name, migrations in sides.items():
                results[name].append(measure(Path(tmp) / f"{n}-{len(migrations)}.db", migrations, stored, commits))
    table, extra = [], {"stored": stored, "commits": commits, "rounds": rounds, "results": {}}
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["p50_us"])
        table.append((name, f"p50 {best['p50_us']:6.1f} us  p90 {best['p90_us']:6.1f}  mean {best['mean_us']:6.1f}  "
                            f"WAL frames per commit {best['wal_frames']:g}  (the better of {len(runs)})"))
        extra["results"][name] = runs
    emit("commit_pages", table, extra)


if __name__ == "__main__":
    main()
