"""The blocking Client's life cycle: a closed Client stays closed (as a closed AsyncClient does),
and one Client used by two threads at once is refused instead of mixing their frames."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Dict, List

import pytest

from retire_cluster.client import AsyncClient, Client, ClientError, ClusterExecutor
from retire_cluster.main import MainNode


def addr(node: MainNode) -> str:
    return f"{node.address[0]}:{node.address[1]}"


async def subscribed_on_the_node(node: MainNode, task_id: str) -> None:
    """Until a connection to the node has subscribed to ``task_id`` (checked each loop pass, no fixed sleep)."""
    for _ in range(10_000):
        if any(task_id in conn.subscribed for conn in node.server.connections):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"nobody subscribed to {task_id}")


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


async def test_a_second_thread_calling_while_a_call_is_in_progress_is_refused(node: MainNode) -> None:
    """Before, the second thread's request went out on the same socket and the two threads read each
    other's replies (a lost reply, then a timeout), with nothing saying why."""
    aio = AsyncClient(addr(node), node.token, timeout_s=10)
    task_id = await aio.submit("echo", {"message": "x"})  # no device: it stays pending until cancelled
    client = Client(addr(node), node.token, timeout_s=10)
    first_thread: List[int] = []
    later = client.as_completed([task_id])  # made now, stepped from the second thread below

    def wait_in_the_first_thread() -> Dict[str, Any]:
        first_thread.append(threading.get_ident())
        return client.wait(task_id)

    waiting = asyncio.ensure_future(asyncio.to_thread(wait_in_the_first_thread))
    try:
        # wait() subscribes, then blocks until the task ends: it is in progress from here on.
        await subscribed_on_the_node(node, task_id)

        def calls_from_a_second_thread() -> List[str]:
            assert threading.get_ident() not in first_thread
            refused = []
            for call in (lambda: client.status(task_id), lambda: client.submit("echo"), client.cluster_status,
                         client.close, lambda: next(later)):
                with pytest.raises(RuntimeError) as info:
                    call()
                refused.append(str(info.value))
            return refused

        refused = await asyncio.to_thread(calls_from_a_second_thread)
        assert len(refused) == 5 and len(set(refused)) == 1
        assert "one Client per thread, or share an AsyncClient or a ClusterExecutor" in refused[0]
        assert not waiting.done() and client.connected  # the refusals sent nothing and closed nothing
        await aio.cancel(task_id)
        record = await asyncio.wait_for(waiting, 10)  # the first thread's call got its own answer
        assert record["task_id"] == task_id and record["status"] == "cancelled"

        # One thread after another (not at the same time) is fine.
        assert (await asyncio.to_thread(client.status, task_id))["status"] == "cancelled"
        assert [r["status"] for r in await asyncio.to_thread(list, client.as_completed([task_id]))] == ["cancelled"]
        assert client.connections_opened == 1
    finally:
        if not waiting.done():
            await aio.cancel(task_id)
            await asyncio.wait_for(waiting, 10)
        client.close()
        await aio.close()
