"""The owner's policy: rules, hysteresis, battery sources, and what the main node does with it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Peer, make_config
from test_agent import free_port, wait_until

from retire_cluster.cli import cli
from retire_cluster.main import MainNode
from retire_cluster.worker import Agent, WorkerConfig, profiler
from retire_cluster.worker.policy import OwnerPolicy, PolicyConfig, Readings, parse_hours

NOON = dt.time(12, 0)


def test_battery_hysteresis_does_not_flap() -> None:
    policy = OwnerPolicy(PolicyConfig(min_battery_pct=20))
    seen = [policy.evaluate(Readings(battery_pct=p), NOON).accepting for p in (50, 21, 19, 20, 22, 24.9, 25, 21)]
    assert seen == [True, True, False, False, False, False, True, True]
    assert "below --min-battery 20%" in (policy.evaluate(Readings(battery_pct=10), NOON).reason or "")


def test_temperature_and_owner_cpu_hysteresis() -> None:
    policy = OwnerPolicy(PolicyConfig(max_battery_temp_c=40, max_owner_cpu_pct=50))
    assert not policy.evaluate(Readings(battery_temp_c=41), NOON).accepting
    assert not policy.evaluate(Readings(battery_temp_c=39), NOON).accepting
    assert policy.evaluate(Readings(battery_temp_c=38), NOON).accepting
    assert not policy.evaluate(Readings(owner_cpu_pct=80), NOON).accepting
    assert not policy.evaluate(Readings(owner_cpu_pct=45), NOON).accepting
    decision = policy.evaluate(Readings(owner_cpu_pct=30), NOON)
    assert decision.accepting and decision.reason is None


def test_a_max_rule_recovering_says_so_and_a_reading_gone_unknown_keeps_its_reason() -> None:
    """Before, a device paused at 41 C read "battery at 39 C, limit 40 C" while waiting for 38 C, and a
    temperature or owner CPU reading that went unknown while its rule blocked raised TypeError in the check."""
    policy = OwnerPolicy(PolicyConfig(max_battery_temp_c=40, max_owner_cpu_pct=50))
    assert policy.evaluate(Readings(battery_temp_c=41), NOON).reason == "battery at 41 C, limit --max-battery-temp 40 C"
    assert policy.evaluate(Readings(battery_temp_c=39), NOON).reason == "battery cooling to 38 C (--max-battery-temp 40 C)"
    assert policy.evaluate(Readings(), NOON).reason == "battery cooling to 38 C (--max-battery-temp 40 C)"
    policy.evaluate(Readings(battery_temp_c=30), NOON)
    assert policy.evaluate(Readings(owner_cpu_pct=80), NOON).reason == "owner using 80% CPU, limit --max-owner-cpu 50%"
    assert policy.evaluate(Readings(owner_cpu_pct=45), NOON).reason == (
        "owner CPU settling below 40% (--max-owner-cpu 50%)")
    assert policy.evaluate(Readings(), NOON).reason == "owner CPU settling below 40% (--max-owner-cpu 50%)"


def test_charging_and_unknown_readings() -> None:
    policy = OwnerPolicy(PolicyConfig(only_when_charging=True, min_battery_pct=30))
    assert policy.evaluate(Readings(), NOON).accepting  # a desktop: no battery at all
    decision = policy.evaluate(Readings(charging=False, battery_pct=80), NOON)
    assert not decision.accepting and "not charging" in (decision.reason or "")
    assert policy.evaluate(Readings(charging=True, battery_pct=80), NOON).accepting


def test_hours_window_wraps_midnight() -> None:
    policy = OwnerPolicy(PolicyConfig(hours=parse_hours("22:00-07:00")))
    assert policy.evaluate(Readings(), dt.time(23, 30)).accepting
    assert policy.evaluate(Readings(), dt.time(6, 59)).accepting
    decision = policy.evaluate(Readings(), dt.time(7, 0))
    assert not decision.accepting and "outside --hours 22:00-07:00" in (decision.reason or "")
    day = OwnerPolicy(PolicyConfig(hours=parse_hours("09:00-17:30")))
    assert day.evaluate(Readings(), dt.time(12)).accepting and not day.evaluate(Readings(), dt.time(18)).accepting
    for bad in ("9-5", "22:00", "10:00-10:00", "25:00-01:00"):
        with pytest.raises(ValueError, match="--hours"):
            parse_hours(bad)
    assert parse_hours("23:59-00:00") == (dt.time(23, 59), dt.time(0))
    assert parse_hours(" 9:00 - 17:30 ") == (dt.time(9), dt.time(17, 30))  # as an owner types it


@pytest.mark.parametrize("bad", [
    "", "   ", "22-07", "2200-0700", "22:00:30-07:00", "22:00+01:00-07:00", "T22:00-07:00", "22:60-07:00",
    "24:00-07:00", "22:00-07:00-08:00", "\u0662\u0662:00-07:00",
])
def test_hours_refuses_what_is_not_hh_mm_on_every_python(bad: str) -> None:
    """time.fromisoformat took some of these on 3.11 only; an offset crashed the worker on the first
    check (an aware time against the naive clock) and "" meant no window at all."""
    with pytest.raises(ValueError, match=r"^--hours .*: use HH:MM-HH:MM in 24-hour local time, e.g. 22:00-07:00\.$"):
        parse_hours(bad)


@pytest.mark.parametrize("hours", ["", "22:00+01:00-07:00"])
def test_worker_refuses_an_empty_or_offset_hours_with_exit_2(hours: str) -> None:
    result = CliRunner().invoke(cli, ["worker", "--main", "127.0.0.1:18949", "--hours", hours])
    assert result.exit_code == 2
    assert result.output.strip().endswith("use HH:MM-HH:MM in 24-hour local time, e.g. 22:00-07:00.")


def test_sysfs_battery_readings(tmp_path: Path) -> None:
    ac = tmp_path / "AC"
    ac.mkdir()
    (ac / "type").write_text("Mains\n")
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("57\n")
    (bat / "status").write_text("Discharging\n")
    (bat / "temp").write_text("312\n")
    assert profiler.battery_from_sysfs(str(tmp_path)) == {"percent": 57.0, "charging": False, "temperature": 31.2}
    (bat / "capacity").write_text("garbage\n")
    (bat / "status").write_text("Full\n")
    (bat / "temp").write_text("99999\n")
    assert profiler.battery_from_sysfs(str(tmp_path)) == {"percent": None, "charging": True, "temperature": None}
    assert profiler.battery_from_sysfs(str(tmp_path / "missing")) == {}


def test_termux_battery_readings() -> None:
    text = json.dumps({"health": "GOOD", "percentage": 83, "plugged": "PLUGGED_USB", "status": "CHARGING",
                       "temperature": 29.4})
    assert profiler.battery_from_termux(text) == {"percent": 83.0, "charging": True, "temperature": 29.4}
    assert profiler.battery_from_termux("not json") == {}
    odd = profiler.battery_from_termux(json.dumps({"percentage": -5, "status": "UNKNOWN", "temperature": "hot"}))
    assert odd == {"percent": None, "charging": None, "temperature": None}


async def test_read_battery_unknown_is_none_not_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(profiler, "_psutil", None)
    battery = await profiler.read_battery(sysfs_root=str(tmp_path), termux_command="no-such-command-here")
    assert battery == {"percent": None, "charging": None, "temperature": None}


async def test_paused_worker_gets_nothing_until_it_accepts_again(tmp_path: Path, monkeypatch) -> None:
    port = free_port()
    node = MainNode(make_config(tmp_path, port=port), run_monitor=False)
    await node.start()
    battery = {"percent": 10.0, "charging": False, "temperature": 30.0}

    async def fake_battery(*args, **kwargs):
        return dict(battery)

    monkeypatch.setattr("retire_cluster.worker.agent.read_battery", fake_battery)
    agent = Agent(WorkerConfig(main_host="127.0.0.1", main_port=port, token=node.token, device_id="phone",
                               data_dir=tmp_path / "w", heartbeat_interval_s=30, policy_interval_s=3600,
                               policy=PolicyConfig(min_battery_pct=20)))
    runner = asyncio.ensure_future(agent.run())
    try:
        await wait_until(lambda: node.registry.get("phone") is not None and node.registry.get("phone").conn)
        device = node.registry.get("phone")
        assert device.accepting is False and "below --min-battery" in device.reason
        client = await Peer.connect(node)
        task_id = (await client.ok("task_submit", {"task": {"task_type": "echo", "payload": {"message": "x"}}}))[
            "task_id"]
        await asyncio.sleep(0.2)
        assert node.lookup(task_id).status.value == "pending"
        listed = (await client.ok("list_devices"))["devices"][0]
        assert listed["accepting"] is False and "below --min-battery" in listed["reason"]
        battery["percent"] = 90.0
        await agent.check_policy()
        await wait_until(lambda: node.lookup(task_id).terminal)
        assert node.lookup(task_id).result["output"] == "x"
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_evict_hands_running_task_back(tmp_path: Path, monkeypatch) -> None:
    port = free_port()
    node = MainNode(make_config(tmp_path, port=port), run_monitor=False)
    await node.start()
    battery = {"percent": 90.0, "charging": True, "temperature": 30.0}

    async def fake_battery(*args, **kwargs):
        return dict(battery)

    monkeypatch.setattr("retire_cluster.worker.agent.read_battery", fake_battery)
    agent = Agent(WorkerConfig(main_host="127.0.0.1", main_port=port, token=node.token, device_id="phone",
                               data_dir=tmp_path / "w", heartbeat_interval_s=30, policy_interval_s=3600,
                               policy=PolicyConfig(only_when_charging=True, evict=True)))
    runner = asyncio.ensure_future(agent.run())
    try:
        await agent.registered.wait()
        client = await Peer.connect(node)
        task_id = (await client.ok("task_submit", {"task": {"task_type": "sleep", "payload": {"seconds": 30},
                                                            "max_retries": 0}}))["task_id"]
        await wait_until(lambda: task_id in agent.running)
        battery["charging"] = False
        await agent.check_policy()
        await wait_until(lambda: node.lookup(task_id).status.value == "pending" and not agent.outbox)
        task = node.lookup(task_id)
        assert task.attempts[0].outcome == "handed_back" and task.handbacks == 1
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_a_stopping_worker_hands_its_task_back_and_is_not_given_it_again(tmp_path: Path) -> None:
    port = free_port()
    node = MainNode(make_config(tmp_path, port=port), run_monitor=False)
    await node.start()
    agent = Agent(WorkerConfig(main_host="127.0.0.1", main_port=port, token=node.token, device_id="laptop",
                               data_dir=tmp_path / "w", heartbeat_interval_s=30, policy_interval_s=3600))
    runner = asyncio.ensure_future(agent.run())
    try:
        await agent.registered.wait()
        client = await Peer.connect(node)
        task_id = (await client.ok("task_submit", {"task": {"task_type": "sleep", "payload": {"seconds": 30}}}))[
            "task_id"]
        await wait_until(lambda: task_id in agent.running)
        agent.stop()  # SIGTERM or Ctrl-C on `retire-cluster worker`
        assert await runner == 0
        await wait_until(lambda: node.registry.get("laptop").conn is None)
        task = node.lookup(task_id)
        # Before, the handed-back task went straight back to the still-connected device and
        # stayed "assigned" to it, gone, until offline_timeout (5 minutes by default).
        assert task.status.value == "pending" and [a.outcome for a in task.attempts] == ["handed_back"]
        device = node.registry.get("laptop")
        assert (device.accepting, device.reason, device.status.value) == (False, "stopping", "offline")
        reply = await client.ok("task_status", {"task_id": task_id})
        assert reply["task"]["waiting"] == "1 device can run it and none is free: 1 offline."
    finally:
        agent.stop()
        await runner
        await node.stop()


def test_worker_config_file_and_bad_policy_flags(tmp_path: Path) -> None:
    conf = tmp_path / "worker.json"
    conf.write_text(json.dumps({"main": "127.0.0.1:1", "min-battery": 150}))
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert result.exit_code == 2 and "min-battery: 150.0 is not in the range 0<=x<=100" in result.output
    conf.write_text(json.dumps({"main": "127.0.0.1:1", "hours": "nope"}))
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert result.exit_code == 2 and "HH:MM-HH:MM" in result.output


async def test_battery_is_read_again_without_any_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by hand: with no policy flag the battery was read once, at start, and every heartbeat
    after reported that first level (a phone at 15% showed 80% charging on the main node)."""
    battery = {"percent": 80.0, "charging": True, "temperature": 30.0}
    reads = []

    async def fake_battery(*args: object, **kwargs: object) -> dict:
        reads.append(1)
        return dict(battery)

    monkeypatch.setattr("retire_cluster.worker.agent.read_battery", fake_battery)
    agent = Agent(WorkerConfig(device_id="phone", data_dir=tmp_path / "w", heartbeat_interval_s=60,
                               policy_interval_s=5))
    await agent.check_policy(NOON)
    assert agent.battery["percent"] == 80.0
    battery.update(percent=15.0, charging=False)
    for _ in range(12):  # one heartbeat interval of checks
        await agent.check_policy(NOON)
    assert (agent.battery["percent"], agent.battery["charging"]) == (15.0, False)
    assert len(reads) == 2  # not at every check: termux-battery-status is slow


@pytest.mark.parametrize("temp", ["nan", "inf", "-500", "101"])
def test_max_battery_temp_out_of_range_or_nan_is_refused(temp: str) -> None:
    """Found by hand: --max-battery-temp nan was taken and never blocked (every comparison false)."""
    result = CliRunner().invoke(cli, ["worker", "--main", "127.0.0.1:18949", "--max-battery-temp", temp])
    assert result.exit_code == 2
    assert result.output == "Error: --max-battery-temp must be a temperature in degrees C from 0 to 100.\n"


async def test_a_battery_rule_the_device_cannot_read_is_said_once_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Unknown never blocks, so on a device with no battery reading (Termux without termux-api, a desktop)
    --only-when-charging and --min-battery do nothing; before, the owner was not told."""
    battery = {"percent": None, "charging": None, "temperature": None}

    async def fake_battery(*args, **kwargs):
        return dict(battery)

    monkeypatch.setattr("retire_cluster.worker.agent.read_battery", fake_battery)
    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path,
                               policy=PolicyConfig(only_when_charging=True, min_battery_pct=30)))
    with caplog.at_level("WARNING", logger="retire_cluster.worker"):
        assert (await agent.check_policy()).accepting
        await agent.check_policy()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--only-when-charging and --min-battery will not pause this worker: the device gives no "
                        "charging state or battery level (on Termux: pkg install termux-api, and the Termux:API app)"]

    caplog.clear()
    battery.update(percent=80.0, charging=True)
    readable = Agent(WorkerConfig(device_id="y", data_dir=tmp_path / "y",
                                  policy=PolicyConfig(only_when_charging=True, min_battery_pct=30)))
    with caplog.at_level("WARNING", logger="retire_cluster.worker"):
        await readable.check_policy()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
