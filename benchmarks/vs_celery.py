"""The same no-op workload on Celery with Redis and on retire-cluster, in one run, with the issue's target scaled.

    python benchmarks/vs_celery.py [--quick] [--tasks N] [--round-trips N]

Celery: the script starts its own `redis-server` on 127.0.0.1 (a free port,
no persistence: `--save '' --appendonly no`, in a temporary directory) as
broker and result backend, and a worker as a subprocess (`celery -A vs_celery
worker --concurrency 2 --pool prefork --without-gossip --without-mingle
--without-heartbeat`: 2 worker processes, like our 2 workers); a no-op task:
100 tasks and 50 round trips to warm up, N tasks sent with `.delay()` and
gathered (tasks/s), then single round trips `.delay(i).get()` (p50/p99).
retire-cluster: benchmarks/tasks.py's workload (2 real workers, `echo`,
synchronous=normal), as in vs_dask.py.

Issue 7's round-trip target (0.5 ms p50) was set on a machine where Celery
took 1.7 ms, so the target scaled to this run is celery_p50 * 0.5 / 1.7: the
script prints that bound and whether our p50 meets it, with both ratios. It
also checks that every listening socket of redis-server and the Celery worker,
and every peer they talk to, is on 127.0.0.1, and stops both at the end.
Needs `redis-server` (the Debian package redis-server) and the `bench` extra:
pip install -e '.[bench]'.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from _harness import comparison_args, emit_comparison, env, is_loopback, percentile

try:
    from celery import Celery
    from celery.result import ResultSet
except ImportError:  # pragma: no cover
    comparison_args(__doc__)  # --help works without the bench extra (it prints the usage and exits)
    sys.exit("vs_celery.py needs Celery and redis-py, from the bench extra: pip install -e '.[bench]'")

#: The worker reads the broker's address from this variable (it imports this module by name).
REDIS_URL_ENV = "RC_BENCH_CELERY_REDIS"
HERE = Path(__file__).resolve().parent

app = Celery("vs_celery")
app.conf.update(broker_url=os.environ.get(REDIS_URL_ENV), result_backend=os.environ.get(REDIS_URL_ENV),
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="vs_celery.noop")
def noop(x: int) -> int:
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL to whatever is left of its process group (its own session)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def sockets_of(procs: list[psutil.Process]) -> tuple[list[str], list[str]]:
    """The listening addresses and the peers of these processes and their children, as 'name address:port'."""
    listeners, peers = set(), set()
    for parent in procs:
        for proc in [parent, *parent.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.status == psutil.CONN_NONE and not conn.raddr):
                    listeners.add(f"{proc.name()} {conn.laddr.ip}:{conn.laddr.port}")
                elif conn.raddr:
                    peers.add(f"{proc.name()} {conn.raddr.ip}:{conn.raddr.port}")
    return sorted(listeners), sorted(peers)


def celery_run(tasks: int, round_trips: int) -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("vs_celery.py needs redis-server (the Debian package redis-server), which is not on PATH.")
    tmp = tempfile.TemporaryDirectory(prefix="rc-celery-")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_log = Path(tmp.name) / "redis.log"
    worker_log = Path(tmp.name) / "worker.log"
    redis_proc = subprocess.Popen(
        [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", tmp.name, "--logfile", str(redis_log), "--daemonize", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker_proc: subprocess.Popen[bytes] | None = None
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if redis_proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {redis_log.read_text()[-2_000:]}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("redis-server did not answer within 10 s")
        client.close()
        redis_version = subprocess.run([redis_server, "--version"], capture_output=True, text=True).stdout.split()
        app.conf.update(broker_url=url, result_backend=url)
        with worker_log.open("wb") as log:
            worker_proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "vs_celery", "worker", "--concurrency", "2",
                 "--pool", "prefork", "--loglevel", "warning", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "--hostname", "vs-celery@127.0.0.1"],
                cwd=HERE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(env(), **{REDIS_URL_ENV: url}))
        try:
            noop.delay(0).get(timeout=60)
        except Exception as exc:
            raise RuntimeError(f"the Celery worker did not answer: {exc!r}\n{worker_log.read_text()[-4_000:]}") from exc
        ResultSet([noop.delay(i) for i in range(100)]).get(timeout=60)
        for i in range(50):
            noop.delay(i).get(timeout=60)
        t0 = time.perf_counter()
        results = [noop.delay(i) for i in range(tasks)]
        ResultSet(results).get(timeout=600)
        elapsed = time.perf_counter() - t0
        del results
        samples = []
        for i in range(round_trips):
            start = time.perf_counter()
            noop.delay(i).get(timeout=60)
            samples.append(time.perf_counter() - start)
        listeners, peers = sockets_of([psutil.Process(redis_proc.pid), psutil.Process(worker_proc.pid)])
    finally:
        app.close()
        if worker_proc is not None:
            stop(worker_proc)
        stop(redis_proc)
        tmp.cleanup()
    samples.sort()
    import celery

    return {"version": celery.__version__, "redis_server": next((w for w in redis_version if w.startswith("v=")), "?"),
            "tasks_per_s": round(tasks / elapsed), "round_trip_p50_ms": round(1000 * percentile(samples, 0.5), 3),
            "round_trip_p99_ms": round(1000 * percentile(samples, 0.99), 3), "listeners": listeners, "peers": peers}


def main() -> None:
    args = comparison_args(__doc__)
    from tasks import measure

    celery_result = celery_run(args.tasks, args.round_trips)
    not_loopback = [a for a in celery_result["listeners"] + celery_result["peers"] if not is_loopback(a)]
    if not_loopback:
        raise RuntimeError(f"redis-server or the Celery worker used {not_loopback}, not only 127.0.0.1")
    ours = measure("normal", args.tasks, args.round_trips, 2_000)
    emit_comparison("celery", f"celery {celery_result['version']} + redis {celery_result['redis_server'][2:]}",
                    celery_result, ours, args,
                    [("redis and worker listeners", ", ".join(celery_result["listeners"]))], {})


if __name__ == "__main__":
    main()
