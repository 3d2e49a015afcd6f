"""The dashboard's ASCII rendering and command-line parsing (no network)."""

from __future__ import annotations

import pytest

from retire_cluster.web.commands import Commands, parse_value
from retire_cluster.web.render import (
    box_table,
    device_grid,
    devices_table,
    progress_bar,
    task_progress,
    task_text,
)


def test_box_table() -> None:
    assert box_table(["a", "long header"], [["x", None], [12345, "two\nlines"]]) == (
        "+-------+-------------+\n"
        "| a     | long header |\n"
        "+-------+-------------+\n"
        "| x     | -           |\n"
        "| 12345 | two lines   |\n"
        "+-------+-------------+"
    )


@pytest.mark.parametrize("fraction, text", [(0, "[----------]   0%"), (0.5, "[#####-----]  50%"),
                                            (1, "[##########] 100%"), (7, "[##########] 100%"),
                                            (None, "[??????????]    ?")])
def test_progress_bar(fraction, text) -> None:
    assert progress_bar(fraction, 10) == text


def test_task_progress_follows_the_status() -> None:
    assert task_progress({"status": "pending"}, 4) == "[----]   0%"
    assert task_progress({"status": "running", "progress": 75.0}, 4) == "[###-]  75%"
    assert task_progress({"status": "completed"}, 4) == "[####] 100%"
    assert task_progress({"status": "failed"}, 4) == "[xxxx] failed"


DEVICE = {"device_id": "phone", "status": "online", "connected": True, "accepting": False,
          "device_info": {"role": "worker", "platform": "android"}, "hardware_specs": {"cpu_cores": 8},
          "system_metrics": {"cpu_usage": 20.0, "battery_percent": 81, "charging": True},
          "active_tasks": 1, "max_concurrent_tasks": 4}


def test_devices_table_and_grid() -> None:
    table = devices_table([DEVICE], now=0)
    assert "online (paused)" in table and "81% charging" in table and "[###-------]  25% 1/4" in table
    grid = device_grid([DEVICE, dict(DEVICE, device_id="nas", status="offline")], columns=2)
    lines = grid.splitlines()
    assert len(lines) == 7 and "| phone" in lines[1] and "| nas" in lines[1]
    assert "state paused" in grid and "state offline" in grid and "[######--]  81%" in grid
    assert devices_table([]).startswith("no devices yet")


def test_the_devices_table_says_why_a_device_is_paused() -> None:
    """Before, the reason was only in `devices --json`: the table said "online (paused)" and no more."""
    table = devices_table([dict(DEVICE, reason="not charging"), dict(DEVICE, device_id="nas", accepting=True)], now=0)
    assert table.splitlines()[-1] == "phone is paused: not charging"
    assert "nas is paused" not in table


def test_command_values_and_payloads() -> None:
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("hello") == "hello" and parse_value('"7"') == "7"
    assert Commands._payload(["seconds=2.5", "message=a=b"]) == {"seconds": 2.5, "message": "a=b"}
    assert Commands._payload(['{"expression": "1+1"}']) == {"expression": "1+1"}
    assert Commands._requirements(["capabilities=gpu,camera", "min_cpu_cores=2"]) == {
        "capabilities": ["gpu", "camera"], "min_cpu_cores": 2}


async def test_help_fits_80_columns_and_keeps_every_command() -> None:
    from retire_cluster.web.commands import COMMANDS

    out = await Commands(None).run("help")  # type: ignore[arg-type]  # help needs no node
    lines = out["text"].splitlines()
    assert max(len(line) for line in lines) <= 80, out["text"]
    flat = " ".join(out["text"].split())
    for usage, what in COMMANDS.values():
        assert usage in flat and what in flat  # wrapped, not cut
    assert out["json"]["commands"]["submit"]["usage"].startswith("submit TYPE")


@pytest.mark.parametrize("line, stray, usage", [
    ("grid x", "unexpected word 'x' after `grid`", "grid"),
    ("help me", "unexpected word 'me' after `help`", "help"),
    ("status now", "unexpected word 'now' after `status`", "status"),
    ("logs all", "unexpected word 'all' after `logs`", "logs"),
    ("devices online x", "unexpected word 'x' after `devices online`", "devices [online|offline]"),
    ("tasks failed extra", "unexpected word 'extra' after `tasks failed`", "tasks [STATUS]"),
    ("task abc def", "unexpected word 'def' after `task abc`", "task ID"),
    ("cancel abc def", "unexpected word 'def' after `cancel abc`", "cancel ID"),
    ("watch abc def", "unexpected word 'def' after `watch abc`", "watch [ID]"),
    ("grid --limit 5", "unexpected option '--limit' after `grid`", "grid"),
    ("tasks --limit 5 --limit 6", "--limit is given twice", "tasks [STATUS]"),
    ("submit echo --watch=yes", "--watch takes no value", "submit TYPE"),
])  # fmt: skip
async def test_stray_words_are_refused_with_one_sentence_naming_them(line: str, stray: str, usage: str) -> None:
    from retire_cluster.protocol.errors import InvalidMessage

    with pytest.raises(InvalidMessage) as refused:
        await Commands(None).run(line)  # type: ignore[arg-type]  # refused before reaching the node
    message = refused.value.message
    assert message.startswith(stray) and f"; usage: {usage}" in message and message.count("; usage:") == 1
    assert refused.value.path == "$.command"


def test_the_cli_devices_table_says_why_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from retire_cluster import cli_client
    from retire_cluster.cli import cli

    class FakeClient:
        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def devices(self, status: object) -> list:
            return [dict(DEVICE, reason="outside the owner's hours 09:00-17:00")]

    monkeypatch.setattr(cli_client, "_client", lambda main, token: FakeClient())
    result = CliRunner().invoke(cli, ["devices", "--main", "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "phone is paused: outside the owner's hours 09:00-17:00"


def test_the_dashboards_task_view_says_when_the_device_holding_it_is_gone() -> None:
    """As `retire-cluster task` does: a running task of a device not connected looked stuck, with no reason."""
    task = {"task_id": "t1", "task_type": "sleep", "status": "running", "assigned_device": "pi", "progress": 40,
            "attempts": [{"attempt": 1, "device_id": "pi"}], "attempt": 1, "max_retries": 3}
    away = {"device_id": "pi", "connected": False, "last_seen": None}
    shown = task_text(task, away)
    assert ("device        pi (not connected, last seen -: the task goes back to the queue unless the device "
            "returns within the main node's --offline-timeout)") in shown
    assert "not connected" not in task_text(task, dict(away, connected=True))
    assert "not connected" not in task_text(task)
    assert "not connected" not in task_text(dict(task, status="completed"), away)  # ended: nothing to wait for
