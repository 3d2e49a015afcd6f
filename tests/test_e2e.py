"""The real programs on 127.0.0.1: `retire-cluster main`, `worker`, the CLI and the example."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

from conftest import REPO, MainProcess, cli_cmd, cli_env

from retire_cluster.client import Client


def run_cli(main: MainProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(RETIRE_CLUSTER_MAIN=main.address, RETIRE_CLUSTER_TOKEN=main.token))


def test_seed_example_through_a_real_worker(main_process, worker_process) -> None:
    main = main_process()
    assert f"retire-cluster worker --main 127.0.0.1:{main.port} --token {main.token}" in "".join(main.output)
    worker_process(main, "--allow", "python_eval")
    done = run_cli(main, "submit", "python_eval", "--payload", '{"expression": "sum(range(100000))"}', "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "4999950000\n"

    devices = run_cli(main, "devices", "--json")
    listed = json.loads(devices.stdout)
    assert [d["device_id"] for d in listed] == ["w1"]
    assert "python_eval" in listed[0]["task_types"]
    table = run_cli(main, "tasks")
    assert "python_eval" in table.stdout and "completed" in table.stdout
    status = json.loads(run_cli(main, "status", "--json").stdout)
    assert status["tasks"]["completed"] == 1 and status["devices"]["online"] == 1


def test_failures_and_python_eval_needs_allow(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main)  # python_eval not allowed here
    echo = run_cli(main, "submit", "echo", "--payload", '{"message": "hi"}', "--wait")
    assert echo.stdout == "hi\n"
    failed = run_cli(main, "submit", "sleep", "--payload", '{"seconds": -1}', "--wait")
    assert failed.returncode == 1 and "failed" in failed.stderr
    queued = run_cli(main, "submit", "python_eval", "--payload", '{"expression": "1"}')
    task_id = queued.stdout.strip()
    with Client(main.address, main.token) as client:
        assert client.status(task_id)["status"] == "pending"
        client.cancel(task_id)
    again = run_cli(main, "cancel", task_id)
    assert again.returncode == 1 and "already ended" in again.stderr


def test_stdlib_example_submits_and_prints(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main)
    out = subprocess.run(
        [sys.executable, "-I", str(REPO / "examples" / "submit_and_wait.py"), "--main", main.address,
         f"--token={main.token}", "echo", '{"message": "from a script"}'],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from a script\n"


def test_kill9_after_acknowledged_submissions_loses_nothing(main_process, tmp_path) -> None:
    data_dir = tmp_path / "durable"
    main = main_process(data_dir=data_dir)
    with Client(main.address, main.token) as client:
        ids = [client.submit("echo", {"message": f"n{i}"}) for i in range(50)]
    main.kill9()
    restarted = main_process(data_dir=data_dir)
    with Client(restarted.address, restarted.token) as client:
        listed = client.tasks(limit=1000)
        assert sorted(t["task_id"] for t in listed) == sorted(ids)
        assert {t["status"] for t in listed} == {"pending"}
        assert client.status(ids[7])["payload"] == {"message": "n7"}
    assert restarted.terminate() == 0
    with sqlite3.connect(data_dir / "cluster.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sigterm_exits_zero_and_token_command(main_process, tmp_path) -> None:
    log_file = tmp_path / "logs" / "main.log"
    main = main_process("--log-file", str(log_file))
    token = subprocess.run(cli_cmd("token", "--data-dir", str(main.data_dir)), capture_output=True,
                           text=True, env=cli_env(), timeout=30)
    assert token.returncode == 0 and token.stdout.strip() == main.token
    assert main.terminate() == 0
    logged = log_file.read_text()
    assert "main node listening on 127.0.0.1" in logged and "main node stopped" in logged
    missing = subprocess.run(cli_cmd("token", "--data-dir", str(tmp_path / "nothing")), capture_output=True,
                             text=True, env=cli_env(), timeout=30)
    assert missing.returncode == 1 and "start `retire-cluster main" in missing.stderr


def test_insecure_listens_on_loopback_and_says_so(main_process, tmp_path) -> None:
    proc = subprocess.Popen(cli_cmd("main", "--insecure", "--port", "0", "--data-dir", str(tmp_path / "ins")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or "retire-cluster worker" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        text = "".join(lines)
        assert "listening on 127.0.0.1:" in text
        assert "--insecure" in text and "127.0.0.1 only" in text
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
