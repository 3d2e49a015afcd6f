"""Lint and types are part of the suite: ruff on everything, mypy on the package (--strict on the protocol)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    out = run("ruff", "check", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_protocol_package_is_strictly_typed() -> None:
    out = run("mypy", "--strict", "retire_cluster/protocol")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_types_check() -> None:
    """The main node, the worker, the clients and the CLI (the worker's own code in Python 3.9 syntax)."""
    out = run("mypy", "retire_cluster")
    assert out.returncode == 0, out.stdout + out.stderr
