"""Faults injected into real processes: SIGKILLed workers, a poison task, kill -9 of the main node.

Main node and workers are the real CLI in subprocesses on 127.0.0.1, with
short heartbeat and offline timeouts so the faults play out in seconds.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from conftest import MainProcess, cli_cmd, cli_env

from retire_cluster.client import Client, ClientError
from retire_cluster.protocol.errors import ProtocolError

FAST = ("--heartbeat-interval", "0.5", "--offline-timeout", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def start_worker(main: MainProcess, tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_cmd("worker", "--main", main.address, "--token", main.token, "--device-id", name,
                "--data-dir", str(tmp_path / name), "--reconnect-max", "1", *extra),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(),
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def completed_attempts(db_path: Path) -> Dict[str, int]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT task_id, COUNT(*) FROM task_attempts WHERE outcome='completed' GROUP BY task_id")
        return {r[0]: r[1] for r in rows}


@pytest.mark.slow
def test_sigkilled_worker_task_is_requeued_and_completes_once(main_process, tmp_path: Path) -> None:
    main = main_process(*FAST)
    first = start_worker(main, tmp_path, "victim")
    other = None
    try:
        with Client(main.address, main.token) as client:
            poll(lambda: any(d["device_id"] == "victim" for d in client.devices()), what="victim registered")
            task_id = client.submit("sleep", {"seconds": 3}, max_retries=2)
            poll(lambda: client.status(task_id)["status"] == "running", what="task running")
            other = start_worker(main, tmp_path, "survivor")
            poll(lambda: any(d["device_id"] == "survivor" for d in client.devices()), what="survivor registered")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            record = client.wait(task_id, timeout_s=60)
        assert record["status"] == "completed"
        assert [(a["device_id"], a["outcome"]) for a in record["attempts"]] == [
            ("victim", "worker_lost"), ("survivor", "completed")]
        assert completed_attempts(main.data_dir / "cluster.db") == {task_id: 1}
    finally:
        stop(first)
        if other is not None:
            stop(other)


@pytest.mark.slow
def test_poison_task_that_kills_its_worker_ends_failed_worker_lost(main_process, tmp_path: Path) -> None:
    main = main_process(*FAST)
    stop_supervisor = threading.Event()
    starts: List[int] = []

    def supervise() -> None:  # what systemd or a Termux boot script would do
        while not stop_supervisor.is_set():
            proc = start_worker(main, tmp_path, "phone", "--allow", "python_eval")
            starts.append(proc.pid)
            while proc.poll() is None and not stop_supervisor.is_set():
                time.sleep(0.05)
            stop(proc)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        with Client(main.address, main.token) as client:
            poll(lambda: any(d["device_id"] == "phone" for d in client.devices()), what="worker registered")
            task_id = client.submit("python_eval", {"expression": "__import__('os').kill(__import__('os').getppid(), 9)"},
                                    max_retries=2)
            record = client.wait(task_id, timeout_s=90)
            assert record["status"] == "failed"
            assert record["error"].startswith("worker_lost")
            assert record["attempt"] == 3
            assert [a["outcome"] for a in record["attempts"]] == ["worker_lost"] * 3
            healthy = client.submit("echo", {"message": "still here"})
            assert client.wait(healthy, timeout_s=60)["result"]["output"] == "still here"
    finally:
        stop_supervisor.set()
        supervisor.join(30)
    assert len(starts) >= 4  # three deaths, one survivor


@pytest.mark.slow
def test_kill9_main_node_at_random_points_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    port = free_port()
    data_dir = tmp_path / "main"
    main = MainProcess(data_dir, *FAST).start(port)
    workers = [start_worker(main, tmp_path, f"w{i}", "--max-tasks", "4") for i in range(2)]
    acked: List[str] = []
    submitting = threading.Event()
    submitting.set()
    errors: List[BaseException] = []

    ran: List[str] = []  # run(): task_submit with wait, whose one reply says the task completed

    def stream(prefix: str, call: Callable[[Client, str], Optional[str]], done: List[str]) -> None:
        """Keep calling with keys prefix-0, prefix-1, ...; a key moves on once ``call`` returns a task id."""
        n = 0
        client = Client(main.address, main.token, timeout_s=5)
        while submitting.is_set():
            key = f"{prefix}-{n}"
            try:
                task_id = call(client, key)
            except (ClientError, TimeoutError, OSError, ProtocolError):
                client.close()  # the main node is down: the same key again (idempotent)
                client = Client(main.address, main.token, timeout_s=5)
                time.sleep(0.05)
                continue
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            if task_id is not None:
                done.append(task_id)
                n += 1
        client.close()

    def submit(client: Client, key: str) -> Optional[str]:
        return client.submit("echo", {"message": key}, idempotency_key=key)

    def run_to_end(client: Client, key: str) -> Optional[str]:
        record = client.run("echo", {"message": key}, idempotency_key=key, wait_s=5)
        return str(record["task_id"]) if record["status"] == "completed" else None

    submitters = [threading.Thread(target=stream, args=("job", submit, acked), daemon=True),
                  threading.Thread(target=stream, args=("run", run_to_end, ran), daemon=True)]
    for submitter in submitters:
        submitter.start()
    try:
        for _ in range(20):
            time.sleep(rng.uniform(0.1, 0.8))
            main.kill9()
            main = MainProcess(data_dir, *FAST).start(port)
        # A run() completes only when a main node lives long enough for a worker
        # to reconnect (backoff up to 1 s) and run its task, and the kills come
        # every 0.1-0.8 s: how many complete meanwhile is luck. So after the last
        # kill both streams go on until each has made enough calls for the checks
        # below to mean something.
        poll(lambda: (len(acked) > 50 and len(ran) > 50) or bool(errors), timeout=60,
             what="50 calls of each stream")
        submitting.clear()
        for submitter in submitters:
            submitter.join(30)
        assert not errors, errors
        with Client(main.address, main.token) as client:
            deadline = time.monotonic() + 120
            while True:  # counts, not task_list: that returns at most 10,000 records
                counts = client.cluster_status()["tasks"]
                unfinished = sum(n for state, n in counts.items() if state != "completed")
                if not unfinished:
                    break
                assert time.monotonic() < deadline, f"{unfinished} tasks never completed: {counts}"
                time.sleep(0.2)
    finally:
        for w in workers:
            stop(w)
        main.terminate()
    with sqlite3.connect(data_dir / "cluster.db") as db:
        stored = {row[0]: (row[1], row[2], row[3]) for row in db.execute(
            "SELECT task_id, status, payload, result FROM tasks")}
    assert set(acked) <= set(stored), "an acknowledged submission was lost"
    assert set(ran) <= set(stored), "a task whose end was replied was lost"
    assert len(set(acked)) == len(acked), "a retried submission created a second task"
    assert len(set(ran)) == len(ran), "a retried run created a second task"
    # Every stored task was acknowledged, or is a run's (one whose held insert was
    # committed but whose reply was lost to a kill is run again under the same key).
    runs = {task_id for task_id, row in stored.items() if json.loads(row[1])["message"].startswith("run-")}
    assert set(stored) - runs == set(acked)
    for task_id in set(acked) | set(ran):
        status, payload, result = stored[task_id]
        assert status == "completed" and json.loads(result)["output"] == json.loads(payload)["message"]
    completed = completed_attempts(data_dir / "cluster.db")
    assert set(completed) == set(stored) and set(completed.values()) == {1}, "a task was recorded twice"
    with sqlite3.connect(data_dir / "cluster.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_kill9_the_moment_a_waited_reply_arrives_keeps_its_task(tmp_path: Path) -> None:
    """What a waited ``task_submit`` reports is on disk when it arrives: the main node is killed
    the moment each reply is read (no later request, no grace), and every replied task is stored.

    The sharp end of the random kills above: a reply sent before its commit had returned would
    be caught here at once. (It did not catch what the random kills caught in the experiment of
    benchmarks/README.md's "Sixth pass": both are needed.)
    """
    port = free_port()
    data_dir = tmp_path / "main"
    main = MainProcess(data_dir, *FAST).start(port)
    worker = start_worker(main, tmp_path, "w0", "--max-tasks", "4")
    replied: List[str] = []
    try:
        for n in range(6):
            if n:
                main = MainProcess(data_dir, *FAST).start(port)
            with Client(main.address, main.token, timeout_s=10) as client:
                poll(lambda: bool(client.devices(status="online")), timeout=30, what="the worker back online")
            frame = {"message_type": "task_submit", "message_id": f"k-{n}", "sender_id": "killer",
                     "auth_token": main.token,
                     "data": {"task": {"task_type": "echo", "payload": {"message": f"m-{n}"}}, "wait": 20}}
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(json.dumps(frame).encode() + b"\n")
                line = sock.makefile("rb").readline()
                main.kill9()  # the moment the reply is read
            reply = json.loads(line)
            assert reply["message_type"] == "ack", reply
            record = reply["data"]["result"]["task"]
            assert record["status"] == "completed", record
            replied.append(record["task_id"])
    finally:
        stop(worker)
        main.terminate()
    with sqlite3.connect(data_dir / "cluster.db") as db:
        stored = {row[0]: row[1] for row in db.execute("SELECT task_id, status FROM tasks")}
    assert {task_id: stored.get(task_id) for task_id in replied} == {task_id: "completed" for task_id in replied}
