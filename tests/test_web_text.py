"""/text/* and /metrics against a real main node (HTTP on port 0) and a real worker."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict

import prometheus_client
import webutil
from prometheus_client.parser import text_string_to_metric_families
from webutil import WORKER_ID, Cluster, eventually, start_cluster

from retire_cluster.web.text import DEVICE_FIELDS, TASK_FIELDS, render_rows

cluster = webutil.cluster  # the fixture: a node serving HTTP on port 0 and a real worker


async def test_devices_are_pipe_separated_by_default(cluster: Cluster) -> None:
    status, text = await cluster.get("/text/devices")
    assert status == 200
    header, *rows = text.splitlines()
    assert header.split("|") == list(DEVICE_FIELDS)
    assert len(rows) == 1
    row = dict(zip(DEVICE_FIELDS, rows[0].split("|")))
    assert row["device_id"] == WORKER_ID and row["status"] == "online" and row["connected"] == "true"
    assert row["role"] == "worker" and int(row["max_tasks"]) >= 1


async def test_devices_as_csv_tsv_and_json(cluster: Cluster) -> None:
    async with cluster.session.get(cluster.url("/text/devices?format=csv"), headers=cluster.auth) as resp:
        assert resp.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["device_id"] for r in rows] == [WORKER_ID]
    status, text = await cluster.get("/text/devices?format=tsv")
    header, row = text.splitlines()
    assert header.split("\t") == list(DEVICE_FIELDS) and row.split("\t")[0] == WORKER_ID
    status, rows = await cluster.get("/text/devices?format=json")
    assert rows[0]["device_id"] == WORKER_ID and rows[0]["connected"] is True
    assert (await cluster.get("/text/devices?status=offline&format=json"))[1] == []
    status, body = await cluster.get("/text/devices?format=xml")
    assert status == 400 and body["code"] == "invalid_message" and body["path"] == "?format"


async def test_status_is_key_value_lines(cluster: Cluster) -> None:
    status, text = await cluster.get("/text/status")
    pairs = dict(line.split("=", 1) for line in text.splitlines())
    assert pairs["devices_online"] == "1" and pairs["devices_offline"] == "0"
    assert {"version", "uptime_s", "slots_total", "slots_busy", "queue_length", "tasks_pending",
            "tasks_completed"} <= set(pairs)
    assert (await cluster.get("/text/status?format=json"))[1]["devices_online"] == 1


async def test_tasks_text_after_work(cluster: Cluster) -> None:
    task_id = await cluster.submit("echo", {"message": "a|b\nc"})
    await cluster.wait_task(task_id)
    status, text = await cluster.get("/text/tasks")
    header, row = text.splitlines()
    record = dict(zip(TASK_FIELDS, row.split("|")))
    assert record["task_id"] == task_id and record["status"] == "completed"
    assert record["assigned_device"] == WORKER_ID
    assert (await cluster.get("/text/tasks?status=pending"))[1].splitlines() == [header]


def test_separators_inside_values_never_split_a_line() -> None:
    rows = [{"a": "x|y\nz", "b": None, "c": True}]
    assert render_rows("pipe", ["a", "b", "c"], rows) == b"a|b|c\nx y z||true\n"
    assert render_rows("tsv", ["a"], [{"a": "t\tu"}]) == b"a\nt u\n"
    assert list(csv.reader(io.StringIO(render_rows("csv", ["a"], rows).decode()))) == [["a"], ["x|y\nz"]]


def test_csv_and_tsv_cells_a_spreadsheet_would_run_as_formulas_are_quoted() -> None:
    """A device id or task type is chosen by whoever holds the token: "=HYPERLINK(...)" ran in a spreadsheet."""
    rows = [{"id": '=HYPERLINK("http://x")', "type": "@SUM(1)", "n": -2.5, "ok": "-ish", "plain": "pi"}]
    fields = ["id", "type", "n", "ok", "plain"]
    assert list(csv.reader(io.StringIO(render_rows("csv", fields, rows).decode())))[1] == [
        "'=HYPERLINK(\"http://x\")", "'@SUM(1)", "-2.5", "'-ish", "pi"]
    assert render_rows("tsv", fields, rows).decode().splitlines()[1].split("\t") == [
        "'=HYPERLINK(\"http://x\")", "'@SUM(1)", "-2.5", "'-ish", "pi"]
    assert render_rows("pipe", ["id"], rows) == b'id\n=HYPERLINK("http://x")\n'  # for shell scripts: as is


def samples(text: str) -> Dict[str, float]:
    """name{label="v",...} -> value, for every sample in an exposition."""
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_metrics_count_devices_tasks_and_times(cluster: Cluster) -> None:
    ids = [await cluster.submit("echo", {"message": str(i)}) for i in range(3)]
    failing = await cluster.submit("sleep", {"seconds": -1})
    for task_id in ids:
        await cluster.wait_task(task_id)
    await cluster.wait_task(failing, "failed")

    async def scraped():
        status, text = await cluster.get("/metrics")
        assert status == 200
        found = samples(text)
        return found if found.get("retire_cluster_tasks_completed_total") == 3 else None

    m = await eventually(scraped)
    assert m['retire_cluster_devices{state="online"}'] == 1 and m['retire_cluster_devices{state="offline"}'] == 0
    assert m["retire_cluster_tasks_submitted_total"] == 4
    assert m["retire_cluster_tasks_failed_total"] == 1
    assert m['retire_cluster_tasks{state="completed"}'] == 3 and m['retire_cluster_tasks{state="failed"}'] == 1
    assert m['retire_cluster_tasks_finished_total{status="completed"}'] == 3
    assert m["retire_cluster_task_duration_seconds_count"] == 3
    assert m["retire_cluster_task_queue_wait_seconds_count"] == 4
    assert m[f'retire_cluster_heartbeat_lag_seconds{{device_id="{WORKER_ID}"}}'] >= 0
    assert m['retire_cluster_open_connections{kind="tcp"}'] >= 1
    assert m['retire_cluster_open_connections{kind="stream"}'] == 0
    status, again = await cluster.get("/text/metrics")
    assert samples(again)["retire_cluster_tasks_submitted_total"] == 4


async def test_each_node_has_its_own_registry(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.wait_task(await cluster.submit("echo", {"message": "x"}))
    other = await start_cluster(tmp_path / "other", worker=False)
    try:
        status, text = await other.get("/metrics")
        assert samples(text)["retire_cluster_tasks_submitted_total"] == 0
    finally:
        await other.close()
    assert not any(name.startswith("retire_cluster") for name in prometheus_client.REGISTRY._names_to_collectors)
