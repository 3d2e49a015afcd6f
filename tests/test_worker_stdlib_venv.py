"""The worker as a Termux user installs it: a venv holding only click and the package.

No uvloop, orjson, psutil, jsonschema or aiosqlite (pip cannot build them on
many phones). The worker from that venv joins a real main node and completes
python_eval and command tasks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

from retire_cluster.client import Client

OPTIONAL = ("uvloop", "orjson", "psutil", "jsonschema", "aiosqlite")


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def stdlib_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("termux")
    wheels = root / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO), "click")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    wheel_files = sorted(str(p) for p in wheels.glob("*.whl"))
    run(str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheel_files)
    return env_dir


@pytest.mark.slow
def test_venv_holds_only_click_and_the_package(stdlib_venv: Path) -> None:
    py = str(stdlib_venv / "bin" / "python")
    listed = run(py, "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0] for line in listed.split()}
    assert {"click", "retire-cluster"} <= names
    assert not names & set(OPTIONAL)
    probe = f"import importlib.util as u; print([m for m in {OPTIONAL!r} if u.find_spec(m)])"
    assert run(py, "-c", probe).stdout.strip() == "[]"


@pytest.mark.slow
def test_stdlib_worker_runs_python_eval_and_command(stdlib_venv: Path, main_process, tmp_path: Path) -> None:
    main = main_process()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    worker = subprocess.Popen(
        [str(stdlib_venv / "bin" / "retire-cluster"), "worker", "--main", main.address, "--token", main.token,
         "--device-id", "termux-phone", "--data-dir", str(tmp_path / "w"), "--allow", "python_eval",
         "--allow", "command"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path),
    )
    try:
        with Client(main.address, main.token) as client:
            evaluated = client.submit("python_eval", {"expression": "sum(range(100000))"})
            commanded = client.submit("command", {"argv": [sys.executable, "-c", "print('from argv')"]})
            first = client.wait(evaluated, timeout_s=60)
            second = client.wait(commanded, timeout_s=60)
            device = client.devices()[0]
        assert first["status"] == "completed" and first["result"]["output"] == "4999950000"
        assert second["status"] == "completed" and second["result"]["output"] == "from argv\n"
        assert first["assigned_device"] == second["assigned_device"] == "termux-phone"
        assert device["device_info"]["python_version"] == ".".join(map(str, sys.version_info[:3]))
        assert {"python_eval", "command"} <= set(device["task_types"])
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0]
    assert "Traceback" not in output, output
