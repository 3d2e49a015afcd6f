"""Helpers of the web tests: a real main node serving HTTP on port 0, a real in-process
worker, an aiohttp client session holding the token, and an SSE reader."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import aiohttp
import pytest
from conftest import make_config

from retire_cluster.main import MainNode
from retire_cluster.worker import Agent, WorkerConfig

WORKER_ID = "web-worker"


class Cluster:
    """A started node (HTTP on), its worker and a client session with the token."""

    def __init__(self, node: MainNode, session: aiohttp.ClientSession) -> None:
        self.node = node
        self.session = session
        host, port = node.http_address  # type: ignore[misc]
        self.base = f"http://{host}:{port}"
        self.agent: Optional[Agent] = None
        self._runner: Optional[asyncio.Future[Any]] = None

    @property
    def auth(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.node.token}"} if self.node.token else {}

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, **kw: Any) -> Tuple[int, Any]:
        """GET with the token; returns (status, JSON body or text)."""
        return await self.request("GET", path, **kw)

    async def request(self, method: str, path: str, *, auth: bool = True, **kw: Any) -> Tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if auth:
            headers.update(self.auth)
        async with self.session.request(method, self.url(path), headers=headers, **kw) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        status, body = await self.request(method, path, **kw)
        assert status in (200, 201), (status, body)
        return body

    async def submit(self, task_type: str, payload: Dict[str, Any], **extra: Any) -> str:
        body = await self.ok("POST", "/api/v1/tasks", json={"task_type": task_type, "payload": payload, **extra})
        return str(body["task_id"])

    async def wait_task(self, task_id: str, status: str = "completed") -> Dict[str, Any]:
        async def ended() -> Optional[Dict[str, Any]]:
            task = (await self.ok("GET", f"/api/v1/tasks/{task_id}"))["task"]
            return task if task["status"] == status else None

        return await eventually(ended)

    async def start_worker(self, tmp_path: Path, device_id: str = WORKER_ID, **kw: Any) -> Agent:
        config = WorkerConfig(main_host="127.0.0.1", main_port=self.node.address[1], token=self.node.token,
                              device_id=device_id, data_dir=tmp_path / device_id, reconnect_min_s=0.05,
                              reconnect_max_s=0.2, heartbeat_interval_s=0.2, **kw)
        self.agent = Agent(config)
        self._runner = asyncio.ensure_future(self.agent.run())
        await asyncio.wait_for(self.agent.registered.wait(), 20)
        return self.agent

    async def close(self) -> None:
        if self.agent is not None and self._runner is not None:
            self.agent.stop()
            await asyncio.wait_for(self._runner, 20)
        await self.node.stop()
        await self.session.close()


async def start_cluster(tmp_path: Path, *, worker: bool = True, **overrides: Any) -> Cluster:
    settings: Dict[str, Any] = {"http_enabled": True, "http_port": 0}
    settings.update(overrides)
    node = MainNode(make_config(tmp_path, **settings))
    await node.start()
    cluster = Cluster(node, aiohttp.ClientSession())
    if worker:
        await cluster.start_worker(tmp_path)
    return cluster


@pytest.fixture
async def cluster(tmp_path: Path):
    c = await start_cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Call ``probe`` until it returns something truthy (no timing assertion: a deadline only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout} s (last: {value!r})")
        await asyncio.sleep(every)


class SSE:
    """Reads one ``/stream/...`` response: events as dicts, comments counted."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: List[str] = []
        self.retry: Optional[int] = None

    async def next(self, timeout: float = 20.0) -> Dict[str, Any]:
        """The next event: {"id", "event", "data"}; comments are kept in ``comments``."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Dict[str, Any]:
        event: Dict[str, Any] = {}
        data: List[str] = []
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    event["data"] = json.loads("\n".join(data))
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                event["id"] = int(value)
            elif field == "event":
                event["event"] = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                self.retry = int(value)

    async def until(self, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 20.0) -> List[Dict[str, Any]]:
        """Events up to and including the first that matches."""
        seen: List[Dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next(max(0.1, deadline - loop.time()))
            seen.append(event)
            if predicate(event):
                return seen


async def open_stream(cluster: Cluster, path: str, **headers: str) -> aiohttp.ClientResponse:
    resp = await cluster.session.get(cluster.url(path), headers={**cluster.auth, **headers},
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert resp.status == 200, (resp.status, await resp.text())
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp
