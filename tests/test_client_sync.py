"""The blocking Client's life cycle: a closed Client stays closed (as a closed AsyncClient does),
and one Client used by two threads at once is refused instead of mixing their frames."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List

import pytest

from retire_cluster.client import AsyncClient, Client, ClientError, ClusterExecutor
from retire_cluster.main import MainNode


def addr(node: MainNode) -> str:
    return f"{node.address[0]}:{node.address[1]}"


def every_call(client: Client, task_id: str) -> Dict[str, Callable[[], Any]]:
    """One call of each public method that talks to the main node."""
    return {
        "connect": client.connect,
        "request": lambda: client.request("cluster_status"),
        "submit": lambda: client.submit("echo", {"message": "x"}),
        "run": lambda: client.run("echo", {"message": "x"}, wait_s=1),
        "status": lambda: client.status(task_id),
        "cancel": lambda: client.cancel(task_id),
        "tasks": client.tasks,
        "devices": client.devices,
        "cluster_status": client.cluster_status,
        "subscribe": lambda: client.subscribe([task_id]),
        "subscribe all": client.subscribe,
        "next_update": lambda: client.next_update(timeout_s=0),
        "wait": lambda: client.wait(task_id, timeout_s=1),
        "as_completed": lambda: list(client.as_completed([task_id], timeout_s=1)),
        "execute": lambda: client.execute("echo", {"message": "x"}, timeout_s=1),
        "with": lambda: client.__enter__(),
    }


async def test_a_closed_client_refuses_every_call_as_the_async_one_does(node: MainNode) -> None:
    """Before, a call after close() (or after the with block) silently opened a new connection."""
    aio = AsyncClient(addr(node), node.token, timeout_s=10)
    task_id = await aio.submit("echo", {"message": "x"})
    await aio.close()
    with pytest.raises(ClientError, match="is closed"):
        await aio.status(task_id)

    def blocking() -> List[str]:
        with Client(addr(node), node.token, timeout_s=10) as client:
            assert client.status(task_id)["status"] == "pending"
            started = client.as_completed([task_id], timeout_s=10)  # made while open, used after close
        assert not client.connected
        client.close()  # closing again does nothing
        reopened = []
        for name, call in every_call(client, task_id).items():
            with pytest.raises(ClientError, match=r"^this Client is closed; make a new one$"):
                call()
            if client.connected or client.connections_opened != 1:
                reopened.append(name)
        with pytest.raises(ClientError, match="closed"):
            next(started)
        assert not client.connected and client.connections_opened == 1
        return reopened

    assert await asyncio.to_thread(blocking) == []


async def test_the_executor_refuses_work_after_shutdown(node: MainNode) -> None:
    ex = await asyncio.to_thread(ClusterExecutor, addr(node), node.token, timeout_s=10)
    await asyncio.to_thread(ex.shutdown, True)
    ex.shutdown()  # again: nothing to do
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit("echo")
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map("echo", [{"message": "x"}])
    with pytest.raises(ClientError, match="closed"):
        await ex.client.status("t1")
