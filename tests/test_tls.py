"""TLS with a pinned certificate: main node, worker agent, sync client and the CLI.

The certificate is self-signed and made here with the openssl command line
(skipped where there is none), as a home-cluster owner would make it.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Tuple

import pytest
from click.testing import CliRunner
from conftest import FakeClock, Peer, make_config
from test_agent import free_port, wait_until

from retire_cluster.cli import cli
from retire_cluster.client.sync import Client
from retire_cluster.main import ConfigError, MainNode
from retire_cluster.tls import (
    FingerprintMismatch,
    certificate_fingerprint,
    check_fingerprint,
    client_context,
    format_fingerprint,
    normalise_fingerprint,
)
from retire_cluster.worker import Agent, WorkerConfig

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl command line")
WRONG = "ab" * 32


def make_cert(directory: Path, name: str = "main") -> Tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            str(OPENSSL),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=test",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def cert(tmp_path: Path) -> Tuple[Path, Path]:
    if OPENSSL is None:
        pytest.skip("no openssl command line")
    return make_cert(tmp_path)


@pytest.fixture
async def tls_node(tmp_path: Path, clock: FakeClock, cert: Tuple[Path, Path]):
    node = MainNode(
        make_config(tmp_path, tls_cert=cert[0], tls_key=cert[1], port=free_port()),
        clock=clock,
        run_monitor=False,
    )
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


# -- fingerprints ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "AB:" * 31 + "AB",
        "ab" * 32,
        "sha256 Fingerprint=" + "AB:" * 31 + "AB",
        "  " + "Ab" * 32 + "\n",
        "SHA256 Fingerprint=" + "ab " * 31 + "ab",
    ],
)
def test_fingerprint_forms_are_accepted(text: str) -> None:
    assert normalise_fingerprint(text) == "ab" * 32
    assert format_fingerprint("ab" * 32) == "AB:" * 31 + "AB"


@pytest.mark.parametrize("text", ["", "ab" * 31, "zz" * 32, "ab" * 33, "sha1 Fingerprint=AB:CD"])
def test_bad_fingerprints_are_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ValueError, match="SHA-256 fingerprint"):
        normalise_fingerprint(text)
    with pytest.raises(ValueError):
        WorkerConfig(device_id="x", tls_fingerprint=text)


@needs_openssl
def test_fingerprint_is_what_openssl_prints(cert: Tuple[Path, Path]) -> None:
    out = subprocess.run(
        [str(OPENSSL), "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert[0])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert normalise_fingerprint(out) == certificate_fingerprint(cert[0])


def test_check_fingerprint_without_tls_refuses() -> None:
    with pytest.raises(FingerprintMismatch, match="no TLS certificate") as refused:
        check_fingerprint(None, WRONG)
    assert str(refused.value) == "the main node sent no TLS certificate"  # was the tuple ('...',)


def test_client_context_leaves_checking_to_the_pin() -> None:
    context = client_context()
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- main node and worker -------------------------------------------------------------------


async def test_worker_with_the_right_pin_registers_and_runs_a_task(
    tls_node: MainNode, tmp_path: Path
) -> None:
    assert tls_node.tls_fingerprint is not None
    config = WorkerConfig(
        main_host="127.0.0.1",
        main_port=tls_node.address[1],
        token=tls_node.token,
        device_id="pinned",
        data_dir=tmp_path / "w",
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        tls_fingerprint=format_fingerprint(tls_node.tls_fingerprint),
    )
    agent = Agent(config)
    runner = asyncio.ensure_future(agent.run())
    try:
        await wait_until(lambda: tls_node.registry.get("pinned") is not None)
        client = Client(
            f"127.0.0.1:{tls_node.address[1]}",
            tls_node.token,
            tls_fingerprint=tls_node.tls_fingerprint,
            timeout_s=10,
        )
        try:
            task_id = await asyncio.to_thread(client.submit, "echo", {"message": "over TLS"})
            record = await asyncio.to_thread(client.wait, task_id, 20)
        finally:
            client.close()
        assert record["status"] == "completed" and record["result"]["output"] == "over TLS"
    finally:
        agent.stop()
        await runner


async def test_worker_with_a_wrong_pin_sends_nothing_and_exits_2(
    tls_node: MainNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = WorkerConfig(
        main_host="127.0.0.1",
        main_port=tls_node.address[1],
        token=tls_node.token,
        device_id="mitm-victim",
        data_dir=tmp_path / "w",
        tls_fingerprint=WRONG,
    )
    assert await asyncio.wait_for(Agent(config).run(), 20) == 2
    assert tls_node.registry.get("mitm-victim") is None
    assert not any(c.authenticated for c in tls_node.server.connections)
    assert any("not the pinned" in r.getMessage() for r in caplog.records)


async def test_plain_tcp_to_a_tls_node_gets_nowhere(tls_node: MainNode) -> None:
    peer = await Peer.connect(tls_node)
    await peer.send_raw(
        b'{"message_type":"cluster_status","message_id":"m","sender_id":"c","auth_token":"'
        + (tls_node.token or "").encode()
        + b'"}\n'
    )
    assert await peer.closed_by_peer()
    assert not any(c.authenticated for c in tls_node.server.connections)


async def test_sync_client_with_a_wrong_pin_is_refused_before_sending(tls_node: MainNode) -> None:
    from retire_cluster.client.common import ClientError

    client = Client(
        f"127.0.0.1:{tls_node.address[1]}",
        tls_node.token,
        tls_fingerprint=WRONG,
        reconnect=False,
        timeout_s=5,
    )
    with pytest.raises(ClientError, match="not the pinned"):
        await asyncio.to_thread(client.cluster_status)
    client.close()
    assert not any(c.authenticated for c in tls_node.server.connections)


async def test_bad_certificate_files_are_a_config_error(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    node = MainNode(
        make_config(tmp_path, tls_cert=tmp_path / "bad.pem", tls_key=tmp_path / "bad.pem"),
        clock=clock,
        run_monitor=False,
    )
    with pytest.raises(ConfigError, match="tls-cert"):
        await node.start()
    assert not node.store.is_open


# -- the command line ------------------------------------------------------------------------


@needs_openssl
def test_cli_main_prints_the_pin_and_client_commands_use_it(main_process, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    main = main_process("--tls-cert", str(cert), "--tls-key", str(key), "--no-http")
    output = "".join(main.output)
    pin = format_fingerprint(certificate_fingerprint(cert))
    assert f"TLS certificate SHA-256 fingerprint: {pin}" in output
    assert f"--token {main.token} --tls-fingerprint {pin}" in output
    env = {"RETIRE_CLUSTER_MAIN": main.address, "RETIRE_CLUSTER_TOKEN": main.token}
    ok = CliRunner().invoke(cli, ["status", "--json", "--tls-fingerprint", pin], env=env)
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, ["status", "--tls-fingerprint", WRONG], env=env)
    assert bad.exit_code == 1 and "not the pinned" in bad.output and "Traceback" not in bad.output
