"""Heartbeats per second from many persistent device connections.

    python benchmarks/heartbeats.py [--quick] [--connections N ...] [--seconds S]

Each connection registers, then sends a heartbeat as soon as the previous one
is acknowledged (one in flight per device). Reports heartbeats/s, p50/p99
latency, and the main node's CPU use and RSS. Default: 1,000 and 10,000
connections.

Then the same load at 1,000 connections against a throwaway server, as
DESIGN.md's performance facts measured it (uvloop, asyncio.Protocol, orjson:
each line parsed and answered with an ack, the acks of one read written
at once; no validation, no registry, no store): the most heartbeats/s this
machine gives in that phase, and ours as a share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

from _harness import MainNode, connect, emit, env, percentile, raise_nofile, register_frame, run


async def serve_floor() -> None:
    """The throwaway: every line is parsed and answered with an ack; one write per read."""
    import orjson

    class Floor(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            *lines, self.buf = (self.buf + data).split(b"\n")
            out = []
            for line in lines:
                msg = orjson.loads(line)
                out.append(orjson.dumps({"message_type": "ack", "message_id": "a", "sender_id": "main-node",
                                         "data": {"original_message_id": msg["message_id"], "result": {}}}) + b"\n")
            self.transport.write(b"".join(out))

    server = await asyncio.get_running_loop().create_server(Floor, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class FloorNode(MainNode):
    """The throwaway server in a subprocess, with what measure() uses of a MainNode."""

    def start(self) -> FloorNode:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-floor"], stdout=subprocess.PIPE, text=True,
                                     env=env())
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    @property
    def token(self) -> str:
        return "floor"


async def measure(node: MainNode, connections: int, seconds: float) -> dict:
    token = node.token
    registered = 0
    all_registered = asyncio.Event()
    state = {"measuring": False, "count": 0}
    latencies: list[float] = []
    beat = {"message_type": "heartbeat", "message_id": "h", "sender_id": "", "data": {
        "system_metrics": {"cpu_usage": 12.5, "memory_usage": 40.0, "disk_usage": 10.0,
                           "load_average": [0.1, 0.2, 0.3], "uptime": 1000.0},
        "status": "online", "active_tasks": 0}}

    def on_line(client, msg) -> None:
        nonlocal registered
        if msg["data"].get("original_message_id") == "r":
            registered += 1
            if registered == connections:
                all_registered.set()
            return
        now = time.perf_counter()
        if state["measuring"]:
            state["count"] += 1
            latencies.append(now - client.user[1])
        if not state.get("stop"):
            client.user = (client.user[0], time.perf_counter())
            client.send(client.user[0])

    clients = []
    for i in range(connections):
        c = await connect(node.port, on_line)
        frame = dict(beat, sender_id=f"hb-{i:05d}")
        c.user = (frame, 0.0)
        c.send(register_frame(f"hb-{i:05d}", token))
        clients.append(c)
        if i % 500 == 499:
            await asyncio.sleep(0)
    await asyncio.wait_for(all_registered.wait(), 120)
    rss_idle = node.rss_mib()
    for c in clients:
        c.user = (c.user[0], time.perf_counter())
        c.send(c.user[0])
    await asyncio.sleep(1.0)  # warm up
    cpu0, t0 = node.cpu_s(), time.perf_counter()
    state["measuring"] = True
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed, cpu = time.perf_counter() - t0, node.cpu_s() - cpu0
    state["stop"] = True
    rss = node.rss_mib()
    for c in clients:
        c.transport.close()
    latencies.sort()
    return {
        "connections": connections, "heartbeats_per_s": round(state["count"] / elapsed),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 3), "p99_ms": round(1000 * percentile(latencies, 0.99), 3),
        "main_cpu_pct": round(100 * cpu / elapsed, 1), "main_rss_mib": round(rss, 1),
        "main_rss_idle_mib": round(rss_idle, 1),
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve-floor"]:
        run(serve_floor())
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 connections for 3 s")
    ap.add_argument("--connections", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if args.quick:
        args.connections, args.seconds = [1000], 3.0
    limit = raise_nofile()
    rows = []
    for n in args.connections:
        if n + 100 > limit:
            print(f"skipping {n} connections: open-files limit is {limit}")
            continue
        node = MainNode("--synchronous", "normal").start()
        try:
            rows.append(run(measure(node, n, args.seconds)))
        finally:
            node.stop()
    table = [(f"{r['connections']} connections", f"{r['heartbeats_per_s']:,} heartbeats/s  p50 {r['p50_ms']} ms  "
              f"p99 {r['p99_ms']} ms  main CPU {r['main_cpu_pct']}%  RSS {r['main_rss_mib']} MiB") for r in rows]
    extra: dict[str, Any] = {"results": rows}
    if rows and rows[0]["connections"] == 1000:
        floor = FloorNode().start()
        try:
            best = run(measure(floor, 1000, args.seconds))
        finally:
            floor.stop()
        share = round(rows[0]["heartbeats_per_s"] / best["heartbeats_per_s"], 2)
        table.append(("throwaway server, 1000", f"{best['heartbeats_per_s']:,} heartbeats/s  p50 {best['p50_ms']} ms  "
                                               f"server CPU {best['main_cpu_pct']}%  (ours: {share:.0%} of it)"))
        extra["floor"] = {k: best[k] for k in ("connections", "heartbeats_per_s", "p50_ms", "p99_ms", "main_cpu_pct")}
        extra["share_of_floor"] = share
    emit("heartbeats", table, extra)


if __name__ == "__main__":
    main()
