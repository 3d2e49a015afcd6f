"""What a newcomer following the README sees from the client commands: the words of a refused
token, an empty filtered device list, and a command's output printed as it wrote it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, register_data

from retire_cluster.cli import cli
from retire_cluster.cli_client import _print_outcome


def invoke(*args: str):
    # RETIRE_CLUSTER_TOKEN / _MAIN unset: only what the test passes counts.
    env = {"RETIRE_CLUSTER_TOKEN": None, "RETIRE_CLUSTER_MAIN": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_a_missing_or_wrong_token_says_which_and_how_to_pass_it(main_process) -> None:
    main = main_process()
    missing = invoke("status", "--main", main.address)
    assert missing.exit_code == 1
    # Before: "Send the cluster token in auth_token; ... (pass --token or set RETIRE_CLUSTER_TOKEN)"
    assert missing.stderr == ("Error: the main node needs the cluster token; pass it with --token or "
                              "RETIRE_CLUSTER_TOKEN (`retire-cluster token` on the main node prints it).\n")
    wrong = invoke("tasks", "--main", main.address, "--token", "not-the-token")
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("Error: the main node refused this token; pass it with --token")
    assert invoke("status", "--main", main.address, "--token", main.token).exit_code == 0


def test_devices_filtered_to_nothing_does_not_say_there_are_no_devices(main_process) -> None:
    main = main_process()
    with socket.create_connection(("127.0.0.1", main.port), timeout=30) as sock:
        frame = {"message_type": "register", "message_id": "r1", "sender_id": "pi", "auth_token": main.token,
                 "data": register_data()}
        sock.sendall(json.dumps(frame).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
        assert reply["message_type"] == "ack", reply  # "pi" is registered and online from here on
        offline = invoke("devices", "--status", "offline", "--main", main.address, "--token", main.token)
        online = invoke("devices", "--status", "online", "--main", main.address, "--token", main.token)
    assert offline.exit_code == 0 and offline.stdout == "no offline devices\n"  # was "no devices yet; start ..."
    assert online.exit_code == 0 and online.stdout.splitlines()[2].startswith("pi ")


@pytest.mark.parametrize(("output", "printed"), [
    ("total 0\n", "total 0\n"),  # a command's stdout: was "total 0\n\n"
    ("4999950000", "4999950000\n"),  # a python_eval value
    (None, "\n"),
])
def test_submit_wait_prints_the_output_as_the_task_wrote_it(output, printed, capsys: pytest.CaptureFixture) -> None:
    _print_outcome({"task_id": "t", "status": "completed", "result": {"output": output, "exit_code": 0}})
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("command", ["main", "worker", "token", "submit"])
def test_every_environment_variable_an_option_reads_is_in_the_readme_and_its_help(command: str) -> None:
    import click

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cmd = cli.commands[command]
    ctx = click.Context(cmd, info_name=command)
    helps = cmd.get_help(ctx).replace("\n", " ")
    for param in cmd.params:
        envvar = getattr(param, "envvar", None)
        if not envvar:
            continue
        assert f"`{envvar}`" in readme, f"{command} --{param.name}: {envvar} is not in README.md"
        if command != "main":  # main's help names the RETIRE_CLUSTER_ rule once, for every option
            assert envvar in helps, f"{command} --{param.name}: {envvar} is not in its --help"


def test_token_without_a_token_file_says_where_it_looked_and_where_to_run_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["token", "--data-dir", str(tmp_path / "nothing")],
                                env={"RETIRE_CLUSTER_DATA_DIR": None})
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: no token in {tmp_path / 'nothing' / 'token'}; run this on the main node")


def test_ctrl_c_while_waiting_says_the_task_goes_on_and_exits_130(main_process, monkeypatch, tmp_path: Path) -> None:
    """Before: click's 'Aborted!' and exit 1, as if the task had been stopped too."""
    from retire_cluster.client.sync import Client

    main = main_process()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "run", interrupted)
    early = invoke("submit", "echo", "--payload", '{"message": "hi"}', "--wait", "--main", main.address,
                   "--token", main.token)
    assert early.exit_code == 130, early.output
    assert early.stderr.strip() == "stopped waiting; the task was submitted and goes on; `retire-cluster tasks` lists it."
    # After the 5 s notice the task id is known, and named.
    monkeypatch.setattr(Client, "run", lambda self, *a, **k: {"task_id": "abc123", "status": "pending"})
    monkeypatch.setattr(Client, "status", lambda self, task_id: {"task_id": task_id, "status": "pending"})
    monkeypatch.setattr(Client, "wait", interrupted)
    later = invoke("submit", "echo", "--wait", "--main", main.address, "--token", main.token)
    assert later.exit_code == 130, later.output
    assert later.stderr.strip().endswith("stopped waiting; task abc123 goes on; `retire-cluster task abc123` shows it.")
    # submit-batch: one task is "1 task", not "1 tasks".
    batch = tmp_path / "one.jsonl"
    batch.write_text('{"task_type": "echo", "payload": {"message": "hi"}}\n')
    one = invoke("submit-batch", str(batch), "--main", main.address, "--token", main.token)
    assert one.exit_code == 0 and one.stderr.splitlines()[-1] == "submitted 1 task", one.stderr


def test_main_node_with_its_output_piped_to_a_reader_that_left_still_stops(tmp_path: Path) -> None:
    """`retire-cluster main | head -1`: the stop line's write failed, node.stop() never ran, and the
    store's thread kept the process (and its data-dir lock) alive after SIGTERM."""
    import signal
    import subprocess

    from conftest import cli_cmd, cli_env

    def start() -> subprocess.Popen:
        return subprocess.Popen(cli_cmd("main", "--host", "127.0.0.1", "--port", "0", "--no-http",
                                        "--data-dir", str(tmp_path)),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=cli_env())

    proc = start()
    assert proc.stdout is not None
    banner = [proc.stdout.readline() for _ in range(4)]  # up to the join line
    assert banner[0].startswith(b"retire-cluster main node") and banner[3].startswith(b"  retire-cluster worker")
    proc.stdout.close()  # as head does: every later write is a broken pipe
    proc.send_signal(signal.SIGTERM)  # its handlers were set before the banner
    assert proc.wait(timeout=30) == 0
    again = start()  # the data dir's lock was released
    assert again.stdout is not None and again.stdout.readline().startswith(b"retire-cluster main node")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0
    again.stdout.close()
