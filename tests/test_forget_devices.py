"""A device offline for forget_offline_after_s (a week by default) is forgotten.

Before, every device that ever registered stayed for good: listed offline by
`devices` and the dashboard, indexed by the scheduler and each strategy, kept
with its heartbeats by the web side and stored. A house that retires its old
phones and laptops one by one (or a phone whose device id changed with a
reinstall) grew that list, and the main node's memory, without end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FakeClock, Peer, fake_worker, make_config, settle

from retire_cluster.main import MainNode
from retire_cluster.main.config import ConfigError

DAY = 86400.0


async def away_for(node: MainNode, clock: FakeClock, worker: Peer, seconds: float) -> None:
    """``worker`` hangs up, goes offline, then stays away ``seconds`` more (a tick at each step)."""
    await worker.close()
    clock.advance(node.config.offline_timeout_s + 1)
    node.tick(clock())
    clock.advance(seconds)
    node.tick(clock())
    await settle(node)


async def device_ids(client: Peer) -> list[str]:
    return sorted(d["device_id"] for d in (await client.ok("list_devices", {}))["devices"])


async def test_a_device_offline_for_a_week_is_forgotten_and_comes_back_afresh(
        tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        old = await fake_worker(node, "old-phone")
        nas_peer = await fake_worker(node, "nas")
        client = await Peer.connect(node, "client")
        await old.close()
        clock.advance(node.config.offline_timeout_s + 1)
        await nas_peer.ok("heartbeat", {})
        node.tick(clock())
        nas = node.registry.get("nas")
        assert nas is not None
        assert node.registry.get("old-phone").status.value == "offline"
        assert await device_ids(client) == ["nas", "old-phone"]  # listed while it may come back

        clock.advance(7 * DAY)
        nas.last_seen = clock()  # the NAS kept heartbeating all week
        node.tick(clock())
        await settle(node)
        assert await device_ids(client) == ["nas"]
        assert "old-phone" not in node.scheduler._devices and "old-phone" not in node.scheduler._versions
        assert all(entry[2] != "old-phone" for cls in node.scheduler._classes.values() for entry in cls.devices)
        assert [d.device_id for d in await node.store.load_devices()] == ["nas"]

        back = await fake_worker(node, "old-phone")  # it registers afresh
        assert back is not None and await device_ids(client) == ["nas", "old-phone"]
    finally:
        await node.stop()


async def test_forgotten_devices_stay_forgotten_after_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    gone = await fake_worker(node, "laptop")
    await gone.close()
    clock.advance(node.config.offline_timeout_s + 1)
    node.tick(clock())
    await settle(node)
    await node.stop()

    clock.advance(8 * DAY)  # the main node was off for 8 days, the laptop with it
    node = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await node.start()
    try:
        assert node.registry.get("laptop") is not None  # loaded, offline
        node.tick(clock())
        await settle(node)
        assert node.registry.get("laptop") is None
        assert await node.store.load_devices() == []
    finally:
        await node.stop()


async def test_zero_keeps_offline_devices_for_good(tmp_path: Path, clock: FakeClock) -> None:
    node = MainNode(make_config(tmp_path, forget_offline_after_s=0), clock=clock, run_monitor=False)
    await node.start()
    try:
        await away_for(node, clock, await fake_worker(node, "pi"), 365 * DAY)
        assert node.registry.get("pi") is not None
        assert [d.device_id for d in await node.store.load_devices()] == ["pi"]
    finally:
        await node.stop()


def test_a_negative_forget_offline_after_s_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="forget_offline_after_s must be 0"):
        make_config(tmp_path, forget_offline_after_s=-1)


def test_a_delete_and_a_registration_in_one_commit_keep_the_last() -> None:
    from retire_cluster.main.registry import Device
    from retire_cluster.main.store import Store, _grouped

    device = Device("pi")
    forgotten_then_back = _grouped([Store.delete_device("pi"), Store.upsert_device(device)])
    assert [sql.split()[0] for sql, _rows in forgotten_then_back] == ["INSERT"]
    back_then_forgotten = _grouped([Store.upsert_device(device), Store.touch_device(device),
                                    Store.delete_device("pi")])
    assert [sql.split()[0] for sql, _rows in back_then_forgotten] == ["DELETE"]


async def test_the_web_side_forgets_it_too(tmp_path: Path, clock: FakeClock) -> None:
    """Its heartbeats are dropped, the HTTP API no longer lists it, and the devices stream says `forget`
    (the dashboard's grid drops its card)."""
    import aiohttp
    from webutil import SSE, Cluster, open_stream

    node = MainNode(make_config(tmp_path, http_enabled=True, http_port=0), clock=clock, run_monitor=False)
    await node.start()
    web = Cluster(node, aiohttp.ClientSession())
    try:
        gone = await fake_worker(node, "tablet")
        await gone.ok("heartbeat", {})
        await settle(node)
        assert "tablet" in node.web.heartbeats
        resp = await open_stream(web, "/stream/devices")
        sse = SSE(resp)
        assert (await sse.next())["event"] == "snapshot"
        await away_for(node, clock, gone, 7 * DAY)
        assert "tablet" not in node.web.heartbeats
        assert (await web.ok("GET", "/api/v1/devices"))["devices"] == []
        event = await sse.next()
        while event["event"] == "device":  # going offline (it may be forgotten before that is sent)
            event = await sse.next()
        assert (event["event"], event["data"]) == ("forget", {"device_id": "tablet"})
        resp.close()
    finally:
        await web.close()
