"""The JSON API (/api/v1) against a real main node on port 0 with a real in-process worker."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import webutil
from conftest import REPO, cli_cmd, cli_env, fake_worker, make_config
from webutil import WORKER_ID, Cluster, eventually, open_stream, start_cluster

from retire_cluster.cli import build_main_config
from retire_cluster.main import MainNode
from retire_cluster.web import HTTPBindError

cluster = webutil.cluster  # the fixture: a node serving HTTP on port 0 and a real worker

# -- auth -----------------------------------------------------------------------------


async def test_health_needs_no_token(cluster: Cluster) -> None:
    status, body = await cluster.request("GET", "/api/v1/health", auth=False)
    assert status == 200
    assert body["status"] == "ok" and body["database"] == "ok" and body["auth"] is True
    assert body["version"] and body["uptime"] >= 0


@pytest.mark.parametrize("path", ["/api/v1/cluster/status", "/api/v1/devices", f"/api/v1/devices/{WORKER_ID}",
                                  "/api/v1/tasks", "/api/v1/tasks/x", "/api/v1/openapi.json", "/text/devices",
                                  "/text/status", "/text/tasks", "/metrics", "/text/metrics",
                                  "/stream/tasks", "/stream/devices", "/stream/logs"])
async def test_every_other_route_needs_the_token(cluster: Cluster, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {cluster.node.token}"}):
        status, body = await cluster.request("GET", path, auth=False, headers=headers)
        assert status == 401, (path, headers, body)
        assert body["code"] == "unauthorized" and "retire-cluster token" in body["error"]
    status, body = await cluster.request("POST", "/api/v1/tasks", auth=False, json={"task_type": "echo"})
    assert status == 401 and body["code"] == "unauthorized"
    status, body = await cluster.request("DELETE", "/api/v1/tasks/x", auth=False)
    assert status == 401


async def test_the_page_itself_is_public_and_has_no_data(cluster: Cluster) -> None:
    status, html = await cluster.request("GET", "/", auth=False)
    assert status == 200 and "/static/dashboard.js" in html and WORKER_ID not in html
    status, js = await cluster.request("GET", "/static/dashboard.js", auth=False)
    assert status == 200 and "sessionStorage" in js
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside


async def test_insecure_node_needs_no_token(tmp_path: Path) -> None:
    c = await start_cluster(tmp_path, insecure=True)
    try:
        assert c.node.token is None
        status, body = await c.request("GET", "/api/v1/devices", auth=False)
        assert status == 200 and [d["device_id"] for d in body["devices"]] == [WORKER_ID]
        assert (await c.request("GET", "/api/v1/health", auth=False))[1]["auth"] is False
    finally:
        await c.close()


# -- devices ----------------------------------------------------------------------------


async def test_devices_lists_the_worker_with_filters(cluster: Cluster) -> None:
    devices = (await cluster.ok("GET", "/api/v1/devices"))["devices"]
    assert [d["device_id"] for d in devices] == [WORKER_ID]
    platform = devices[0]["device_info"]["platform"]
    for query, expected in [("status=online", [WORKER_ID]), ("status=offline", []), ("role=worker", [WORKER_ID]),
                            ("role=phone", []), (f"platform={platform}", [WORKER_ID]), ("platform=zz", [])]:
        body = await cluster.ok("GET", f"/api/v1/devices?{query}")
        assert [d["device_id"] for d in body["devices"]] == expected, query
    status, body = await cluster.get("/api/v1/devices?status=sleeping")
    assert status == 400 and body["code"] == "invalid_message" and body["path"] == "?status"
    status, body = await cluster.get("/api/v1/devices?colour=red")
    assert status == 400 and body["code"] == "invalid_message" and body["path"] == "?colour"


async def test_device_detail_has_recent_heartbeats_and_statistics(cluster: Cluster) -> None:
    async def two_heartbeats():
        body = await cluster.ok("GET", f"/api/v1/devices/{WORKER_ID}")
        return body if len(body["heartbeats"]) >= 2 else None

    body = await eventually(two_heartbeats)
    assert body["device"]["device_id"] == WORKER_ID and body["device"]["status"] == "online"
    assert set(body["statistics"]) >= {"requests", "successes", "failures", "average_time"}
    beat = body["heartbeats"][-1]
    assert set(beat) == {"at", "status", "active_tasks", "system_metrics"}
    assert body["heartbeats"][0]["at"] < beat["at"]
    task_id = await cluster.submit("echo", {"message": "hi"})
    await cluster.wait_task(task_id)
    body = await cluster.ok("GET", f"/api/v1/devices/{WORKER_ID}")
    assert [t["task_id"] for t in body["recent_tasks"]] == [task_id]
    assert body["statistics"]["successes"] == 1
    status, body = await cluster.get("/api/v1/devices/nope")
    assert status == 404 and body["code"] == "not_found"


# -- tasks ------------------------------------------------------------------------------


async def test_submit_then_status_and_result(cluster: Cluster) -> None:
    status, body = await cluster.request("POST", "/api/v1/tasks",
                                         json={"task_type": "echo", "payload": {"message": "hello"},
                                               "priority": "high"})
    assert status == 201
    task_id = body["task_id"]
    record = await cluster.wait_task(task_id)
    assert record["result"]["output"] == "hello" and record["priority"] == 10
    assert record["assigned_device"] == WORKER_ID and record["attempt"] == 1
    status, again = await cluster.get(f"/api/v1/tasks/{task_id}")
    assert status == 200 and again["task"]["status"] == "completed"


async def test_submit_with_wait_answers_with_the_ended_task(cluster: Cluster) -> None:
    status, body = await cluster.request("POST", "/api/v1/tasks?wait=30",
                                         json={"task_type": "echo", "payload": {"message": "waited"}})
    assert status == 201
    assert body["task"]["task_id"] == body["task_id"] and body["task"]["status"] == "completed"
    assert body["task"]["result"]["output"] == "waited"
    for bad in ("0", "-1", "3601", "soon"):
        status, body = await cluster.request("POST", f"/api/v1/tasks?wait={bad}", json={"task_type": "echo"})
        assert status == 400 and body["code"] == "invalid_message" and body["path"] == "?wait", (bad, body)
    # wait in the body, as in task_submit's data: before, "Additional properties are not allowed".
    status, body = await cluster.request("POST", "/api/v1/tasks", json={"task_type": "echo", "wait": 5})
    assert (status, body) == (400, {"code": "invalid_message", "path": "$.wait", "error": (
        "wait is not part of the task; ask for it in the query: POST /api/v1/tasks?wait=SECONDS.")})


async def test_submit_is_idempotent_with_a_key(cluster: Cluster) -> None:
    spec = {"task_type": "echo", "payload": {"message": "once"}, "idempotency_key": "k-1"}
    status, first = await cluster.request("POST", "/api/v1/tasks", json=spec)
    status2, second = await cluster.request("POST", "/api/v1/tasks", json=spec)
    assert (status, status2) == (201, 200)
    assert second == {"task_id": first["task_id"], "existing": True}


async def test_task_list_filters_and_pages(cluster: Cluster) -> None:
    ids = [await cluster.submit("echo", {"message": str(i)}) for i in range(5)]
    for task_id in ids:
        await cluster.wait_task(task_id)
    page = await cluster.ok("GET", "/api/v1/tasks?limit=2")
    assert [t["task_id"] for t in page["tasks"]] == ids[::-1][:2]
    assert page["next_offset"] == 2
    rest = await cluster.ok("GET", "/api/v1/tasks?limit=2&offset=4")
    assert [t["task_id"] for t in rest["tasks"]] == [ids[0]] and rest["next_offset"] is None
    assert len((await cluster.ok("GET", "/api/v1/tasks?status=completed&task_type=echo"))["tasks"]) == 5
    assert (await cluster.ok("GET", "/api/v1/tasks?status=failed"))["tasks"] == []
    assert len((await cluster.ok("GET", f"/api/v1/tasks?device_id={WORKER_ID}"))["tasks"]) == 5
    for query, path in [("limit=0", "?limit"), ("limit=x", "?limit"), ("offset=-1", "?offset"),
                        ("status=done", "?status"), ("sort=asc", "?sort")]:
        status, body = await cluster.get(f"/api/v1/tasks?{query}")
        assert status == 400 and body["code"] == "invalid_message" and body["path"] == path, (query, body)


async def test_cancel_then_cancel_again_is_a_conflict(cluster: Cluster) -> None:
    task_id = await cluster.submit("sleep", {"seconds": 60})
    await cluster.wait_task(task_id, "running")
    status, body = await cluster.request("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 200 and body == {"task_id": task_id, "status": "cancelled"}
    status, body = await cluster.request("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 409 and body["code"] == "conflict" and "already ended" in body["error"]
    for method in ("GET", "DELETE"):
        status, body = await cluster.request(method, "/api/v1/tasks/no-such-task")
        assert status == 404 and body["code"] == "not_found", method


async def test_bad_submissions_are_400_with_the_body_path(cluster: Cluster) -> None:
    cases = [
        (b"{not json", "invalid_json", None),
        (b'{"task_type": "echo", "task_type": "sleep"}', "invalid_json", None),
        (b"3", "invalid_message", "$"),
        (b"[1, 2]", "invalid_message", "$[0]"),  # a list of tasks: its first is not one
        (b'[{"task_type": "echo"}, {"task_type": "echo", "priority": "asap"}]', "invalid_message", "$[1].priority"),
        (b"[]", "invalid_message", "$"),
        (b'{"payload": {}}', "invalid_message", "$"),
        (b'{"task_type": "echo", "payload": 3}', "invalid_message", "$.payload"),
        (b'{"task_type": "echo", "requirements": {"min_cpu": 2}}', "invalid_message", "$.requirements"),
        (b'{"task_type": "echo", "priority": "asap"}', "invalid_message", "$.priority"),
        (b"[" * 100 + b"]" * 100, "invalid_json", None),
    ]
    for raw, code, path in cases:
        status, body = await cluster.request("POST", "/api/v1/tasks", data=raw,
                                             headers={"Content-Type": "application/json"})
        assert status == 400 and body["code"] == code, (raw, body)
        assert body.get("path") == path, (raw, body)
        if path not in (None, "$"):
            assert body["error"].startswith(f"{path}: "), body  # the body's path, not the wire's


async def test_a_list_of_tasks_is_submitted_in_one_request(cluster: Cluster) -> None:
    tasks = [{"task_type": "echo", "payload": {"n": n}} for n in range(300)]
    status, body = await cluster.request("POST", "/api/v1/tasks", json=tasks)
    assert status == 201 and len(body["task_ids"]) == 300, body
    stored = {t.task_id: t for t in await cluster.node.store.list_tasks(limit=1000)}
    assert [stored[i].payload["n"] for i in body["task_ids"]] == list(range(300))
    status, body = await cluster.request("POST", "/api/v1/tasks?wait=5", json=tasks[:2])
    assert status == 400 and body["path"] == "?wait" and "wait is for one task" in body["error"], body


async def test_oversized_body_is_413_and_unknown_routes_are_json(cluster: Cluster) -> None:
    big = json.dumps({"task_type": "echo", "payload": {"message": "x" * (cluster.node.config.max_frame_bytes + 10)}})
    status, body = await cluster.request("POST", "/api/v1/tasks", data=io.BytesIO(big.encode()),
                                         headers={"Content-Type": "application/json"})
    assert status == 413 and body["code"] == "frame_too_large"
    status, body = await cluster.get("/api/v1/nothing-here")
    assert status == 404 and body["code"] == "not_found"
    status, body = await cluster.request("PUT", "/api/v1/tasks", json={})
    assert status == 405 and body["code"] == "invalid_message" and "GET" in body["error"]


async def test_too_many_streams_is_429_overloaded(cluster: Cluster) -> None:
    cluster.node.web.max_streams = 1
    first = await open_stream(cluster, "/stream/tasks")
    try:
        status, body = await cluster.get("/stream/devices")
        assert status == 429 and body["code"] == "overloaded"
    finally:
        first.close()


async def test_an_internal_error_is_500_without_details(cluster: Cluster, monkeypatch) -> None:
    async def broken(conn, msg):
        raise RuntimeError("secret detail")

    monkeypatch.setitem(cluster.node.handlers._table, "cluster_status", broken)
    status, body = await cluster.get("/api/v1/cluster/status")
    assert status == 500 and body["code"] == "internal"
    assert "secret" not in body["error"] and "reference" in body["error"]
    status, body = await cluster.get("/api/v1/health", auth=False)  # the node carries on
    assert status == 200


async def test_cluster_status(cluster: Cluster) -> None:
    body = await cluster.ok("GET", "/api/v1/cluster/status")
    assert body["devices"]["online"] == 1 and body["slots"]["total"] >= 1
    assert set(body["tasks"]) == {"pending", "assigned", "running", "completed", "failed", "cancelled", "timeout"}
    assert body["stuck"] == []


async def test_a_task_no_device_can_run_says_why_in_every_view(cluster: Cluster) -> None:
    task_id = await cluster.submit("echo", {"message": "x"}, requirements={"min_cpu_cores": 512})
    why = "does not meet min_cpu_cores=512; `retire-cluster devices` shows what each has."
    body = await cluster.ok("GET", f"/api/v1/tasks/{task_id}")
    assert body["task"]["status"] == "pending" and body["task"]["waiting"].endswith(why)
    status = await cluster.ok("GET", "/api/v1/cluster/status")
    assert [(s["task_type"], s["tasks"], s["reason"].endswith(why)) for s in status["stuck"]] == [("echo", 1, True)]
    _, text = await command(cluster, "status")
    assert 'stuck: 1 echo {"min_cpu_cores": 512} task: the one device that runs' in text["text"]
    _, text = await command(cluster, f"task {task_id}")
    assert "waiting" in text["text"] and why in text["text"]


async def test_the_dashboards_task_command_says_when_the_device_holding_it_is_gone(tmp_path: Path) -> None:
    """As `retire-cluster task` does. Before, a task of a device that dropped off looked stuck as running."""
    cluster = await start_cluster(tmp_path, worker=False)
    try:
        device = await fake_worker(cluster.node, "phone")
        task_id = await cluster.submit("sleep", {"seconds": 60})
        assign = await device.next_push("task_assign")
        await device.send("ack", {"original_message_id": assign["message_id"], "result": {}})  # running
        await cluster.wait_task(task_id, "running")
        _, body = await command(cluster, f"task {task_id}")
        assert "not connected" not in body["text"]
        await device.close()  # the phone left the Wi-Fi; the task stays with it until --offline-timeout

        async def said() -> bool:
            _, body = await command(cluster, f"task {task_id}")
            return "phone (not connected, last seen" in body["text"]

        await eventually(said)
        assert (await cluster.ok("GET", f"/api/v1/tasks/{task_id}"))["task"]["status"] == "running"
    finally:
        await cluster.close()


# -- POST /api/v1/command ------------------------------------------------------------------


async def command(cluster: Cluster, line: str):
    return await cluster.request("POST", "/api/v1/command", json={"command": line})


async def test_command_runs_dashboard_commands(cluster: Cluster) -> None:
    status, body = await command(cluster, "devices")
    assert status == 200 and WORKER_ID in body["text"] and body["text"].startswith("+--")
    assert [d["device_id"] for d in body["json"]["devices"]] == [WORKER_ID]
    status, body = await command(cluster, "submit echo message='hi there' --priority high --watch")
    assert status == 200 and body["action"] == {"watch": body["json"]["task_id"]}
    task_id = body["json"]["task_id"]
    assert body["json"]["task"] == {"task_type": "echo", "payload": {"message": "hi there"}, "priority": "high"}
    await cluster.wait_task(task_id)
    status, body = await command(cluster, f"task {task_id}")
    assert status == 200 and "[####################] 100%" in body["text"] and "hi there" in body["text"]
    status, body = await command(cluster, "tasks completed")
    assert task_id in body["text"] and body["json"]["tasks"][0]["task_id"] == task_id
    status, body = await command(cluster, "status")
    assert "1 online" in body["text"] and body["json"]["devices"]["online"] == 1
    status, body = await command(cluster, "grid")
    assert WORKER_ID in body["text"] and "bat" in body["text"]
    status, body = await command(cluster, 'submit sleep \'{"seconds": 60}\'')
    sleeper = body["json"]["task_id"]
    status, body = await command(cluster, f"cancel {sleeper}")
    assert status == 200 and body["json"]["status"] == "cancelled"
    status, body = await command(cluster, "help")
    assert "submit TYPE" in body["text"]


async def test_command_errors_have_wire_codes(cluster: Cluster) -> None:
    task_id = await cluster.submit("echo", {"message": "x"})
    await cluster.wait_task(task_id)
    for line, status, code in [("launch rockets", 400, "invalid_message"), ("task no-such", 404, "not_found"),
                               (f"cancel {task_id}", 409, "conflict"), ("submit", 400, "invalid_message"),
                               ("submit echo nokeyvalue", 400, "invalid_message"),
                               ("submit echo --requires speed=9", 400, "invalid_message"),
                               ("tasks --limit x", 400, "invalid_message"), ("devices asleep", 400, "invalid_message"),
                               ("theme amber", 400, "invalid_message"), ("task 'unterminated", 400, "invalid_message")]:
        got, body = await command(cluster, line)
        assert (got, body["code"]) == (status, code), (line, body)
    got, body = await cluster.request("POST", "/api/v1/command", json={"cmd": "devices"})
    assert got == 400 and body["path"] == "$.command"


# -- lifecycle and configuration ------------------------------------------------------------


async def test_http_off_unless_enabled_and_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    off = MainNode(make_config(tmp_path / "off"))
    await off.start()
    assert off.http_address is None and off.web is None
    await off.stop()
    c = await start_cluster(tmp_path / "a", worker=False)
    try:
        clash = MainNode(make_config(tmp_path / "b", http_enabled=True, http_port=c.node.http_address[1]))
        with pytest.raises(HTTPBindError, match="--http-port"):
            await clash.start()
        assert clash.stopped.is_set()  # it cleaned up after itself (TCP socket, database)
        assert (await c.get("/api/v1/health"))[0] == 200
    finally:
        await c.close()


def test_cli_builds_the_http_settings() -> None:
    config, _ = build_main_config(None, {"port": 0})
    assert config.http_port == 0 and config.http_enabled and config.http_bind_host == "0.0.0.0"
    config, _ = build_main_config(None, {"port": 0, "http_port": 5001, "http_host": "127.0.0.2"})
    assert config.http_port == 5001 and config.http_bind_host == "127.0.0.2"
    config, _ = build_main_config(None, {"no_http": True, "insecure": True})
    assert config.http_enabled is False and config.http_port == 5000 and config.http_bind_host == "127.0.0.1"


def test_main_prints_the_dashboard_url(main_process) -> None:
    main = main_process()
    line = next(x for x in main.output if x.startswith("dashboard and HTTP API: "))
    url = line.split()[4]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    with urllib.request.urlopen(url + "api/v1/health", timeout=10) as resp:
        assert json.load(resp)["status"] == "ok"


def test_a_taken_default_port_means_no_dashboard_but_a_taken_chosen_one_is_an_error(main_process,
                                                                                 tmp_path: Path) -> None:
    blocker = socket.socket()
    try:
        try:
            blocker.bind(("127.0.0.1", 5000))
            blocker.listen()
        except OSError:
            pass  # something else holds port 5000 already: just as good
        tcp_port = free_port()
        main = main_process(port=tcp_port)  # a fixed TCP port: HTTP gets the default 5000
        text = "".join(main.output)
        assert "starting without the dashboard" in text and "dashboard and HTTP API" not in text
        assert main.proc.poll() is None
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            chosen = str(taken.getsockname()[1])
            out = subprocess.run(cli_cmd("main", "--host", "127.0.0.1", "--port", "0", "--http-port", chosen,
                                         "--data-dir", str(tmp_path / "other")),
                                 capture_output=True, text=True, env=cli_env(), timeout=60)
        assert out.returncode == 1
        assert f"cannot listen for HTTP on 127.0.0.1:{chosen}" in out.stderr and "--http-port" in out.stderr
    finally:
        blocker.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BLOCKER = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("aiohttp", "prometheus_client"):
                raise ImportError("blocked for the test: " + name)
            return None

    sys.meta_path.insert(0, Block())
    import retire_cluster.cli, retire_cluster.client, retire_cluster.worker.agent
    from retire_cluster.web import HTTPBindError
    from click.testing import CliRunner
    result = CliRunner().invoke(retire_cluster.cli.cli, ["worker", "--help"])
    assert result.exit_code == 0, result.output
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "prometheus_client")))
""")


def test_worker_and_cli_import_without_the_web_packages() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- rate limit ---------------------------------------------------------------------------


async def test_requests_beyond_the_rate_limit_get_429_with_retry_after(tmp_path: Path) -> None:
    import aiohttp
    from conftest import FakeClock
    from webutil import Cluster as WebCluster

    clock = FakeClock()
    node = MainNode(make_config(tmp_path, http_enabled=True, http_port=0, client_rate_per_s=0.5, client_burst=3),
                    clock=clock, run_monitor=False)
    await node.start()
    c = WebCluster(node, aiohttp.ClientSession())
    try:
        for _ in range(3):
            assert (await c.request("GET", "/api/v1/health", auth=False))[0] == 200
        status, body = await c.request("GET", "/api/v1/devices")
        assert status == 429 and body["code"] == "overloaded" and "retry after 2" in body["error"]
        async with c.session.get(c.url("/")) as resp:  # the page too: every route counts
            assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        clock.advance(2.0)  # one request's worth refilled
        assert (await c.request("GET", "/api/v1/devices"))[0] == 200
        assert (await c.request("GET", "/api/v1/devices"))[0] == 429
    finally:
        await c.close()


def test_rate_limiter_keeps_a_bounded_number_of_addresses() -> None:
    from retire_cluster.web.app import RateLimiter

    now = [0.0]
    limiter = RateLimiter(1.0, 1, lambda: now[0], max_addresses=3)
    assert [limiter.take(a) for a in ("a", "b", "c", "d")] == [0.0, 0.0, 0.0, 0.0]
    assert len(limiter._buckets) == 3  # "a" was the least recently seen
    assert limiter.take("d") == 1.0  # d's bucket is empty: one second until its next request
    assert limiter.take("a") == 0.0  # a was forgotten: it starts with a full bucket again


# -- edges found by hand: NaN, raw header bytes, static files, 405, hung-up streams ---------------


async def test_nan_or_infinity_is_refused_and_spoils_nobody_elses_commit(cluster: Cluster) -> None:
    """`--timeout nan` once reached the store, whose group commit then failed for every task in it."""
    import asyncio

    bad = [command(cluster, "submit echo --timeout nan"), command(cluster, "submit echo --timeout Infinity"),
           cluster.request("POST", "/api/v1/tasks?wait=nan", json={"task_type": "echo"})]
    good = [cluster.request("POST", "/api/v1/tasks", json={"task_type": "echo", "payload": {"message": n}})
            for n in range(20)]
    results = await asyncio.gather(*bad, *good)
    for status, body in results[: len(bad)]:
        assert (status, body["code"]) == (400, "invalid_message"), body
    assert results[0][1]["error"].startswith("--timeout needs a number; usage: submit TYPE")
    assert results[2][1]["path"] == "?wait"
    assert all(status == 201 for status, _ in results[len(bad):])
    listed = await cluster.ok("GET", "/api/v1/tasks?limit=100")
    assert len(listed["tasks"]) == 20  # the refused ones were never created
    for _, body in results[len(bad):]:
        await cluster.wait_task(body["task_id"])
    status, body = await command(cluster, "submit echo n=NaN big=1e999")
    assert status == 200 and body["json"]["task"]["payload"] == {"n": "NaN", "big": "1e999"}  # text, as given
    status, body = await command(cluster, "submit echo --priority -5")
    assert status == 400 and body["error"].startswith(
        "task.priority: -5 is less than the minimum of 0 and is not one of ['low', 'normal', 'high', 'urgent']")


async def test_a_header_with_raw_bytes_is_a_wrong_token_not_an_internal_error(cluster: Cluster) -> None:
    import asyncio

    host, port = cluster.node.http_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xed\r\n"
                 b"Connection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 401 "), response[:200]
    assert b'"code":"unauthorized"' in response.replace(b" ", b"")


async def test_static_files_and_wrong_methods_answer_as_the_api_does(cluster: Cluster) -> None:
    async with cluster.session.get(cluster.url("/static/dashboard.js")) as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
        assert "javascript" in resp.content_type and len(await resp.read()) > 1000
    for path in ("/static/nope.js", "/static/", "/static/..%2Fapp.py", "/static/index.html"):
        status, body = await cluster.request("GET", path, auth=False)
        assert status == 404 and body["code"] == "not_found", (path, body)
    async with cluster.session.put(cluster.url("/api/v1/tasks"), headers=cluster.auth) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD, POST"
        assert (await resp.json())["code"] == "invalid_message"


async def test_a_stream_whose_reader_hangs_up_frees_its_place_at_once(tmp_path: Path) -> None:
    import asyncio

    c = await start_cluster(tmp_path, worker=False)
    try:
        web = c.node.web
        web.keepalive_s = 3600.0  # no keep-alive write would reveal the hang-up
        web.max_streams = 2
        host, port = c.node.http_address
        readers = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /stream/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {c.node.token}\r\n"
                         "\r\n".encode())
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            readers.append(writer)
        status, body = await c.request("GET", "/stream/devices")
        assert status == 429 and body["code"] == "overloaded"
        for writer in readers:
            writer.close()
        await eventually(lambda: _async(web.open_streams == 0))
        async with c.session.get(c.url("/stream/devices"), headers=c.auth) as resp:
            assert resp.status == 200
    finally:
        await c.close()


async def _async(value):
    return value


async def test_refusals_name_the_url_part_that_was_wrong(cluster: Cluster) -> None:
    status, body = await cluster.get("/api/v1/tasks/" + "x" * 300)
    assert status == 400 and body["path"] == "{task_id}"
    assert body["error"].startswith("{task_id}: 'xxxx") and body["error"].endswith("... is too long")
    status, body = await cluster.request("DELETE", "/api/v1/tasks/" + "x" * 300)
    assert status == 400 and body["path"] == "{task_id}"
    for path in ("/text/tasks?status=bogus", "/text/devices?status=bogus"):
        status, body = await cluster.get(path)
        assert status == 400 and body["path"] == "?status", body
        assert body["error"].startswith("?status: 'bogus' is not one of")
