"""Registrations per second and main-node memory per connected idle device.

    python benchmarks/registrations.py [--quick] [--devices N]

Opens N connections (distinct device ids) that each send `register`, as fast
as the acknowledgements come back (at most --window awaiting theirs), then leaves them connected and idle and
measures the main node's RSS growth per device. Default 10,000 devices.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _harness import MainNode, connect, emit, raise_nofile, register_frame, run


async def measure(node: MainNode, devices: int, window: int) -> dict:
    token = node.token
    done = asyncio.Event()
    acked = 0

    def on_line(client, msg) -> None:
        nonlocal acked
        if msg["message_type"] == "ack":
            acked += 1
            sem.release()  # the window counts registrations not yet acknowledged
            if acked == devices:
                done.set()
        elif msg["message_type"] == "error":
            raise RuntimeError(f"register refused: {msg['data']}")

    await asyncio.sleep(0.5)
    rss_before = node.rss_mib()
    sem = asyncio.Semaphore(window)
    clients = []

    async def one(i: int) -> None:
        await sem.acquire()  # released by the acknowledgement
        c = await connect(node.port, on_line)
        c.send(register_frame(f"reg-{i:06d}", token))
        clients.append(c)

    t0, cpu0, own0 = time.perf_counter(), node.cpu_s(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(devices)))
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - t0
    main_cpu, load_cpu = node.cpu_s() - cpu0, time.process_time() - own0
    await asyncio.sleep(1.0)  # let write-behind and allocator settle
    rss_after = node.rss_mib()
    for c in clients:
        c.transport.close()
    return {"devices": devices, "registrations_per_s": round(devices / elapsed), "seconds": round(elapsed, 2),
            "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
            "rss_per_idle_device_kib": round((rss_after - rss_before) * 1024 / devices, 2),
            "main_cpu_pct": round(100 * main_cpu / elapsed, 1), "load_cpu_pct": round(100 * load_cpu / elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 devices")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=500, help="registrations awaiting their ack at once")
    args = ap.parse_args()
    if args.quick:
        args.devices = 2_000
    limit = raise_nofile()
    if args.devices + 100 > limit:
        raise SystemExit(f"--devices {args.devices} needs more open files than the limit {limit}")
    node = MainNode("--synchronous", "normal").start()
    try:
        result = run(measure(node, args.devices, args.window))
    finally:
        node.stop()
    emit("registrations", [
        (f"{result['devices']} devices", f"{result['registrations_per_s']:,} registrations/s  main CPU "
                                         f"{result['main_cpu_pct']}%  load generator CPU {result['load_cpu_pct']}%"),
        ("RSS per idle device", f"{result['rss_per_idle_device_kib']} KiB "
                                f"({result['rss_before_mib']} -> {result['rss_after_mib']} MiB)"),
    ], result)


if __name__ == "__main__":
    main()
