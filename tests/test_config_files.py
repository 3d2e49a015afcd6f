"""Config files of the main node and the worker: keys mirror the flags, values keep their JSON types,
and a refused start leaves nothing behind.

Found by hand-testing: ``"no_http": true`` was an unknown setting on the main node (the README says
file keys are the flag names); a worker's ``"max_tasks": 3.5`` became 3 slots and ``"allow":
"python_eval"`` got click's words; a main node with a bad --tls-cert had already written its token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from click.testing import CliRunner
from conftest import make_config

import retire_cluster.runtime as runtime
from retire_cluster.cli import build_main_config, cli
from retire_cluster.main import MainNode
from retire_cluster.main.config import ConfigError
from retire_cluster.worker.config import WorkerConfig


def write(tmp_path: Path, settings: Any, name: str = "settings.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(settings))
    return path


# -- main node: no_http -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["no_http", "no-http"])
def test_no_http_in_the_main_config_file_is_the_flag(tmp_path: Path, key: str) -> None:
    conf = write(tmp_path, {key: True})
    assert not build_main_config(str(conf), {})[0].http_enabled  # was: unknown setting 'no_http'
    assert build_main_config(str(write(tmp_path, {key: False})), {})[0].http_enabled


def test_the_environment_beats_the_files_no_http(tmp_path: Path) -> None:
    conf = write(tmp_path, {"no_http": True})
    assert build_main_config(str(conf), {"no_http": False})[0].http_enabled  # RETIRE_CLUSTER_NO_HTTP=false
    assert not build_main_config(str(conf), {"no_http": None})[0].http_enabled


@pytest.mark.parametrize(("settings", "message"), [
    ({"no_http": "false"}, 'no_http must be true or false, not "false".'),  # not: "false" is true, negated
    ({"no_http": True, "http_enabled": True}, "'no_http' and 'http_enabled' in "),
    ({"heartbeat_interval": 30, "heartbeat_interval_s": 40}, "'heartbeat_interval' and 'heartbeat_interval_s' in "),
])
def test_a_bad_or_contradicting_no_http_is_one_sentence(tmp_path: Path, settings: Dict[str, Any], message: str) -> None:
    conf = write(tmp_path, settings)
    with pytest.raises(ConfigError) as refused:
        build_main_config(str(conf), {})
    assert str(refused.value).startswith(message)
    result = CliRunner().invoke(cli, ["main", "--config", str(conf), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and message in result.output


def test_agreeing_no_http_and_http_enabled_are_accepted(tmp_path: Path) -> None:
    conf = write(tmp_path, {"no_http": True, "http_enabled": False})
    assert not build_main_config(str(conf), {})[0].http_enabled


# -- worker: types of the config file's values -------------------------------------------------------


def worker_params(conf: Path) -> Dict[str, Any]:
    """Parse ``worker --config conf`` as the CLI does, without starting a worker."""
    command = cli.commands["worker"]
    with command.make_context("worker", ["--config", str(conf)]) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_tasks": 3.5}, "max_tasks must be a whole number or null, not 3.5."),  # was: 3 slots
    ({"max-tasks": "3"}, 'max-tasks must be a whole number or null, not "3".'),
    ({"max_tasks": True}, "max_tasks must be a whole number or null, not true."),
    ({"allow": "python_eval"}, 'allow must be a list of task types, like ["python_eval"], not "python_eval".'),
    ({"allow": ["python_eval", 1]}, 'allow must be a list of task types, like ["python_eval"], not ["python_eval", 1].'),
    ({"capability": "gpu"}, 'capability must be a list of capabilities, like ["gpu"], not "gpu".'),
    ({"burst": "false"}, 'burst must be true or false, not "false".'),
    ({"only_when_charging": 1}, "only_when_charging must be true or false, not 1."),
    ({"weight": True}, "weight must be a number, not true."),  # was: weight 1.0
    ({"task_memory": 100.5}, "task_memory must be a whole number, not 100.5."),  # was: 100 MiB
    ({"heartbeat_interval": "5"}, 'heartbeat_interval must be a number or null, not "5".'),
    ({"role": 5}, "role must be a string, not 5."),
    ({"role": None}, "role must be a string, not null."),
    ({"main": 8080}, "main must be a string, not 8080."),
    ({"token": 12345}, "token must be a string or null, not 12345."),
])
def test_a_worker_config_value_of_the_wrong_type_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: Dict[str, Any], message: str
) -> None:
    conf = write(tmp_path, {"main": "127.0.0.1:1", **settings})
    with pytest.raises(SystemExit) as stopped:
        worker_params(conf)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"Error: {message}\n"


@pytest.mark.parametrize(("settings", "message"), [
    ({"min_battery": 120}, "min_battery: 120.0 is not in the range 0<=x<=100"),
    ({"max-owner-cpu": 0}, "max-owner-cpu: 0.0 is not in the range 1<=x<=100"),
    ({"weight": 0}, "weight: 0.0 is not in the range 0.001<=x<=1000"),
    ({"task_memory": 1}, "task_memory: 1 is not in the range x>=16"),
    ({"allow": ["python_eval", "shell"]}, "allow: 'shell' is not one of 'python_eval', 'command'"),
    ({"log_level": "loud"}, "log_level: 'loud' is not one of 'debug', 'info', 'warning', 'error'"),
])
def test_a_worker_config_value_out_of_range_is_one_sentence_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: Dict[str, Any], message: str
) -> None:
    """Found by hand: these got click's three lines (a usage line, "Invalid value for
    '--min-battery'") about a flag that was never given."""
    conf = write(tmp_path, {"main": "127.0.0.1:1", **settings})
    with pytest.raises(SystemExit) as stopped:
        worker_params(conf)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"Error: {message}; fix it in the config file or give the flag.\n"


def test_good_worker_config_values_are_taken(tmp_path: Path) -> None:
    conf = write(tmp_path, {"main": "127.0.0.1:1", "allow": ["python_eval", "command"], "max-tasks": 2,
                            "capability": ["gpu"], "burst": True, "weight": 2, "heartbeat_interval": 7.5,
                            "hours": None, "token": None})
    params = worker_params(conf)
    assert params["allow"] == ("python_eval", "command") and params["max_tasks"] == 2
    assert params["capabilities"] == ("gpu",) and params["burst"] is True and params["weight"] == 2.0
    assert params["heartbeat_interval"] == 7.5 and params["hours"] is None and params["token"] is None
    conf = write(tmp_path, {"main": "127.0.0.1:1", "max_tasks": None})
    assert worker_params(conf)["max_tasks"] is None  # null: the CPU count


@pytest.fixture
def no_worker_start(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A worker command that gets past its settings fails here instead of connecting for ever."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        for arg in args:
            getattr(arg, "close", lambda: None)()  # the coroutine that was never awaited
        raise AssertionError("the worker started")

    monkeypatch.setattr(runtime, "run", refuse)
    monkeypatch.setattr(runtime, "setup_logging", lambda *a, **k: None)
    yield


@pytest.mark.usefixtures("no_worker_start")
def test_the_worker_command_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    conf = write(tmp_path, {"main": "127.0.0.1:1", "max_tasks": 3.5})
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert (result.exit_code, result.output) == (2, "Error: max_tasks must be a whole number or null, not 3.5.\n")
    conf = write(tmp_path, {"main": "127.0.0.1:1", "colour": "blue"})
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert result.exit_code == 2 and result.output.startswith(f"Error: unknown setting 'colour' in {conf}; known: ")
    conf = write(tmp_path, {"main": "127.0.0.1:1", "alow": ["python_eval"]})  # a typo is told the setting
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert result.exit_code == 2 and result.output.startswith(
        f"Error: unknown setting 'alow' in {conf}; did you mean 'allow'? known: ")
    conf.write_text("{oops")
    result = CliRunner().invoke(cli, ["worker", "--config", str(conf)])
    assert result.exit_code == 2 and result.output.startswith(f"Error: config file {conf} is not valid JSON")


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_tasks": 3.5}, "max_tasks must be a whole number, not 3.5."),
    ({"allow": "python_eval"}, "allow must be a set of task types, like {'python_eval'}, not 'python_eval'."),
])
def test_worker_config_in_python_refuses_the_same(tmp_path: Path, settings: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        WorkerConfig(data_dir=tmp_path, **settings)
    assert str(refused.value) == message


# -- main node: a refused TLS start leaves nothing behind --------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The main command sets up logging when it gets that far; the test's handlers come back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    listener = getattr(runtime, "_listener", None)  # a log file opened by a start that got that far
    for handler in listener.handlers if listener is not None else ():
        handler.close()
    runtime.stop_logging()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


async def test_a_main_node_with_a_bad_certificate_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    config = make_config(tmp_path, tls_cert=missing, tls_key=missing)
    node = MainNode(config)
    with pytest.raises(ConfigError, match="cannot use --tls-cert"):
        await node.start()
    assert not config.data_dir.exists()  # was: the data dir and its token


@pytest.mark.usefixtures("root_logging")
def test_the_main_command_with_a_bad_certificate_writes_nothing(tmp_path: Path) -> None:
    not_pem = write(tmp_path, {"not": "a certificate"}, "cert.pem")
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(cli, [
        "main", "--port", "0", "--no-http", "--data-dir", str(data_dir), "--log-file", str(data_dir / "main.log"),
        "--tls-cert", str(not_pem), "--tls-key", str(not_pem),
    ])
    assert result.exit_code == 2 and result.output.startswith(f"Error: cannot use --tls-cert {not_pem}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem"]  # no data dir, token or log file
