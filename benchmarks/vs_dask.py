"""The same no-op workload on Dask distributed and on retire-cluster, in one run.

    python benchmarks/vs_dask.py [--quick] [--tasks N]

Dask: LocalCluster with 2 worker processes, 1 thread each,
`distributed.scheduler.worker-saturation: inf` (its fastest setting for many
small tasks); N no-op tasks submitted with client.map and gathered, then 200
single round trips. retire-cluster: benchmarks/tasks.py's workload (2 real
workers, `echo`, synchronous=normal). Prints both and the ratio. Needs the
`bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import time

from _harness import comparison_args, emit, percentile


def noop(x: int) -> int:
    return x


def dask_run(tasks: int, round_trips: int) -> dict:
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.worker-saturation": float("inf")}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            client.gather(client.map(noop, range(100), key=[f"warm-{i}" for i in range(100)]))
            t0 = time.perf_counter()
            futures = client.map(noop, range(tasks), key=[f"noop-{i}" for i in range(tasks)])
            client.gather(futures)
            elapsed = time.perf_counter() - t0
            del futures
            samples = []
            for i in range(round_trips):
                start = time.perf_counter()
                client.submit(noop, i, key=f"rt-{i}").result()
                samples.append(time.perf_counter() - start)
    samples.sort()
    return {"tasks_per_s": round(tasks / elapsed), "round_trip_p50_ms": round(1000 * percentile(samples, 0.5), 3),
            "round_trip_p99_ms": round(1000 * percentile(samples, 0.99), 3)}


def main() -> None:
    args = comparison_args(__doc__)
    from tasks import measure

    dask_result = dask_run(args.tasks, args.round_trips)
    ours = measure("normal", args.tasks, args.round_trips, 2_000)
    ratio = round(ours["tasks_per_s"] / dask_result["tasks_per_s"], 2)
    emit("vs_dask", [
        ("dask distributed", f"{dask_result['tasks_per_s']:,} tasks/s  round trip p50 "
                             f"{dask_result['round_trip_p50_ms']} ms"),
        ("retire-cluster", f"{ours['tasks_per_s']:,} tasks/s  round trip p50 {ours['round_trip_p50_ms']} ms"),
        ("ratio (ours / dask)", f"{ratio}x"),
    ], {"tasks": args.tasks, "dask": dask_result, "retire_cluster": ours, "ratio": ratio})


if __name__ == "__main__":
    main()
