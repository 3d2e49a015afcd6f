"""The worker stops with exit 2 and one sentence when retrying cannot help, and only then.

- on every such path the output is that one sentence: nothing is left
  for asyncio to complain about ("Future exception was never retrieved").
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List, Tuple

from conftest import cli_cmd, cli_env
from test_tls import WRONG, cert, tls_node  # noqa: F401  (fixtures)

from retire_cluster.main import MainNode

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
