"""The same no-op workload on Ray and on retire-cluster, in one run, with the issue's round-trip target scaled.

    python benchmarks/vs_ray.py [--quick] [--tasks N] [--round-trips N]

Ray: a local instance with `num_cpus=2` (2 worker processes), no dashboard,
`_node_ip_address="127.0.0.1"`, its session files in a temporary directory;
a no-op `@ray.remote` function: 100 tasks to warm up, N tasks submitted and
gathered with one `ray.get` (tasks/s), then 50 warm-up round trips and N
single round trips `ray.get(noop.remote(i))` (p50/p99). retire-cluster:
benchmarks/tasks.py's workload (2 real workers, `echo`, synchronous=normal),
as in vs_dask.py.

Issue 7's round-trip target (0.5 ms p50) was set on a machine where Ray took
1.4 ms, so the target scaled to this run is ray_p50 * 0.5 / 1.4: the script
prints that bound and whether our p50 meets it, with both ratios.

Ray is run in a network namespace that has only a loopback interface: the
script re-runs its Ray part as a subprocess under
`unshare -rn sh -c 'ip link set lo up && exec python vs_ray.py --ray-part ...'`
and reads its result (a JSON line) from stdout. With `_node_ip_address` its
listeners are on 127.0.0.1, but Ray still tries addresses outside this
machine (the cloud metadata address 169.254.169.254 and the DNS resolver,
looking for TPUs and a cloud provider; its log says it also tries 8.8.8.8 to
find the node's IP), which the namespace makes "network unreachable". Also
set for that subprocess: HOME (so ~/.ray) in a temporary directory,
RAY_USAGE_STATS_ENABLED=0 and RAY_AUTH_MODE=disabled. Needs `unshare` and
`ip` (util-linux, iproute2), root or unprivileged user namespaces, and the
`bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import comparison_args, emit_comparison, is_loopback, percentile

#: The Ray part's whole run, startup and shutdown included, in seconds.
RAY_PART_TIMEOUT_S = 1_800


def noop(x: int) -> int:
    return x


def loopback_listeners() -> list[str]:
    """Every listening TCP socket and bound UDP socket of this network namespace, as address:port."""
    import psutil

    found = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN or (conn.status == psutil.CONN_NONE and not conn.raddr):
            found.add(f"{conn.laddr.ip}:{conn.laddr.port}")
    return sorted(found)


def ray_part(tasks: int, round_trips: int) -> dict[str, Any]:
    """Run in the namespace (see the docstring): start Ray, measure, shut it down."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rc-ray-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
                 object_store_memory=256 * 2**20, log_to_driver=False, logging_level="warning")
        try:
            remote_noop = ray.remote(noop)
            ray.get([remote_noop.remote(i) for i in range(100)])  # both workers up and warm
            t0 = time.perf_counter()
            ray.get([remote_noop.remote(i) for i in range(tasks)])
            elapsed = time.perf_counter() - t0
            for i in range(50):
                ray.get(remote_noop.remote(i))
            samples = []
            for i in range(round_trips):
                start = time.perf_counter()
                ray.get(remote_noop.remote(i))
                samples.append(time.perf_counter() - start)
            listeners = loopback_listeners()
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    samples.sort()
    return {"version": ray.__version__, "tasks_per_s": round(tasks / elapsed),
            "round_trip_p50_ms": round(1000 * percentile(samples, 0.5), 3),
            "round_trip_p99_ms": round(1000 * percentile(samples, 0.99), 3), "listeners": listeners}


def ray_run(tasks: int, round_trips: int) -> dict[str, Any]:
    """ray_part() in a subprocess in a new network namespace with only loopback; its JSON line back."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"vs_ray.py runs Ray in a network namespace and needs `{tool}`, which is not on PATH.")
    home = tempfile.TemporaryDirectory(prefix="rc-ray-home-")
    child_env = dict(os.environ, HOME=home.name, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
           sys.executable, str(Path(__file__).resolve()), "--ray-part",
           "--tasks", str(tasks), "--round-trips", str(round_trips)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RAY_PART_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"the Ray part did not finish within {RAY_PART_TIMEOUT_S} s") from None
    finally:
        # Anything of Ray's still in the process group (the group is the subprocess's own session).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        home.cleanup()
    for line in reversed(out.splitlines()):
        if line.startswith('{"ray_part"'):
            return json.loads(line)["ray_part"]
    sys.stderr.write(err[-4_000:])
    raise RuntimeError(f"the Ray part (exit status {proc.returncode}) printed no result; its stderr is above")


def main() -> None:
    args = comparison_args(__doc__, "--ray-part")
    if args.ray_part:
        print(json.dumps({"ray_part": ray_part(args.tasks, args.round_trips)}), flush=True)
        return
    from tasks import measure

    ray_result = ray_run(args.tasks, args.round_trips)
    not_loopback = [a for a in ray_result["listeners"] if not is_loopback(a)]
    if not_loopback:
        raise RuntimeError(f"Ray listened on {not_loopback} (in its namespace), not only on loopback")
    ours = measure("normal", args.tasks, args.round_trips, 2_000)
    emit_comparison("ray", f"ray {ray_result['version']}", ray_result, ours, args,
                    [("ray's listeners (its namespace)", ", ".join(ray_result["listeners"]))], {})


if __name__ == "__main__":
    main()
