"""The worker stops with exit 2 and one sentence when retrying cannot help, and only then.

- a TLS mismatch it has confirmed: a TLS main node and no --tls-fingerprint,
  or a pin against a main node without TLS (before, it retried for ever);
- a second worker registering with the same device id (before, the two
  knocked each other off the main node for ever);
- and on every such path the output is that one sentence: nothing is left
  for asyncio to complain about ("Future exception was never retrieved").

A connection that merely broke, or that a server closed without a word
while it does not speak TLS either, is still retried.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from conftest import Peer, cli_cmd, cli_env, register_data
from test_agent import wait_until
from test_tls import WRONG, cert, tls_node  # noqa: F401  (fixtures)

from retire_cluster.main import MainNode
from retire_cluster.worker import Agent, WorkerConfig


def make_agent(port: int, token: Optional[str], data_dir: Path, device_id: str = "phone", **kw: Any) -> Agent:
    return Agent(WorkerConfig(main_host="127.0.0.1", main_port=port, token=token, device_id=device_id,
                              data_dir=data_dir, reconnect_min_s=0.05, reconnect_max_s=0.2,
                              heartbeat_interval_s=0.5, **kw))


def messages(caplog: pytest.LogCaptureFixture, level: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "retire_cluster.worker" and r.levelname == level]


# -- TLS on one side only -------------------------------------------------------------


async def test_no_pin_against_a_tls_main_node_says_so_and_exits_2(
        tls_node: MainNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    agent = make_agent(tls_node.address[1], tls_node.token, tmp_path / "w")
    assert await asyncio.wait_for(agent.run(), 20) == 2
    host_port = f"127.0.0.1:{tls_node.address[1]}"
    assert messages(caplog, "ERROR") == [
        f"The main node at {host_port} speaks TLS; pass --tls-fingerprint "
        "<the fingerprint `retire-cluster main` printed>."]
    assert messages(caplog, "WARNING") == []  # the one sentence, not a lost connection first
    assert tls_node.registry.get("phone") is None


async def test_a_pin_against_a_plain_main_node_says_so_and_exits_2(
        node: MainNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(node.address[1], node.token, tmp_path / "w", tls_fingerprint=WRONG)
    assert await asyncio.wait_for(agent.run(), 20) == 2
    assert messages(caplog, "ERROR") == [
        f"The main node at 127.0.0.1:{node.address[1]} does not speak TLS; drop --tls-fingerprint "
        "or start the main node with --tls-cert and --tls-key."]
    assert messages(caplog, "WARNING") == []
    assert node.registry.get("phone") is None
    assert not any(c.authenticated for c in node.server.connections)  # the token never went out in clear


@pytest.mark.parametrize("pin", [None, WRONG], ids=["plain", "pinned"])
async def test_a_server_that_closes_without_a_word_is_still_retried(
        tmp_path: Path, pin: Optional[str], caplog: pytest.LogCaptureFixture) -> None:
    """Neither TLS nor a main node: nothing is certain, so the worker keeps trying (as it did)."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    agent = make_agent(port, "token", tmp_path / "w", tls_fingerprint=pin)
    runner = asyncio.ensure_future(agent.run())
    try:
        await wait_until(lambda: accepted >= 6 or runner.done())  # three attempts, each with its probe
        assert not runner.done()
    finally:
        agent.stop()
        assert await asyncio.wait_for(runner, 20) == 0
        server.close()
        await server.wait_closed()
    assert messages(caplog, "ERROR") == []


# -- nothing left unretrieved on the exit-2 paths -------------------------------------------


async def run_worker_cli(node: MainNode, tmp_path: Path, *extra: str) -> Tuple[int, str]:
    """``retire-cluster worker`` in a subprocess (asyncio's complaint shows when its loop closes)."""
    proc = await asyncio.create_subprocess_exec(
        *cli_cmd("worker", "--main", f"127.0.0.1:{node.address[1]}", "--token", node.token or "",
                 "--data-dir", str(tmp_path / "w"), "--reconnect-max", "1", *extra),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=cli_env())
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def error_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if not line.startswith("worker ")]


async def test_a_refused_pin_is_one_sentence_and_exit_2(tls_node: MainNode, tmp_path: Path) -> None:  # noqa: F811
    """Before, "Future exception was never retrieved" and a ConnectionError followed the sentence."""
    code, output = await run_worker_cli(tls_node, tmp_path, "--device-id", "pinned", "--tls-fingerprint", WRONG)
    assert code == 2
    lines = error_lines(output)
    assert len(lines) == 1 and "Refusing the main node" in lines[0] and "not the pinned" in lines[0], output


async def test_a_refused_registration_is_one_sentence_and_exit_2(node: MainNode, tmp_path: Path) -> None:
    code, output = await run_worker_cli(node, tmp_path, "--device-id", "bad\x01id")
    assert code == 2
    lines = error_lines(output)
    assert len(lines) == 1 and "The main node refused to register this worker" in lines[0], output


# -- two workers, one device id ------------------------------------------------------------


async def test_a_second_worker_with_the_same_device_id_stops_the_first_with_exit_2(
        node: MainNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = make_agent(node.address[1], node.token, tmp_path / "w1", device_id="twin")
    second = make_agent(node.address[1], node.token, tmp_path / "w2", device_id="twin")
    first_run = asyncio.ensure_future(first.run())
    second_run: Optional[asyncio.Future[int]] = None
    try:
        await wait_until(first.registered.is_set)
        second_run = asyncio.ensure_future(second.run())
        assert await asyncio.wait_for(first_run, 20) == 2
        assert messages(caplog, "ERROR") == [
            "Another worker registered as the same device id ('twin'); give each worker its own --device-id."]
        await wait_until(second.registered.is_set)
        device = node.registry.get("twin")
        assert device is not None and device.conn is not None and second._writer is not None
        assert device.conn.peer == f"127.0.0.1:{second._writer.get_extra_info('sockname')[1]}"
        assert not second_run.done()
    finally:
        first.stop()
        second.stop()
        await asyncio.wait_for(first_run, 20)
        if second_run is not None:
            assert await asyncio.wait_for(second_run, 20) == 0


async def test_a_reconnecting_worker_still_takes_over_its_old_connection(node: MainNode, tmp_path: Path) -> None:
    """The phone on another Wi-Fi: its old connection (played here by a raw peer) is told why and closed."""
    old = await Peer.connect(node, "phone")
    assert (await old.request("register", register_data()))["message_type"] == "ack"
    agent = make_agent(node.address[1], node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        farewell = await old.recv()
        assert farewell["message_type"] == "error"
        assert farewell["data"]["original_message_id"] is None and farewell["data"]["code"] == "conflict"
        assert "registered as device 'phone'" in farewell["data"]["error"]
        assert await old.closed_by_peer()
        await wait_until(agent.registered.is_set)
        device = node.registry.get("phone")
        assert device is not None and device.conn is not None and device.conn.device_id == "phone"
        assert not runner.done()
    finally:
        agent.stop()
        assert await asyncio.wait_for(runner, 20) == 0
