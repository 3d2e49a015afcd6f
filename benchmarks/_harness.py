"""Shared pieces of the benchmarks: start the real main node, measure it, drive raw load.

Everything talks to 127.0.0.1 only. The load runs in this process on uvloop
(when importable) with a bare asyncio.Protocol per connection, so the
client side costs as little as possible; the main node is a separate process.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

try:
    import orjson

    dumps = orjson.dumps
    loads = orjson.loads
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads


#: A KVM guest's halt polling (the haltpoll cpuidle driver): how long an idle virtual CPU polls before it
#: halts, which decides what waking it costs (halt_polling.py measures it).
HALT_POLL_KNOB = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def machine_line() -> str:
    """The machine in one line; on a KVM guest with the haltpoll driver, its idle CPUs' polling too."""
    cpu = platform.processor() or platform.machine()
    line = (f"{os.cpu_count()} cores {cpu}, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    try:
        return f"{line}, idle vCPUs poll {int(HALT_POLL_KNOB.read_text()):,} ns before halting"
    except (OSError, ValueError):  # not such a guest
        return line


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _no_http() -> list[str]:
    """--no-http when this version has a web dashboard (benchmarks measure the TCP node)."""
    out = subprocess.run([sys.executable, "-m", "retire_cluster", "main", "--help"], capture_output=True,
                         text=True, env=env())
    return ["--no-http"] if "--no-http" in out.stdout else []


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds ``proc``'s live threads have used so far (user and system).

    On Linux the scheduler's own count, in nanoseconds (``/proc/PID/task/*/schedstat``):
    psutil's user and system times come in clock ticks of 10 ms, as coarse as a
    few dozen round trips. Elsewhere psutil's.
    """
    tids = _thread_ids(proc.pid)
    if not tids:
        t = proc.cpu_times()
        return t.user + t.system
    return sum(_thread_cpu_ns(proc.pid, tid) for tid in tids) / 1e9


def _thread_ids(pid: int) -> list[str]:
    """The ids of process ``pid``'s live threads; none off Linux."""
    tasks = f"/proc/{pid}/task"
    return os.listdir(tasks) if os.path.isdir(tasks) else []


def loop_thread_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of ``proc``'s first thread (its event loop's, in our processes) so far; 0 where not known.

    With :func:`cpu_s` it splits the main node's CPU into the event loop's and
    the other threads' (SQLite's: the commits).
    """
    return _thread_cpu_ns(proc.pid, str(proc.pid)) / 1e9


#: Clock ticks per second of /proc's utime and stime (100 on Linux)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def user_kernel_s(pid: int, thread_only: bool = False) -> tuple[float, float]:
    """(user, kernel) CPU seconds of process ``pid``'s live threads so far, or of its first thread only
    (its event loop's, in our processes); (0, 0) off Linux.

    From ``/proc/PID/task/TID/stat`` in clock ticks (10 ms): take it over a thousand round trips or more.
    Which part of a round trip's CPU is our own code (user) and which the system calls it makes (kernel).
    """
    tids = [str(pid)] if thread_only else _thread_ids(pid)
    user = kernel = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        user, kernel = user + int(fields[11]), kernel + int(fields[12])
    return user / _CLK_TCK, kernel / _CLK_TCK


def _thread_cpu_ns(pid: int, tid: str) -> int:
    """The scheduler's count of a thread's CPU time (ns); 0 when it ended meanwhile, or off Linux."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class MainNode:
    """`retire-cluster main` in a subprocess on a free port.

    Connection caps are raised (a config file) so that thousands of simulated
    devices may come from 127.0.0.1, and so is the per-connection request rate
    limit, so that one client can load the node.
    """

    def __init__(self, *args: str, data_dir: Path | None = None, connections: int = 19_000,
                 prefix: tuple[str, ...] = ()) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="rc-bench-")
        self.data_dir = data_dir or Path(self.tmp.name) / "main"
        conf = Path(self.tmp.name) / "bench-main.json"
        conf.write_text(json.dumps({"max_connections": connections, "max_connections_per_address": connections,
                                    # the per-connection request rate limit (a safety default, 5,000/s)
                                    # would cap a single load-generating client
                                    "client_rate_per_s": 1_000_000.0, "client_burst": 1_000_000}))
        self.args = ("--config", str(conf), *args)
        self.prefix = prefix  # a command that runs the node's Python (valgrind ..., for instructions.py)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.started_s = 0.0

    def start(self) -> MainNode:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "retire_cluster", "main", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(self.data_dir), "--log-level", "warning", *_no_http(), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("retire-cluster main node") and "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1])
            if line.startswith("  retire-cluster worker"):
                break
        else:
            raise RuntimeError("main node did not start")
        self.started_s = time.perf_counter() - t0
        return self

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def rss_mib(self) -> float:
        return self.process.memory_info().rss / 2**20

    def cpu_s(self) -> float:
        return cpu_s(self.process)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.tmp.cleanup()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ready(script: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """``python script *args`` (after ``prefix``: valgrind, say), once it printed "ready" (the floor
    benchmarks' servers and relays)."""
    proc = subprocess.Popen([*prefix, sys.executable, script, *args], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop_all(procs: list[subprocess.Popen[str]], timeout_s: float = 10) -> None:
    for p in procs:
        p.terminate()
        p.wait(timeout_s)


class Lines(asyncio.Protocol):
    """Newline-delimited frames, each handed whole (newline included) to ``on_line(protocol, line)``.

    The stops of the floor benchmarks (hop_floor.py, durable_floor.py): a
    protocol callback per read, no reader task to wake.
    """

    def __init__(self, on_line: Callable[[Lines, bytes], None]) -> None:
        self.on_line, self.buf = on_line, b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.on_line(self, line + b"\n")


async def timed_lines(port: int, count: int, make_line: Callable[[int], bytes],
                      check: Callable[[bytes], None] | None = None) -> list[float]:
    """Send a line, wait for the reply line, ``count`` times after 100 to warm up; sorted seconds of each."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[bytes]] = []
    transport, _ = await loop.create_connection(lambda: Lines(lambda _c, line: waiting.pop().set_result(line)),
                                                "127.0.0.1", port)
    samples = []
    for i in range(count + 100):
        fut = loop.create_future()
        waiting.append(fut)
        start = time.perf_counter()
        transport.write(make_line(i))
        reply = await fut
        samples.append(time.perf_counter() - start)
        if check is not None:
            check(reply)
    transport.close()
    return sorted(samples[100:])


class LineClient(asyncio.Protocol):
    """One raw connection: send frames, get a callback per received line."""

    def __init__(self, on_line: Callable[[LineClient, dict[str, Any]], None]) -> None:
        self.on_line = on_line
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_event_loop().create_future()
        self.user: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                return
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            self.on_line(self, loads(line))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(dumps(obj) + b"\n")


async def connect(port: int, on_line: Callable[[LineClient, dict[str, Any]], None]) -> LineClient:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: LineClient(on_line), "127.0.0.1", port)
    return proto


class Requester:
    """One client connection that matches each ``ack``/``error`` to its request.

    Pushes (``task_update`` and the like) go to ``on_push``.
    """

    def __init__(self, token: str | None, on_push: Callable[[dict[str, Any]], None], sender_id: str = "bench") -> None:
        self.token, self.on_push, self.sender_id = token, on_push, sender_id
        self.replies: dict[str, asyncio.Future[Any]] = {}
        self.counter = iter(range(10**12))
        self.client: LineClient | None = None

    async def open(self, port: int) -> Requester:
        self.client = await connect(port, self._on_line)
        return self

    def _on_line(self, _client: LineClient, msg: dict[str, Any]) -> None:
        if msg["message_type"] in ("ack", "error"):
            fut = self.replies.pop(msg["data"].get("original_message_id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            self.on_push(msg)

    def request(self, kind: str, data: dict[str, Any]) -> asyncio.Future[Any]:
        """Send a request; the future resolves to its reply frame."""
        assert self.client is not None
        mid = f"{self.sender_id}-{next(self.counter)}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[mid] = fut
        self.client.send({"message_type": kind, "message_id": mid, "sender_id": self.sender_id,
                          "auth_token": self.token, "data": data})
        return fut

    async def wait_for_devices(self, count: int, timeout_s: float = 60.0) -> None:
        """Poll list_devices until ``count`` devices registered (workers are separate processes)."""
        for _ in range(int(timeout_s * 10)):
            if len((await self.request("list_devices", {}))["data"]["result"]["devices"]) >= count:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"fewer than {count} devices registered within {timeout_s:g} s")

    def close(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


def register_frame(device_id: str, token: str, message_id: str = "r") -> dict[str, Any]:
    return {
        "message_type": "register", "message_id": message_id, "sender_id": device_id, "auth_token": token,
        "data": {
            "device_info": {"hostname": device_id, "platform": "linux", "architecture": "x86_64",
                            "python_version": "3.11.7", "role": "worker"},
            "hardware_specs": {"cpu_cores": 2, "memory_total": 2**31, "disk_space": 2**35,
                               "network_interfaces": ["eth0"]},
            "capabilities": ["computational"], "task_types": ["echo"], "max_concurrent_tasks": 1,
        },
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def emit(name: str, table: list[tuple[str, Any]], extra: dict[str, Any]) -> None:
    width = max(len(k) for k, _ in table)
    print(f"{name} ({machine_line()})")
    for key, value in table:
        print(f"  {key:<{width}}  {value}")
    print(json.dumps({"benchmark": name, "machine": machine_line(), **extra}))


# -- vs_dask.py, vs_ray.py, vs_celery.py --------------------------------------

#: Issue 7's round-trip target (ms), and the round trip (ms) of each reference on the machine where it was
#: set: the target scaled to a run is that reference's p50 in the run x TARGET / its issue figure.
ROUND_TRIP_TARGET_MS = 0.5
ISSUE_ROUND_TRIP_MS = {"ray": 1.4, "celery": 1.7}


def is_loopback(address: str) -> bool:
    """Whether "[name ]ip:port" is on the loopback interface."""
    ip = address.rsplit(" ", 1)[-1].rsplit(":", 1)[0]
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def comparison_args(doc: str, *hidden_flags: str) -> Any:
    """The command line of the vs_*.py scripts: --quick, --tasks, --round-trips (and hidden flags)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 tasks, 100 round trips")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--round-trips", type=int, default=200)
    for flag in hidden_flags:
        ap.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.round_trips = 2_000, 100
    return args


def emit_comparison(reference: str, label: str, theirs: dict[str, Any], ours: dict[str, Any], args: Any,
                    rows: list[tuple[str, Any]], extra: dict[str, Any]) -> None:
    """Both results, both ratios and issue 7's round-trip target scaled to this run: the table and JSON line."""
    issue_ms = ISSUE_ROUND_TRIP_MS[reference]
    ratio = round(ours["tasks_per_s"] / theirs["tasks_per_s"], 2)
    rt_ratio = round(theirs["round_trip_p50_ms"] / ours["round_trip_p50_ms"], 2)
    bound = round(theirs["round_trip_p50_ms"] * ROUND_TRIP_TARGET_MS / issue_ms, 3)
    met = ours["round_trip_p50_ms"] <= bound
    emit(f"vs_{reference}", [
        (label, f"{theirs['tasks_per_s']:,} tasks/s  round trip p50 {theirs['round_trip_p50_ms']} ms  "
                f"p99 {theirs['round_trip_p99_ms']} ms"),
        ("retire-cluster", f"{ours['tasks_per_s']:,} tasks/s  round trip p50 {ours['round_trip_p50_ms']} ms  "
                           f"p99 {ours['round_trip_p99_ms']} ms (AsyncClient.run() p50 "
                           f"{ours['round_trip_client_p50_ms']} ms)"),
        (f"tasks/s ratio (ours / {reference})", f"{ratio}x"),
        (f"round trip ratio ({reference} / ours)", f"{rt_ratio}x"),
        ("round-trip target, scaled", f"p50 <= {bound} ms ({reference} p50 x {ROUND_TRIP_TARGET_MS} / {issue_ms}): "
                                      f"{'met' if met else 'not met'}"),
        *rows,
    ], {"tasks": args.tasks, "round_trips": args.round_trips, reference: theirs, "retire_cluster": ours,
        "ratio": ratio, "round_trip_ratio": rt_ratio,
        "round_trip_target": {"issue_ms": ROUND_TRIP_TARGET_MS, f"issue_{reference}_ms": issue_ms,
                              "scaled_ms": bound, "met": met}, **extra})
