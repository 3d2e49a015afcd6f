"""The command line: settings precedence, bad input is one sentence and a non-zero exit, and the
client commands (submit-batch, watch, task, devices, completion) against a real main node."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import MainProcess, cli_cmd, cli_env, restart_while_a_task_runs

from retire_cluster.cli import build_main_config, cli, parse_requirements
from retire_cluster.client import Client
from retire_cluster.main.config import ConfigError
from retire_cluster.tables import device_row, format_ago, task_detail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_config_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "main.json"
    conf.write_text(json.dumps({"port": 9001, "heartbeat_interval": 30, "offline_timeout": 120,
                                "data_dir": str(tmp_path / "d")}))
    config, host_given = build_main_config(str(conf), {"port": None, "host": None})
    assert (config.port, config.heartbeat_interval_s, config.offline_timeout_s) == (9001, 30, 120)
    assert config.data_dir == tmp_path / "d" and config.host == "0.0.0.0" and not host_given
    config, _ = build_main_config(str(conf), {"port": 9002})  # flag or env (click merged them)
    assert config.port == 9002 and config.heartbeat_interval_s == 30


@pytest.mark.parametrize(("setting", "message"), [
    ({"insecure": "false"}, 'insecure must be true or false, not "false".'),  # was true: no token auth at all
    ({"port": 18482.7}, "port must be a whole number, not 18482.7."),  # was a traceback
    ({"host": 127}, "host must be a string, not 127."),
    ({"port": True}, "port must be a whole number, not true."),
    ({"heartbeat_interval": "5"}, 'heartbeat_interval must be a number, not "5".'),
    ({"tls_cert": 5}, "tls_cert must be a path or null, not 5."),
])
def test_a_config_file_value_of_the_wrong_type_is_one_sentence(tmp_path: Path, setting: dict, message: str) -> None:
    conf = tmp_path / "main.json"
    conf.write_text(json.dumps(setting))
    with pytest.raises(ConfigError) as refused:
        build_main_config(str(conf), {})
    assert str(refused.value) == message
    result = CliRunner().invoke(cli, ["main", "--config", str(conf), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and result.output.strip().endswith(message) and "Traceback" not in result.output


def test_the_environment_turns_http_back_on_over_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "main.json"
    conf.write_text(json.dumps({"http_enabled": False}))
    assert build_main_config(str(conf), {"no_http": False})[0].http_enabled  # RETIRE_CLUSTER_NO_HTTP=false
    assert not build_main_config(str(conf), {"no_http": None})[0].http_enabled


def test_insecure_defaults_to_loopback_unless_host_given() -> None:
    config, _ = build_main_config(None, {"insecure": True})
    assert config.host == "127.0.0.1"
    config, host_given = build_main_config(None, {"insecure": True, "host": "0.0.0.0"})
    assert config.host == "0.0.0.0" and host_given


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "bad.json"
    conf.write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError, match="unknown setting 'prot' in .*; did you mean 'port'\\? known: "):
        build_main_config(str(conf), {})
    conf.write_text(json.dumps({"heartbeat": 2}))  # the flag's name, less a word: named too
    with pytest.raises(ConfigError, match="did you mean 'heartbeat_interval'\\?"):
        build_main_config(str(conf), {})
    with pytest.raises(ConfigError, match="offline_timeout must be longer"):
        build_main_config(None, {"heartbeat_interval": 60.0, "offline_timeout": 30.0})
    conf.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_main_config(str(conf), {})


def test_main_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "bad.json"
    conf.write_text(json.dumps({"colour": "blue"}))
    result = CliRunner().invoke(cli, ["main", "--config", str(conf)])
    assert result.exit_code == 2
    assert "unknown setting 'colour'" in result.output


def test_environment_variables_reach_main_options(tmp_path: Path) -> None:
    conf = tmp_path / "bad.json"
    conf.write_text("[]")
    result = CliRunner().invoke(cli, ["main"], env={"RETIRE_CLUSTER_CONFIG": str(conf)})
    assert result.exit_code == 2 and "must hold a JSON object" in result.output


def test_requirements_parsing() -> None:
    assert parse_requirements(["min_cpu_cores=2", "min_memory_gb=1.5", "capabilities=gpu, camera",
                               "platform=linux"]) == {
        "min_cpu_cores": 2, "min_memory_gb": 1.5, "capabilities": ["gpu", "camera"], "platform": "linux"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "echo", "--payload", "{oops"], "not valid JSON"),
        (["submit", "echo", "--payload", "[1]"], "must be a JSON object"),
        (["submit", "echo", "--requires", "min_cpus=2"], "unknown requirement 'min_cpus'"),
        (["submit", "echo", "--requires", "min_cpu_cores=two"], "min_cpu_cores needs a whole number, got 'two'"),
        (["submit", "echo", "--requires", "min_cpu_cores=1.5"], "min_cpu_cores needs a whole number, got '1.5'"),
        (["submit", "echo", "--requires", "nonsense"], "is not key=value"),
        (["submit", "echo", "--priority", "asap"], "use low, normal, high, urgent"),
        (["submit", "echo", "--timeout", "0"], "more than 0"),
        (["submit", "echo", "--timeout", "nan"], "must be a number of seconds more than 0"),
        (["submit", "echo", "--timeout", "inf"], "must be a number of seconds more than 0"),
        (["submit", "echo", "--requires", "min_memory_gb=nan"], "min_memory_gb needs a number"),
        (["worker", "--main", "host:notaport"], "port must be a number"),
        (["worker", "--main", "http://127.0.0.1:5000/"], "is a URL; give the main node's TCP address"),
        (["worker", "--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["worker", "--heartbeat-interval", "-1"], "--heartbeat-interval"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(args: list, message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_unreachable_main_node_is_exit_1_with_a_hint() -> None:
    port = free_port()
    result = invoke("status", "--main", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert "cannot connect to the main node" in result.output and "retire-cluster main" in result.output
    assert "Traceback" not in result.output


# -- client commands against a real main node (submit-batch, watch, task, devices) ------------------



def against(main: MainProcess, *args: str, input: str | None = None):
    env = {"RETIRE_CLUSTER_MAIN": main.address, "RETIRE_CLUSTER_TOKEN": main.token}
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def wait_for_devices(main: MainProcess, n: int) -> None:
    deadline = time.monotonic() + 30
    with Client(main.address, main.token) as client:
        while len([d for d in client.devices() if d["connected"]]) < n:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.05)


BATCH = "\n".join([
    '{"task_type": "echo", "payload": {"message": "one"}}',
    "",
    "# a comment",
    '{"task_type": "python_eval", "payload": {"expression": "2 ** 10"}, "priority": "high"}',
    "not json",
    '{"task_type": "sleep", "payload": {"seconds": -1}}',
    '{"task_type": "echo", "requirements": {"min_cpus": 1}}',
    '{"task_type": "echo", "colour": "blue"}',
]) + "\n"


def test_submit_batch_skips_bad_lines_and_waits_for_the_rest(main_process, worker_process, tmp_path: Path) -> None:
    main = main_process()
    worker_process(main, "--allow", "python_eval")
    batch = tmp_path / "tasks.jsonl"
    batch.write_text(BATCH)
    result = against(main, "submit-batch", str(batch), "--wait", "--concurrency", "2")
    assert result.exit_code == 1  # bad lines, and one task failed
    assert f"{batch} line 5: not valid JSON" in result.stderr
    assert f"{batch} line 7: refused by the main node: $.data.task.requirements" in result.stderr
    assert f"{batch} line 8: unknown field 'colour'" in result.stderr
    assert "3 tasks: 2 completed, 1 failed; 3 lines refused or skipped" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(r[0], r[2], r[3]) for r in rows] == [("1", "completed", "one"), ("4", "completed", "1024"),
                                                  ("6", "failed", "sleep")]
    with Client(main.address, main.token) as client:
        assert client.status(rows[1][1])["priority"] == 10


def test_submit_batch_json_and_stdin(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main)
    lines = "".join(f'{{"task_type": "echo", "payload": {{"message": "m{i}"}}}}\n' for i in range(30))
    result = against(main, "submit-batch", "-", "--json", "--wait", input=lines)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {"completed": 30} and report["errors"] == [] and report["not_sent"] == 0
    assert [r["output"] for r in report["results"]] == [f"m{i}" for i in range(30)]
    assert [r["line"] for r in report["submitted"]] == list(range(1, 31))
    plain = against(main, "submit-batch", "-", input="".join(lines.splitlines(True)[:4]))
    assert plain.exit_code == 0 and len(plain.stdout.split()) == 4
    assert plain.stderr.endswith("submitted 4 tasks\n")


def test_submit_batch_skips_a_line_too_large_to_send(main_process, tmp_path: Path) -> None:
    """Before, the main node closed the connection and the whole batch stopped, half submitted."""
    main = main_process()
    batch = tmp_path / "big.jsonl"
    lines = [json.dumps({"task_type": "echo", "payload": {"message": m}}) for m in ("a", "x" * (1 << 20), "c")]
    batch.write_text("\n".join(lines) + "\n")
    result = against(main, "submit-batch", str(batch), "--concurrency", "1")
    assert result.exit_code == 1
    assert f"{batch} line 2: too large to send: The task_submit request is " in result.stderr
    assert "submitted 2 tasks; 1 line refused or skipped" in result.stderr
    assert len(result.stdout.split()) == 2


def test_submit_batch_abort(main_process, tmp_path: Path) -> None:
    main = main_process()
    batch = tmp_path / "tasks.jsonl"
    batch.write_text(BATCH)
    result = against(main, "submit-batch", str(batch), "--on-error", "abort")
    assert result.exit_code == 2 and "line 5: not valid JSON" in result.stderr
    assert "nothing was submitted" in result.stderr
    batch.write_text('{"task_type": "echo", "requirements": {"min_cpus": 1}}\n'
                     + '{"task_type": "echo"}\n' * 5)
    refused = against(main, "submit-batch", str(batch), "--on-error", "abort", "--concurrency", "1")
    assert refused.exit_code == 1 and "line 1: refused" in refused.stderr
    assert "5 not sent after the error" in refused.stderr
    with Client(main.address, main.token) as client:
        assert client.tasks() == []


def test_watch_once_task_history_and_devices(main_process, worker_process) -> None:
    main = main_process()
    worker_process(main, name="w1")
    wait_for_devices(main, 1)
    with Client(main.address, main.token) as client:
        done = client.wait(client.submit("echo", {"message": "seen"}), timeout_s=60)
        queued = client.submit("echo", requirements={"role": "nobody"})
    frame = against(main, "watch", "--once")
    assert frame.exit_code == 0, frame.output
    assert f"retire-cluster {main.address}" in frame.stdout
    assert "devices: 1 online, 0 offline" in frame.stdout and "queue: 1" in frame.stdout
    assert "w1" in frame.stdout and done["task_id"] in frame.stdout and queued in frame.stdout
    assert "\x1b[" not in frame.stdout  # not a terminal: no escape codes
    as_json = json.loads(against(main, "watch", "--once", "--json").stdout)
    assert [d["device_id"] for d in as_json["devices"]] == ["w1"]
    assert [t["task_id"] for t in as_json["tasks"]] == [queued, done["task_id"]]

    detail = against(main, "task", done["task_id"])
    assert detail.exit_code == 0
    for expected in ("status        completed", "output        seen", "attempt       1 (at most 4)",
                     "attempt  device  assigned", "completed"):
        assert expected in detail.stdout, detail.stdout
    history = detail.stdout.splitlines()[-1].split()
    assert history[0] == "1" and history[1] == "w1" and history[-1] == "completed"
    waiting = against(main, "task", queued)
    assert "no attempts yet" in waiting.stdout
    assert ("waiting       the one device that runs 'echo' does not meet role=nobody; "
            "`retire-cluster devices` shows what each has.") in waiting.stdout
    assert "stuck: 1 echo {\"role\": \"nobody\"} task: the one device that runs 'echo'" in frame.stdout

    devices = against(main, "devices")
    assert devices.stdout.splitlines()[0].split() == ["device", "status", "role", "platform", "cores", "memory",
                                                       "load", "battery", "tasks", "ok/failed", "avg", "time",
                                                       "breaker", "last", "seen"]
    assert devices.stdout.splitlines()[2].startswith("w1")


def test_submit_wait_says_why_the_task_waits_and_ends_once_a_device_can_run_it(
        main_process, worker_process, monkeypatch: pytest.MonkeyPatch) -> None:
    from retire_cluster import cli_client

    main = main_process()
    worker_process(main, name="plain")  # echo and sleep only
    wait_for_devices(main, 1)
    monkeypatch.setattr(cli_client, "NOTICE_S", 0.2)
    said = threading.Event()
    say = cli_client._say_still_waiting
    monkeypatch.setattr(cli_client, "_say_still_waiting", lambda record: (say(record), said.set()))

    def stuck_then_able() -> None:
        if said.wait(60):
            status = against(main, "status")
            stuck.append(status.stdout)
            worker_process(main, "--allow", "python_eval", name="able")

    stuck: list = []
    helper = threading.Thread(target=stuck_then_able)
    helper.start()
    try:
        result = against(main, "submit", "python_eval", "--payload", '{"expression": "6 * 7"}', "--wait")
    finally:
        said.set()
        helper.join()
    assert result.exit_code == 0, result.output
    assert result.stdout == "42\n"
    task_id = result.stderr.split()[1]
    assert result.stderr == (
        f"task {task_id} is waiting for a device: no device runs 'python_eval' tasks (they run echo, sleep); "
        "its owner must allow it with `retire-cluster worker --allow python_eval`.\n"
        f"Still waiting; Ctrl-C stops waiting (the task stays queued; `retire-cluster cancel {task_id}` drops it).\n")
    assert "stuck: 1 python_eval task: no device runs 'python_eval' tasks" in stuck[0]
    assert "stuck" not in against(main, "status").stdout
    assert json.loads(against(main, "status", "--json").stdout)["stuck"] == []


def test_wait_timeout_stops_waiting_with_124_and_the_task_goes_on(main_process, worker_process) -> None:
    """Before, `submit --wait` for a task no device could run waited until Ctrl-C; there was no bound."""
    main = main_process()
    worker_process(main, name="plain")  # echo and sleep only
    wait_for_devices(main, 1)

    stuck = against(main, "submit", "python_eval", "--payload", '{"expression": "1"}', "--wait-timeout", "0.5")
    assert stuck.exit_code == 124, stuck.output
    task_id = stuck.stderr.split()[1]
    assert stuck.stdout == "" and stuck.stderr == (
        f"task {task_id} did not end within --wait-timeout; it is waiting for a device and goes on "
        f"(`retire-cluster task {task_id} --wait` waits again, `retire-cluster cancel {task_id}` drops it).\n")
    with Client(main.address, main.token) as client:
        assert client.status(task_id)["status"] == "pending"  # nothing was cancelled

    again = against(main, "task", task_id, "--wait-timeout", "0.3", "--json")  # an existing task, for scripts
    assert again.exit_code == 124, again.output
    assert json.loads(again.stdout)["status"] == "pending" and "did not end within --wait-timeout" in again.stderr

    done = against(main, "submit", "echo", "--payload", '{"message": "in time"}', "--wait-timeout", "60")
    assert (done.exit_code, done.stdout) == (0, "in time\n")
    later = against(main, "submit", "sleep", "--payload", '{"seconds": 0.2}')
    ended = against(main, "task", later.stdout.strip(), "--wait")  # waits for the end, as submit --wait does
    assert (ended.exit_code, ended.stdout) == (0, "slept 0.2 s\n")

    batch = against(main, "submit-batch", "-", "--wait-timeout", "1", input=(
        '{"task_type": "echo", "payload": {"message": "a"}}\n'
        '{"task_type": "python_eval", "payload": {"expression": "6 * 7"}}\n'))
    assert batch.exit_code == 124, batch.output
    assert [row.split()[2:] for row in batch.stdout.splitlines()[2:]] == [["completed", "a"], ["pending"]]
    assert batch.stderr.endswith("2 tasks: 1 completed, 1 pending\n1 task did not end within --wait-timeout "
                                 "and goes on; `retire-cluster task ID --wait` waits for one again.\n")

    for bad in ("0", "-1", "nan"):
        refused = against(main, "submit", "echo", "--wait-timeout", bad)
        assert refused.exit_code == 2 and "--wait-timeout': must be a number of seconds more than 0." in \
            refused.output


@pytest.mark.slow
def test_submit_wait_outlives_a_main_node_restart_and_runs_the_task_once(main_process, worker_process) -> None:
    """Before, `submit --wait` said "task_submit was sent but not answered, check whether it took effect" and
    exited 1 when the main node restarted under it; now each submission has a key of its own, so the
    client sends it again on a new connection and the main node answers with the same task."""
    main = main_process()
    worker_process(main)
    wait_for_devices(main, 1)
    outcome: dict = {}
    waiting = threading.Thread(target=lambda: outcome.setdefault("result", against(
        main, "submit", "sleep", "--payload", '{"seconds": 2}', "--wait")))
    waiting.start()
    again = restart_while_a_task_runs(main, main_process, waiting)
    result = outcome["result"]
    assert (result.exit_code, result.stdout) == (0, "slept 2 s\n"), result.output
    with Client(again.address, again.token) as client:
        assert [t["status"] for t in client.tasks()] == ["completed"]  # one task, run once
        assert client.tasks()[0]["attempt"] == 1


def test_task_says_when_the_device_holding_it_is_gone(main_process, worker_process) -> None:
    """Before, a task of a worker killed with -9 showed as running on it, with nothing to say why it did not move."""
    main = main_process()
    worker = worker_process(main)
    wait_for_devices(main, 1)
    task_id = against(main, "submit", "sleep", "--payload", '{"seconds": 60}').stdout.strip()
    deadline = time.monotonic() + 30
    with Client(main.address, main.token) as client:
        while client.status(task_id)["status"] != "running":
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.05)
        assert "not connected" not in against(main, "task", task_id).stdout  # there, and working on it
        worker.kill()
        worker.wait(10)
        while any(d["connected"] for d in client.devices()):
            assert time.monotonic() < deadline, "the main node did not see the worker go"
            time.sleep(0.05)
    shown = against(main, "task", task_id)
    assert shown.exit_code == 0
    device_line = next(line for line in shown.stdout.splitlines() if line.startswith("device "))
    assert re.fullmatch(r"device +w1 \(not connected, last seen \d+s ago: the task goes back to the queue "
                        r"unless the device returns within the main node's --offline-timeout\)", device_line), \
        device_line


def test_submit_batch_wait_says_what_is_stuck(main_process, worker_process, monkeypatch: pytest.MonkeyPatch) -> None:
    from retire_cluster import cli_client

    main = main_process()
    worker_process(main, name="plain")
    wait_for_devices(main, 1)
    monkeypatch.setattr(cli_client, "NOTICE_S", 0.2)
    said = threading.Event()
    say = cli_client._say_stuck
    monkeypatch.setattr(cli_client, "_say_stuck", lambda lines: (say(lines), lines and said.set()))
    helper = threading.Thread(target=lambda: said.wait(60) and worker_process(main, "--allow", "python_eval",
                                                                              name="able"))
    helper.start()
    lines = '{"task_type": "echo", "payload": {"message": "a"}}\n{"task_type": "python_eval", ' \
            '"payload": {"expression": "6 * 7"}}\n'
    try:
        result = against(main, "submit-batch", "-", "--wait", input=lines)
    finally:
        said.set()
        helper.join()
    assert result.exit_code == 0, result.output
    assert ("stuck: 1 python_eval task: no device runs 'python_eval' tasks (they run echo, sleep); its owner "
            "must allow it with `retire-cluster worker --allow python_eval`.\n"
            "Still waiting; Ctrl-C stops waiting (the tasks stay queued).") in result.stderr
    assert [row.split()[2:] for row in result.stdout.splitlines()[2:]] == [["completed", "a"], ["completed", "42"]]


def test_device_and_task_views() -> None:
    now = 1_800_000_000.0
    record = {
        "device_id": "phone", "status": "online", "connected": True, "accepting": True,
        "device_info": {"role": "mobile", "platform": "android"},
        "hardware_specs": {"cpu_cores": 8, "memory_total": 8 * 2**30},
        "system_metrics": {"battery_percent": 87.0, "charging": True, "load_average": [0.52, 0.4, 0.3]},
        "active_tasks": 1, "max_concurrent_tasks": 2, "last_seen": "2027-01-15T08:00:00.000Z",
        "statistics": {"successes": 7, "failures": 2, "average_time": 1.5}, "circuit_breaker": {"state": "open"},
    }  # fmt: skip
    assert device_row(record, now) == ["phone", "online", "mobile", "android", "8", "8.0 GiB", "0.52",
                                       "87% charging", "1/2", "7/2", "1.500 s", "open",
                                       format_ago("2027-01-15T08:00:00.000Z", now)]
    paused = dict(record, accepting=False, system_metrics={"cpu_usage": 12.0, "battery_percent": 40})
    assert device_row(paused, now)[1:2] + device_row(paused, now)[6:8] == ["online (paused)", "12% cpu", "40%"]
    assert format_ago("2027-01-15T08:00:00.000Z", 1_800_000_000.0 + 0) != "-"
    assert format_ago(None) == "-"
    text = task_detail({"task_id": "t", "task_type": "sleep", "status": "failed", "priority": 5, "timeout": 10,
                        "max_retries": 1, "attempt": 2, "error": "timed out", "result": {"stderr": "boom\n"},
                        "attempts": [{"attempt": 1, "device_id": "a", "assigned_at": "2027-01-15T08:00:00.000Z",
                                      "started_at": "2027-01-15T08:00:01.000Z",
                                      "finished_at": "2027-01-15T08:00:03.500Z", "outcome": "worker_lost"},
                                     {"attempt": 2, "device_id": "b", "assigned_at": "2027-01-15T08:01:00.000Z",
                                      "finished_at": "2027-01-15T08:01:10.000Z", "outcome": "timeout"}]})
    assert "attempt       2 (at most 2)" in text and "stderr        boom" in text
    # "took" is run time: attempt 2 never reported a start, so its 10 s since assignment is not shown
    assert re.search(r"\b2\.500 s +worker_lost", text) and re.search(r" - +timeout", text)


def test_client_commands_fail_with_one_sentence_without_a_main_node(tmp_path: Path) -> None:
    port = free_port()
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"task_type": "echo"}\n')
    for args in (["watch", "--once"], ["submit-batch", str(batch)], ["task", "x"], ["devices"]):
        result = invoke(*args, "--main", f"127.0.0.1:{port}")
        assert result.exit_code == 1, args
        assert result.stderr.startswith("Error: cannot connect to the main node"), result.stderr
        assert "Traceback" not in result.output


def test_a_second_main_node_on_the_same_data_dir_or_port_stops_at_once_with_one_sentence(
        main_process, tmp_path: Path) -> None:
    main = main_process("--no-http")
    pid = main.proc.pid
    same_dir = subprocess.run(cli_cmd("main", "--host", "127.0.0.1", "--port", "0", "--no-http",
                                      "--data-dir", str(main.data_dir)),
                              capture_output=True, text=True, env=cli_env(), timeout=60)
    assert same_dir.returncode == 1, same_dir.stderr
    assert same_dir.stderr.splitlines()[-1] == (
        f"Error: another main node (pid {pid}) is using {main.data_dir / 'cluster.db'}; "
        "stop it first, or give this one another --data-dir.")
    # A port in use: before, the store's thread kept the failed process alive after the error.
    same_port = subprocess.run(cli_cmd("main", "--host", "127.0.0.1", "--port", str(main.port), "--no-http",
                                       "--data-dir", str(tmp_path / "other")),
                               capture_output=True, text=True, env=cli_env(), timeout=60)
    assert same_port.returncode == 1 and "Choose another --port." in same_port.stderr
    with Client(main.address, main.token) as client:  # the first one never noticed
        assert client.run("echo", {"message": "still here"}, wait_s=0.1)["status"] == "pending"


def test_a_second_worker_on_the_same_data_dir_or_an_unusable_one_stops_with_one_sentence(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the first worker keeps trying, holding its data dir
    data = tmp_path / "w"
    first = subprocess.Popen(cli_cmd("worker", "--main", f"127.0.0.1:{port}", "--data-dir", str(data)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 30
        while not (data / "worker.lock").exists() or not (data / "worker.lock").read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(cli_cmd("worker", "--main", f"127.0.0.1:{port}", "--data-dir", str(data)),
                                capture_output=True, text=True, env=cli_env(), timeout=60)
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"Error: another worker (pid {first.pid}) is using --data-dir {data}; "
            "stop it first, or give this one another --data-dir.")
    finally:
        first.terminate()
        first.wait(30)
    (tmp_path / "afile").write_text("")
    bad = subprocess.run(cli_cmd("worker", "--main", f"127.0.0.1:{port}", "--data-dir",
                                 str(tmp_path / "afile" / "sub")),
                         capture_output=True, text=True, env=cli_env(), timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1].startswith(f"Error: cannot use --data-dir {tmp_path / 'afile' / 'sub'} (")
    scratch = subprocess.run(cli_cmd("worker", "--main", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "w2"),
                                     "--allow", "python_eval", "--scratch-dir", str(tmp_path / "afile" / "s")),
                             capture_output=True, text=True, env=cli_env(), timeout=60)
    assert scratch.returncode == 2 and "Traceback" not in scratch.stderr  # before: it ran, and every task failed
    assert scratch.stderr.splitlines()[-1].startswith(f"Error: cannot use --scratch-dir {tmp_path / 'afile' / 's'} (")


def test_unknown_task_is_one_sentence(main_process) -> None:
    main = main_process()
    result = against(main, "task", "nope")
    assert result.exit_code == 1 and result.stderr == "Error: No task 'nope'; `retire-cluster tasks` lists them.\n"


def test_shell_completion_script_and_candidates() -> None:
    script = subprocess.run(cli_cmd(), capture_output=True, text=True, timeout=60,
                            env=cli_env(_RETIRE_CLUSTER_COMPLETE="bash_source"))
    assert script.returncode == 0 and "_retire_cluster_completion()" in script.stdout
    assert "complete -o nosort -F _retire_cluster_completion retire-cluster" in script.stdout
    words = subprocess.run(cli_cmd(), capture_output=True, text=True, timeout=60,
                           env=cli_env(_RETIRE_CLUSTER_COMPLETE="bash_complete", COMP_WORDS="retire-cluster sub",
                                       COMP_CWORD="1"))
    assert words.stdout.split() == ["plain,submit", "plain,submit-batch"]
    for shell in ("zsh_source", "fish_source"):
        other = subprocess.run(cli_cmd(), capture_output=True, text=True, timeout=60,
                               env=cli_env(_RETIRE_CLUSTER_COMPLETE=shell))
        assert other.returncode == 0 and "retire-cluster" in other.stdout


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_watch_redraws_in_place_on_a_terminal_and_quits_on_ctrl_c(main_process) -> None:
    import pty

    main = main_process()
    with Client(main.address, main.token) as client:
        client.submit("echo", {"message": "x"})
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cli_cmd("watch", "--interval", "0.2"), stdin=follower, stdout=follower,
                            stderr=follower, env=cli_env(RETIRE_CLUSTER_MAIN=main.address,
                                                         RETIRE_CLUSTER_TOKEN=main.token))
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H") < 2:  # two frames drawn over each other
            assert time.monotonic() < deadline, seen
            if select.select([leader], [], [], 0.1)[0]:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    assert seen.startswith(b"\x1b[2J") and b"pending" in seen and b"Traceback" not in seen


def test_a_worker_without_tls_does_not_load_openssls_hashes() -> None:
    """hashlib (and its OpenSSL bindings) costs a worker RSS; only TLS pinning and a spilled result need it."""
    code = (
        "import sys, retire_cluster.cli, retire_cluster.worker.agent; "
        "print(sorted(m for m in ('hashlib', '_hashlib', 'hmac', 'secrets') if m in sys.modules))"
    )
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_running_worker_uses_uvloop_and_reads_proc_not_psutil(main_process, worker_process) -> None:
    """uvloop when importable (a third less CPU per task); where /proc answers, no psutil (about 1 MiB)."""
    pytest.importorskip("uvloop")
    from retire_cluster.worker import profiler

    if not profiler.PROC_ANSWERS:
        pytest.skip("no readable /proc here")
    main = main_process("--no-http")
    worker = worker_process(main)
    wait_for_devices(main, 1)
    libraries = {line.split()[-1].rsplit("/", 1)[-1] for line in Path(f"/proc/{worker.pid}/maps").read_text().splitlines()
                 if ".so" in line}
    assert any(name.startswith("loop.cpython") for name in libraries), sorted(libraries)  # uvloop's
    assert not any(name.startswith("_psutil") for name in libraries), sorted(libraries)


def test_what_a_task_printed_is_shown_with_its_result(capsys: pytest.CaptureFixture) -> None:
    from retire_cluster.cli_client import _print_outcome

    done = {"task_id": "t", "status": "completed", "result": {"output": "42", "stdout": "hello\n", "exit_code": 0}}
    _print_outcome(done)
    assert capsys.readouterr().out == "hello\n42\n"  # before: only 42
    assert "stdout        hello" in task_detail(done)
    hung = {"task_id": "t", "status": "timeout", "error": "stopped after the task timeout of 1 s",
            "result": {"stdout": "partial\n", "stderr": "oops\n"}}
    _print_outcome(hung)
    assert capsys.readouterr().err == "task t timeout: stopped after the task timeout of 1 s\npartial\noops\n"


def test_submit_retry_on_timeout(main_process, worker_process) -> None:
    """`submit` can ask for what the protocol, the clients and submit-batch offer: retries after a timeout."""
    main = main_process("--no-http")
    worker_process(main, "--max-tasks", "1")
    wait_for_devices(main, 1)
    result = against(main, "submit", "sleep", "--payload", '{"seconds": 30}', "--timeout", "0.5",
                     "--max-retries", "1", "--retry-on-timeout", "--wait", "--json")
    assert result.exit_code == 1, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "timeout"
    assert [a["outcome"] for a in record["attempts"]] == ["timeout", "timeout"]


def test_submit_batch_goes_a_few_hundred_tasks_per_request_and_is_not_throttled(main_process,
                                                                                 tmp_path: Path) -> None:
    """Before, one request per line: past the rate limit (here 50 a second, bursts of 100) the main node
    refused them as overloaded, and the client said "the main node is busy" and sent them again with backoff."""
    config = tmp_path / "main.json"
    config.write_text(json.dumps({"client_rate_per_s": 50, "client_burst": 100}))
    main = main_process("--config", str(config))
    batch = tmp_path / "many.jsonl"
    batch.write_text("".join(f'{{"task_type": "echo", "payload": {{"n": {n}}}}}\n' for n in range(3_000)))
    result = against(main, "submit-batch", str(batch))
    assert result.exit_code == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 3_000 and len(set(ids)) == 3_000
    assert "busy" not in result.stderr and result.stderr.endswith("submitted 3000 tasks\n")
    with Client(main.address, main.token) as client:
        assert client.status(ids[2_999])["payload"] == {"n": 2_999}
