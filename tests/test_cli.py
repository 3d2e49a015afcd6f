"""The command line: settings precedence, bad input is one sentence and a non-zero exit."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from retire_cluster.cli import build_main_config, cli, parse_requirements
from retire_cluster.main.config import ConfigError


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


def test_insecure_defaults_to_loopback_unless_host_given() -> None:
    config, _ = build_main_config(None, {"insecure": True})
    assert config.host == "127.0.0.1"
    config, host_given = build_main_config(None, {"insecure": True, "host": "0.0.0.0"})
    assert config.host == "0.0.0.0" and host_given


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "bad.json"
    conf.write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
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
        (["submit", "echo", "--requires", "min_cpu_cores=two"], "needs a number"),
        (["submit", "echo", "--requires", "nonsense"], "is not key=value"),
        (["submit", "echo", "--priority", "asap"], "use low, normal, high, urgent"),
        (["submit", "echo", "--timeout", "0"], "more than 0 seconds"),
        (["worker", "--main", "host:notaport"], "port must be a number"),
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
