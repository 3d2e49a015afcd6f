"""Shared fixtures: a fake clock, an in-process main node on 127.0.0.1:0, raw JSON peers,
and helpers that start the real CLI as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from retire_cluster.main import MainConfig, MainNode

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_config(tmp_path: Path, **overrides: Any) -> MainConfig:
    settings: Dict[str, Any] = {"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "main", "http_enabled": False}
    settings.update(overrides)
    return MainConfig(**settings)


@pytest.fixture
async def node(tmp_path: Path, clock: FakeClock):
    """A started main node whose time is the test's FakeClock (no monitor loop)."""
    n = MainNode(make_config(tmp_path), clock=clock, run_monitor=False)
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


OPEN_PEERS: List["Peer"] = []


@pytest.fixture(autouse=True)
async def _close_peers():
    yield
    while OPEN_PEERS:
        await OPEN_PEERS.pop().close()


class Peer:
    """A raw newline-JSON connection to the main node, as any script would open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 sender_id: str, token: Optional[str]) -> None:
        self.reader, self.writer = reader, writer
        self.sender_id, self.token = sender_id, token
        self.pushed: List[Dict[str, Any]] = []
        self._n = 0

    @classmethod
    async def connect(cls, node: MainNode, sender_id: str = "client-1", token: Any = "auto") -> Peer:
        reader, writer = await asyncio.open_connection(*node.address, limit=64 * 1024 * 1024)
        peer = cls(reader, writer, sender_id, node.token if token == "auto" else token)
        OPEN_PEERS.append(peer)
        return peer

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message_type: str, data: Optional[Dict[str, Any]] = None, **extra: Any) -> str:
        self._n += 1
        mid = f"{self.sender_id}-{self._n}"
        frame: Dict[str, Any] = {"message_type": message_type, "message_id": mid,
                                 "sender_id": self.sender_id, "data": data or {}}
        if self.token is not None:
            frame["auth_token"] = self.token
        frame.update(extra)
        await self.send_raw(json.dumps(frame).encode() + b"\n")
        return mid

    async def recv(self, timeout: float = 10.0) -> Dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed by the main node")
        return json.loads(line)

    async def reply_to(self, mid: str, timeout: float = 10.0) -> Dict[str, Any]:
        """The reply to ``mid``; pushes that arrive first are kept in ``pushed``."""
        while True:
            msg = await self.recv(timeout)
            if msg["message_type"] in ("ack", "error") and msg["data"].get("original_message_id") == mid:
                return msg
            self.pushed.append(msg)

    async def request(self, message_type: str, data: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
        return await self.reply_to(await self.send(message_type, data, **extra))

    async def ok(self, message_type: str, data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        reply = await self.request(message_type, data)
        assert reply["message_type"] == "ack", reply
        return reply["data"]["result"]

    async def next_push(self, message_type: str, timeout: float = 10.0) -> Dict[str, Any]:
        for i, msg in enumerate(self.pushed):
            if msg["message_type"] == message_type:
                return self.pushed.pop(i)
        while True:
            msg = await self.recv(timeout)
            if msg["message_type"] == message_type:
                return msg
            self.pushed.append(msg)

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionError:
            return True
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        if self.writer.is_closing():
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
            return
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


class RecordingTransport(asyncio.Transport):
    """A transport for a Connection made in process: it keeps what is written, in ``writes``."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: List[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass


def register_data(task_types: Optional[List[str]] = None, cores: int = 2, memory_gb: float = 4,
                  running: Optional[List[Dict[str, Any]]] = None, **extra: Any) -> Dict[str, Any]:
    data: Dict[str, Any] = {
        "device_info": {"hostname": "h", "platform": "linux", "architecture": "x86_64",
                        "python_version": "3.11.7", "role": "worker"},
        "hardware_specs": {"cpu_cores": cores, "memory_total": int(memory_gb * 2**30),
                           "disk_space": 10**11, "network_interfaces": ["lo"]},
        "capabilities": ["computational"],
        "task_types": task_types or ["echo", "sleep"],
        "max_concurrent_tasks": cores,
    }
    if running is not None:
        data["running_tasks"] = running
    data.update(extra)
    return data


async def fake_worker(node: MainNode, device_id: str = "dev-1", **kwargs: Any) -> Peer:
    """A registered device speaking raw JSON (the test plays the worker)."""
    peer = await Peer.connect(node, device_id)
    reply = await peer.request("register", register_data(**kwargs))
    assert reply["message_type"] == "ack", reply
    return peer


async def settle(node: MainNode) -> None:
    """Let scheduled callbacks and the store's pending group commit finish."""
    for _ in range(3):
        await asyncio.sleep(0)
        await node.store.flush()
        await asyncio.sleep(0)


# -- subprocesses of the real CLI -------------------------------------------


def cli_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RETIRE_CLUSTER_MAIN", None)
    env.pop("RETIRE_CLUSTER_TOKEN", None)
    env.update(extra)
    return env


def cli_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "retire_cluster", *args]


class MainProcess:
    """`retire-cluster main` in a subprocess, on a free port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: Optional[subprocess.Popen[str]] = None
        self.port = 0
        self.output: List[str] = []
        self._drain: Optional[threading.Thread] = None

    def start(self, port: int = 0) -> MainProcess:
        self.proc = subprocess.Popen(
            cli_cmd("main", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(self.data_dir),
                    *self.extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("main node exited early:\n" + "".join(self.output))
            self.output.append(line)
            if "listening on 127.0.0.1:" in line and line.startswith("retire-cluster main node"):
                self.port = int(line.rsplit(":", 1)[1])
            if line.startswith("  retire-cluster worker"):
                break
        assert self.port, "".join(self.output)
        # Keep reading, or a chatty main node would block on a full pipe.
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()
        return self

    def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.output.append(line)
        except (ValueError, OSError):  # closed under us
            pass

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_output()

    def _close_output(self) -> None:
        assert self.proc is not None
        if self._drain is not None:
            self._drain.join(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_output()
        return int(self.proc.returncode)


@pytest.fixture
def main_process(tmp_path: Path):
    procs: List[MainProcess] = []

    def start(*extra: str, data_dir: Optional[Path] = None, port: int = 0) -> MainProcess:
        mp = MainProcess(data_dir or tmp_path / "main-data", *extra).start(port)
        procs.append(mp)
        return mp

    yield start
    for mp in procs:
        if mp.proc is not None:
            mp.terminate()


def restart_while_a_task_runs(main: MainProcess, start_main: Any, waiting: threading.Thread) -> MainProcess:
    """Once a task runs on ``main``, kill -9 it and start it again (same port and data dir) while the
    started thread ``waiting`` waits on it; return the new main node once ``waiting`` has ended."""
    from retire_cluster.client import Client

    try:
        deadline = time.monotonic() + 30
        with Client(main.address, main.token) as client:
            while not client.tasks(status="running"):
                assert time.monotonic() < deadline, "the task did not start"
                time.sleep(0.05)
        main.kill9()
        again: MainProcess = start_main(data_dir=main.data_dir, port=main.port)
    finally:
        waiting.join(120)
    return again


@pytest.fixture
def worker_process(tmp_path: Path):
    procs: List[subprocess.Popen[str]] = []

    def start(main: MainProcess, *extra: str, name: str = "w1") -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cli_cmd("worker", "--main", main.address, "--token", main.token,
                    "--data-dir", str(tmp_path / name), "--device-id", name, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
