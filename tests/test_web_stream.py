"""/stream/*: Server-Sent Events fed by the node's events, with ids, resume and keep-alive."""

from __future__ import annotations

import logging

import webutil
from conftest import Peer
from webutil import SSE, WORKER_ID, Cluster, eventually, open_stream

from retire_cluster.web.events import Stream, Subscriber

cluster = webutil.cluster  # the fixture: a node serving HTTP on port 0 and a real worker


def is_final(task_id: str):
    return lambda e: e.get("event") == "task" and e["data"]["task_id"] == task_id and e["data"]["status"] in (
        "completed", "failed", "cancelled", "timeout")


async def test_task_events_are_what_tcp_subscribers_get(cluster: Cluster) -> None:
    peer = await Peer.connect(cluster.node)
    await peer.ok("subscribe", {})
    resp = await open_stream(cluster, "/stream/tasks")
    try:
        sse = SSE(resp)
        task_id = await cluster.submit("sleep", {"seconds": 2.5})
        events = await sse.until(is_final(task_id))
        assert sse.retry == 2000
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        over_sse = [(e["data"]["status"], e["data"]["progress"]) for e in events]
        # The first publish may come after the assignment (same group commit as the
        # insert), or after the worker's ack if that came before the commit ended.
        assert over_sse[0][0] in ("pending", "assigned", "running") and over_sse[-1][0] == "completed"
        assert any(status == "running" and progress is not None and 0 < progress < 100
                   for status, progress in over_sse), over_sse
        over_tcp = []
        while not over_tcp or over_tcp[-1][0] != "completed":
            push = await peer.next_push("task_update")
            over_tcp.append((push["data"]["task"]["status"], push["data"]["task"]["progress"]))
        assert over_tcp == over_sse
        assert events[-1]["data"]["result"]["output"] == "slept 2.5 s"
    finally:
        resp.close()


async def test_last_event_id_resumes_without_gaps_or_repeats(cluster: Cluster) -> None:
    resp = await open_stream(cluster, "/stream/tasks")
    first = await cluster.submit("echo", {"message": "one"})
    seen = await SSE(resp).until(is_final(first))
    resp.close()
    last = seen[-1]["id"]
    second = await cluster.submit("echo", {"message": "two"})  # while nobody listens
    await cluster.wait_task(second)
    resp = await open_stream(cluster, "/stream/tasks", **{"Last-Event-ID": str(last)})
    try:
        missed = await SSE(resp).until(is_final(second))
        assert missed[0]["id"] == last + 1
        assert [e["id"] for e in missed] == list(range(last + 1, last + 1 + len(missed)))
        # (the first task's final state may be published twice: once per commit callback)
        assert second in {e["data"]["task_id"] for e in missed} <= {first, second}
    finally:
        resp.close()


async def test_resume_from_a_forgotten_or_future_id_says_reset(cluster: Cluster) -> None:
    stream = cluster.node.web.streams["tasks"]
    for i in range(1100):  # more than the ring keeps
        stream.emit("task", {"task_id": f"t{i}", "status": "pending"}, f"t{i}")
    for stale in ("1", "999999", "garbage"):
        resp = await open_stream(cluster, "/stream/tasks", **{"Last-Event-ID": stale})
        try:
            event = await SSE(resp).next()
            assert event["event"] == "reset" and event["id"] == stream.last_id, stale
        finally:
            resp.close()


async def test_a_stream_can_follow_some_tasks_only(cluster: Cluster) -> None:
    wanted = await cluster.submit("sleep", {"seconds": 30})
    resp = await open_stream(cluster, f"/stream/tasks?task_id={wanted}")
    try:
        other = await cluster.submit("echo", {"message": "not this one"})
        await cluster.wait_task(other)
        await cluster.ok("DELETE", f"/api/v1/tasks/{wanted}")
        events = await SSE(resp).until(is_final(wanted))
        assert {e["data"]["task_id"] for e in events} == {wanted}
    finally:
        resp.close()


async def test_devices_stream_starts_with_a_snapshot_then_follows_changes(cluster: Cluster) -> None:
    resp = await open_stream(cluster, "/stream/devices")
    try:
        sse = SSE(resp)
        snapshot = await sse.next()
        assert snapshot["event"] == "snapshot"
        assert [d["device_id"] for d in snapshot["data"]["devices"]] == [WORKER_ID]
        change = await sse.next()  # the next heartbeat
        assert change["event"] == "device" and change["data"]["device_id"] == WORKER_ID
        assert change["id"] > snapshot["id"]
    finally:
        resp.close()


async def test_idle_streams_get_keep_alive_comments(cluster: Cluster) -> None:
    cluster.node.web.keepalive_s = 0.05
    resp = await open_stream(cluster, "/stream/logs?level=critical")
    try:
        async def comment():
            line = await resp.content.readline()
            return line if line.startswith(b":") else None

        assert await eventually(comment, every=0) == b": keep-alive\n"
    finally:
        resp.close()


async def test_logs_stream_carries_the_node_log_filtered_by_level(cluster: Cluster) -> None:
    resp = await open_stream(cluster, "/stream/logs?level=error")
    try:
        log = logging.getLogger("retire_cluster.main")
        log.warning("a warning the error stream skips")
        log.error("disk %s is full", "/dev/sda")
        event = await SSE(resp).next()
        assert event["event"] == "log"
        assert event["data"]["message"] == "disk /dev/sda is full" and event["data"]["level"] == "error"
        assert event["data"]["logger"] == "retire_cluster.main"
    finally:
        resp.close()
    status, body = await cluster.get("/stream/logs?level=loud")
    assert status == 400 and body["path"] == "?level"


async def test_stopping_the_node_ends_open_streams(cluster: Cluster) -> None:
    resp = await open_stream(cluster, "/stream/tasks")
    await eventually(lambda: _true(cluster.node.web.open_streams == 1))
    await cluster.node.web.stop()
    assert await resp.content.read() == b"retry: 2000\n\n"
    assert cluster.node.web.open_streams == 0
    resp.close()


async def _true(value: bool) -> bool:
    return value


# -- the ring buffer and subscribers, without HTTP --------------------------------------------


async def test_stream_ring_resume_and_slow_subscribers() -> None:
    stream = Stream("tasks", ring_size=3)
    for n in range(5):
        stream.emit("task", {"n": n}, "k")
    assert stream.last_id == 5
    sub = Subscriber()
    assert stream.subscribe(sub, "3") is True
    assert sub.take() == b'id: 4\nevent: task\ndata: {"n":3}\n\nid: 5\nevent: task\ndata: {"n":4}\n\n'
    assert stream.subscribe(Subscriber(), "1") is False  # events 2 was evicted
    assert stream.subscribe(Subscriber(), "2") is True  # 3, 4, 5 are all still there
    assert stream.subscribe(Subscriber(), "6") is False  # from before a restart
    slow = Subscriber(max_pending=2)
    stream.subscribe(slow, None)
    for n in range(3):
        stream.emit("task", {"n": n}, "k")
    assert slow.dropped and slow.closed
    picky = Subscriber(accept=lambda key: key == "mine")
    stream.subscribe(picky, None)
    stream.emit("task", {}, "other")
    stream.emit("task", {}, "mine")
    assert picky.take().count(b"event: task") == 1
