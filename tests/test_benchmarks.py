"""benchmarks/ keeps issue 7's contract: every script runs as ``python benchmarks/NAME.py [--quick]`` and is documented.

The scripts themselves run outside the test suite (they measure speed); this
only starts each one with ``--help``, which needs no optional package (Dask,
Ray, Celery are imported when a comparison runs), so a refactor that breaks a
script's imports or drops its ``--quick`` fails here, not at the next
benchmark run.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 6  # issue 7's six, and the ones added since
    for name in ("heartbeats", "tasks", "registrations", "scheduler", "recovery", "vs_dask"):
        assert BENCHMARKS / f"{name}.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_starts_and_offers_quick(script) -> None:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"usage: {script.name}" in out.stdout
    assert "--quick" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_is_in_the_readme_table(script) -> None:
    table = (BENCHMARKS / "README.md").read_text()
    assert f"| `{script.name}` |" in table
