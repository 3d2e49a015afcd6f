"""The stdlib-only scripts in examples/, each run against a real main node (and a real worker)."""

from __future__ import annotations

import ast
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pytest
from conftest import REPO, MainProcess, cli_cmd, cli_env

from retire_cluster.client import Client

EXAMPLES = sorted((REPO / "examples").glob("*.py"))
PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python")


def run_example(name: str, main: MainProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # -I: no site-packages, no PYTHONPATH: proves the script needs nothing but the standard library.
    return subprocess.run([sys.executable, "-I", str(REPO / "examples" / name), "--main", main.address,
                           f"--token={main.token}", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_worker():
    procs: List[subprocess.Popen[str]] = []

    def start(main: MainProcess, *extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-I", str(REPO / "examples" / "tiny_worker.py"),
                                 "--main", main.address, f"--token={main.token}", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_device(main: MainProcess, device_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(main.address, main.token) as client:
        while not any(d["device_id"] == device_id and d["connected"] for d in client.devices()):
            assert time.monotonic() < deadline, f"{device_id} did not register"
            time.sleep(0.05)


# -- every example ------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_import_only_the_standard_library(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)


@pytest.mark.skipif(not PYTHON39.exists(), reason=f"no Python 3.9 at {PYTHON39}")
def test_examples_compile_on_python39() -> None:
    script = ("import sys\nfor p in sys.argv[1:]:\n"
              "    compile(open(p, encoding='utf-8').read(), p, 'exec', dont_inherit=True)\n")
    result = subprocess.run([str(PYTHON39), "-I", "-c", script, *map(str, EXAMPLES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_tiny_worker_is_under_150_lines() -> None:
    assert len((REPO / "examples" / "tiny_worker.py").read_text().splitlines()) < 150


# -- against a real main node ----------------------------------------------------------------


def test_submit_and_wait(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main, "--allow", "python_eval")
    out = run_example("submit_and_wait.py", main, "python_eval", '{"expression": "sum(range(100000))"}')
    assert out.returncode == 0, out.stderr
    assert out.stdout == "4999950000\n"


def test_cluster_status(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main, name="w1")
    wait_for_device(main, "w1")
    with Client(main.address, main.token) as client:
        client.submit("echo", {"message": "x"}, requirements={"role": "nobody"})  # stays pending
    plain = run_example("cluster_status.py", main)
    assert plain.returncode == 0, plain.stderr
    assert "devices: 1 online, 0 offline" in plain.stdout and "queue 1" in plain.stdout
    assert "w1" in plain.stdout and "echo" in plain.stdout
    as_json = json.loads(run_example("cluster_status.py", main, "--json").stdout)
    assert as_json["cluster_status"]["tasks"]["pending"] == 1
    assert [d["device_id"] for d in as_json["list_devices"]["devices"]] == ["w1"]
    refused = subprocess.run([sys.executable, "-I", str(REPO / "examples" / "cluster_status.py"), "--main",
                              main.address, "--token", "wrong"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "(unauthorized)" in refused.stderr


def test_batch_submit(main_process, worker_process, tmp_path: Path) -> None:
    main = main_process()
    worker_process(main, "--allow", "python_eval")
    lines = [{"task_type": "echo", "payload": {"message": f"m{i}"}} for i in range(20)]
    lines.append({"task_type": "python_eval", "payload": {"expression": "6 * 7"}})
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = run_example("batch_submit.py", main, "--window", "4", str(tasks))
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == [str(n) for n in range(1, 22)]
    assert {r[2] for r in rows} == {"completed"}
    assert [r[3] for r in rows] == [f"m{i}" for i in range(20)] + ["42"]
    assert "21 tasks: 21 completed, 0 did not" in out.stderr

    tasks.write_text('{"task_type": "echo", "payload": {"message": "ok"}}\n'
                     '{"task_type": "echo", "requirements": {"min_cpus": 1}}\n'
                     '{"task_type": "sleep", "payload": {"seconds": -1}}\n')
    mixed = run_example("batch_submit.py", main, str(tasks))
    assert mixed.returncode == 1
    assert "line 2: refused" in mixed.stderr and "3 tasks: 1 completed, 2 did not" in mixed.stderr
    assert "\tfailed\t" in mixed.stdout


def test_tiny_worker_runs_tasks_and_rejoins_after_a_restart(main_process, tiny_worker, tmp_path: Path) -> None:
    main = main_process()
    tiny_worker(main, "--device-id", "tiny", "--allow-python")
    wait_for_device(main, "tiny")
    with Client(main.address, main.token, timeout_s=30) as client:
        device = client.devices()[0]
        assert device["task_types"] == ["echo", "python_eval"]
        assert device["hardware_specs"]["cpu_cores"] >= 1 and device["device_info"]["role"] == "worker"
        echo = client.wait(client.submit("echo", {"message": "from tiny"}), timeout_s=60)
        evaluated = client.wait(client.submit("python_eval", {"expression": "sum(range(100000))"}), timeout_s=60)
        broken = client.wait(client.submit("python_eval", {"expression": "1/0"}), timeout_s=60)
    assert echo["status"] == "completed" and echo["result"]["output"] == "from tiny"
    assert evaluated["result"]["output"] == "4999950000"
    for record in (echo, evaluated):
        assert [(a["attempt"], a["device_id"], a["outcome"]) for a in record["attempts"]] == [
            (1, "tiny", "completed")]
    assert broken["status"] == "failed" and "ZeroDivisionError" in broken["error"]

    main.kill9()
    again = main_process(data_dir=main.data_dir, port=main.port)
    wait_for_device(again, "tiny", timeout_s=60)
    with Client(again.address, again.token, timeout_s=30) as client:
        record = client.wait(client.submit("echo", {"message": "after restart"}), timeout_s=60)
    assert record["result"]["output"] == "after restart" and record["attempts"][0]["device_id"] == "tiny"


def test_tiny_worker_heartbeats_and_refuses_types_it_does_not_run(main_process, tiny_worker) -> None:
    main = main_process("--heartbeat-interval", "0.2", "--offline-timeout", "60")
    tiny_worker(main, "--device-id", "tiny")  # echo only
    wait_for_device(main, "tiny")
    with Client(main.address, main.token, timeout_s=30) as client:
        assert client.devices()[0]["task_types"] == ["echo"]
        deadline = time.monotonic() + 30
        while True:  # a heartbeat moves last_seen past the registration
            device = client.devices()[0]
            if device["last_seen"] > device["registered_at"]:
                break
            assert time.monotonic() < deadline, device
            time.sleep(0.05)
        pending = client.submit("python_eval", {"expression": "1"})
        assert client.wait(client.submit("echo", {"message": "ok"}), timeout_s=60)["status"] == "completed"
        record: Any = client.status(pending)
    assert record["status"] == "pending" and record["attempts"] == []


def test_submit_and_wait_without_a_token_against_an_insecure_main_node(main_process, tmp_path: Path) -> None:
    main = main_process("--insecure")
    worker = subprocess.Popen(cli_cmd("worker", "--main", main.address, "--data-dir", str(tmp_path / "w1"),
                                      "--device-id", "w1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        out = subprocess.run([sys.executable, "-I", str(REPO / "examples" / "submit_and_wait.py"), "--main",
                              main.address, "echo", '{"message": "no token needed"}'],
                             capture_output=True, text=True, timeout=60, env=cli_env())
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
    # It used to send "auth_token": null, refused as invalid_message.
    assert out.returncode == 0, out.stderr
    assert out.stdout == "no token needed\n"


@pytest.mark.parametrize("name", ["submit_and_wait.py", "cluster_status.py", "batch_submit.py"])
def test_examples_say_in_one_line_when_no_main_node_listens(name: str, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task_type": "echo"}\n')
    args = {"submit_and_wait.py": ["echo"], "cluster_status.py": [], "batch_submit.py": [str(tasks)]}[name]
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        out = subprocess.run([sys.executable, "-I", str(REPO / "examples" / name), "--main", address,
                              "--token=t", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == f"error: cannot connect to {address} (Connection refused); " \
                         "is `retire-cluster main` running there?\n"
