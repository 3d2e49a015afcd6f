"""Worker settings: --main parsing, the saved device id, WorkerConfig checks."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Tuple

import pytest

from retire_cluster.worker import config as config_module
from retire_cluster.worker.config import (
    BUILTIN_TYPES,
    DEFAULT_MAIN_PORT,
    WorkerConfig,
    load_or_create_device_id,
    parse_main_address,
)

# -- parse_main_address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", ("host", 8080)),
        ("host:9000", ("host", 9000)),
        ("192.168.1.20:1", ("192.168.1.20", 1)),
        ("main.lan:65535", ("main.lan", 65535)),
        ("  host:9000\n", ("host", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", 8080)),
        ("[fe80::1%eth0]:81", ("fe80::1%eth0", 81)),
        ("::1", ("::1", 8080)),  # a bare IPv6 address: no port can be told apart
        ("my_nas.local", ("my_nas.local", 8080)),
        ("héllo.local:81", ("héllo.local", 81)),  # an IDNA name: the resolver encodes it
    ],
)
def test_parse_main_address(text: str, expected: Tuple[str, int]) -> None:
    assert parse_main_address(text) == expected


def test_default_port_is_8080() -> None:
    assert DEFAULT_MAIN_PORT == 8080


@pytest.mark.parametrize(
    ("text", "advice"),
    [
        ("", "give the main node as HOST or HOST:PORT"),
        ("   ", "give the main node as HOST or HOST:PORT"),
        ("host:abc", "the port must be a number from 1 to 65535"),
        ("host:", "the port must be a number from 1 to 65535"),
        ("host:0", "the port must be a number from 1 to 65535"),
        ("host:70000", "the port must be a number from 1 to 65535"),
        ("host:65536", "the port must be a number from 1 to 65535"),
        ("host:-1", "the port must be a number from 1 to 65535"),
        ("[::1]:0", "the port must be a number from 1 to 65535"),
        ("[::1]:x", "the port must be a number from 1 to 65535"),
        ("[::1", "missing ']'"),
        ("[::1]9000", "expected ':PORT'"),
        (":9000", "has no host"),
        ("[]:9000", "has no host"),
        # Before, looked up as they are at every retry ("Name or service not known"), for ever.
        ("pi 4", "'pi 4' is not a host name or IP address"),
        ("pi 4:8080", "'pi 4' is not a host name or IP address"),
        ("main/8080", "is not a host name or IP address"),
        ("1.2.3.4:80:9", "is not a host name or IP address"),
        ("[main.lan]:81", "an IPv6 address with a port as [ADDRESS]:PORT"),
        ("[::1:zz]:81", "is not a host name or IP address"),
    ],
)
def test_parse_main_address_errors_say_what_to_do(text: str, advice: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_main_address(text)
    message = str(info.value)
    assert message.startswith("--main")
    assert advice in message
    assert message.endswith(".")


# -- device id --------------------------------------------------------------------


def test_device_id_is_created_once_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "worker" / "state"  # created on demand
    first = load_or_create_device_id(data_dir)
    assert (data_dir / "device_id").read_text(encoding="utf-8").strip() == first
    assert load_or_create_device_id(data_dir) == first
    assert load_or_create_device_id(Path(str(data_dir))) == first


def test_device_id_is_hostname_based(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: "kitchen-phone")
    device_id = load_or_create_device_id(tmp_path / "a")
    assert re.fullmatch(r"kitchen-phone-[0-9a-f]{6}", device_id), device_id


def test_two_devices_with_the_same_hostname_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: "localhost")
    ids = {load_or_create_device_id(tmp_path / str(n)) for n in range(5)}
    assert len(ids) == 5
    assert all(i.startswith("localhost-") for i in ids)


@pytest.mark.parametrize(
    ("hostname", "prefix"),
    [
        ("My Phone (old)!", "My-Phone-old-"),
        ("", "device-"),
        ("---", "device-"),
        ("h" * 100, "h" * 48 + "-"),
    ],
)
def test_device_id_from_an_awkward_hostname(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostname: str, prefix: str
) -> None:
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: hostname)
    device_id = load_or_create_device_id(tmp_path)
    assert device_id.startswith(prefix)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", device_id)


def test_saved_device_id_is_used_as_written(tmp_path: Path) -> None:
    (tmp_path / "device_id").write_text("  my-own-id  \n", encoding="utf-8")
    assert load_or_create_device_id(tmp_path) == "my-own-id"


def test_empty_saved_device_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "device_id").write_text("\n", encoding="utf-8")
    device_id = load_or_create_device_id(tmp_path)
    assert device_id
    assert load_or_create_device_id(tmp_path) == device_id


# -- WorkerConfig -----------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = WorkerConfig(data_dir=tmp_path)
    assert (config.main_host, config.main_port) == ("127.0.0.1", 8080)
    assert config.token is None
    assert config.role == "worker"
    assert config.allow == frozenset()
    assert config.slots == (os.cpu_count() or 1)


def test_data_dir_string_becomes_a_path(tmp_path: Path) -> None:
    assert WorkerConfig(data_dir=str(tmp_path)).data_dir == tmp_path  # type: ignore[arg-type]


@pytest.mark.parametrize("allow", [{"shell"}, {"python_eval", "rm_rf"}, {"echo"}])
def test_allow_refuses_unknown_types(allow: set) -> None:
    with pytest.raises(ValueError) as info:
        WorkerConfig(allow=frozenset(allow))
    message = str(info.value)
    assert message.startswith("--allow")
    for name in allow - {"python_eval", "command"}:
        assert name in message
    assert "python_eval" in message and "command" in message  # what can be allowed


@pytest.mark.parametrize("max_tasks", [0, -1])
def test_max_tasks_must_be_positive(max_tasks: int) -> None:
    with pytest.raises(ValueError, match="--max-tasks must be at least 1"):
        WorkerConfig(max_tasks=max_tasks)


@pytest.mark.parametrize("device_id", ["", "  "])
def test_an_empty_device_id_is_refused_not_taken_as_not_given(device_id: str) -> None:
    with pytest.raises(ValueError, match="--device-id is empty; give a name, or leave it out"):
        WorkerConfig(device_id=device_id)


def test_max_tasks_sets_the_slots() -> None:
    assert WorkerConfig(max_tasks=3).slots == 3


def test_task_types() -> None:
    assert BUILTIN_TYPES == {"echo", "sleep"}
    plain = WorkerConfig()
    assert plain.task_types == {"echo", "sleep"}
    assert "python_eval" not in plain.task_types
    allowed = WorkerConfig(allow=frozenset({"python_eval"}))
    assert allowed.task_types == {"echo", "sleep", "python_eval"}


def test_slots_read_the_cpu_count_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """slots is checked at every assignment; reading the usable CPUs costs a system call or a /sys file."""
    from retire_cluster.worker import config as config_module

    calls: list = []
    monkeypatch.setattr(config_module, "usable_cpus", lambda: calls.append(1) or 6)
    config_module._cpu_count.cache_clear()
    try:
        config = WorkerConfig()
        assert [config.slots for _ in range(100)] == [6] * 100
        assert len(calls) == 1
    finally:
        config_module._cpu_count.cache_clear()
