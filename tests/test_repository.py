"""The repository keeps its promises: CI runs the README's test command; the wheel ships schemas."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def readme_commands() -> list:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quick, flags=re.S)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert "retire-cluster main" in commands[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the README test command must appear verbatim in .ci/run"


def test_wheel_contains_every_schema(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("retire_cluster-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for schema in (REPO / "schemas").glob("*.json"):
        assert f"retire_cluster/schemas/{schema.name}" in names
    assert "retire_cluster/protocol/codec.py" in names
    static = sorted((REPO / "retire_cluster" / "web" / "static").iterdir())
    assert {p.name for p in static} >= {"index.html", "dashboard.js", "dashboard.css"}
    for path in static:  # the dashboard page is package data: served with no CDN, no checkout
        assert f"retire_cluster/web/static/{path.name}" in names
