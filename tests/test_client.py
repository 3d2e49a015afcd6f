"""The Python clients: AsyncClient against an in-process main node whose worker the test plays,
the blocking Client and ClusterExecutor from worker threads, and faked main nodes that break
connections on purpose."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

import pytest
from conftest import Peer, fake_worker, make_config, restart_while_a_task_runs, settle

from retire_cluster.client import (
    AsyncClient,
    Client,
    ClientError,
    ClusterExecutor,
    Conflict,
    ConnectionLost,
    InvalidMessage,
    NotFound,
    Overloaded,
    TaskFailed,
    Unauthorized,
)
from retire_cluster.main import MainNode
from retire_cluster.tls import certificate_fingerprint, format_fingerprint


def addr(node: MainNode) -> str:
    return f"{node.address[0]}:{node.address[1]}"


async def client_of(node: MainNode, **kwargs: Any) -> AsyncClient:
    client = AsyncClient(addr(node), node.token, timeout_s=10, **kwargs)
    await client.connect()
    return client


async def take_assignment(worker: Peer) -> Dict[str, Any]:
    """The next task_assign pushed to a fake worker, acknowledged (the task is then running)."""
    assign = await worker.next_push("task_assign")
    await worker.send("ack", {"original_message_id": assign["message_id"], "result": {}})
    return dict(assign["data"]["task"])


async def report(worker: Peer, task: Dict[str, Any], output: str = "done", status: str = "completed") -> None:
    result = {"output": output, "exit_code": 0 if status == "completed" else 1, "metrics": {}}
    if status != "completed":
        result["error"] = "it broke"
    reply = await worker.request("task_result", {"task_id": task["task_id"], "attempt": task["attempt"],
                                                 "status": status, "execution_time": 0.01, "result": result})
    assert reply["message_type"] == "ack", reply


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (with a deadline; never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- AsyncClient ----------------------------------------------------------------------------


async def test_requests_and_typed_errors(node: MainNode) -> None:
    client = await client_of(node)
    try:
        task_id = await client.submit("echo", {"message": "hi"}, priority="high", max_retries=1)
        record = await client.status(task_id)
        assert record["status"] == "pending" and record["priority"] == 10 and record["max_retries"] == 1
        assert [t["task_id"] for t in await client.tasks(task_type="echo", limit=5)] == [task_id]
        assert (await client.cluster_status())["tasks"]["pending"] == 1
        assert await client.devices() == []
        with pytest.raises(NotFound, match="No task 'nope'"):
            await client.status("nope")
        with pytest.raises(InvalidMessage) as refused:
            await client.submit("echo", requirements={"min_cpus": 2})
        assert refused.value.path and "requirements" in refused.value.path
        with pytest.raises(TypeError, match="unknown submit option 'prio'"):
            await client.submit("echo", prio="high")
        assert (await client.cancel(task_id))["status"] == "cancelled"
        with pytest.raises(Conflict, match="already ended"):
            await client.cancel(task_id)
        assert client.connections_opened == 1
    finally:
        await client.close()


async def test_a_wrong_token_is_unauthorized_and_no_server_is_a_client_error(node: MainNode) -> None:
    client = AsyncClient(addr(node), "wrong", timeout_s=10)
    try:
        with pytest.raises(Unauthorized):
            await client.cluster_status()
    finally:
        await client.close()
    nobody = AsyncClient("127.0.0.1:1", None, timeout_s=5)
    with pytest.raises(ClientError, match="cannot connect to the main node at 127.0.0.1:1"):
        await nobody.connect()
    await nobody.close()


async def test_many_requests_in_flight_on_one_connection(node: MainNode) -> None:
    client = await client_of(node)
    try:
        ids = await asyncio.gather(*(client.submit("echo", {"message": str(i)}) for i in range(200)))
        assert len(set(ids)) == 200
        records = await asyncio.gather(*(client.status(t) for t in ids))
        assert [r["payload"]["message"] for r in records] == [str(i) for i in range(200)]
        assert client.connections_opened == 1
    finally:
        await client.close()


async def test_wait_and_as_completed_follow_pushed_updates(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1", cores=4)
    client = await client_of(node)
    try:
        first = await client.submit("echo", {"message": "a"})
        task = await take_assignment(worker)
        await report(worker, task, "a")
        ids = [first] + [await client.submit("echo", {"message": m}) for m in "bcd"]
        held = {}
        for _ in range(3):
            t = await take_assignment(worker)
            held[t["task_id"]] = t
        seen: List[str] = []

        async def collect() -> None:
            async for record in client.as_completed(ids, timeout_s=30):
                seen.append(record["task_id"])

        collector = asyncio.ensure_future(collect())
        await eventually(lambda: _true(seen == [first]))
        for task_id in (ids[2], ids[3], ids[1]):
            await report(worker, held[task_id], "x")
            await eventually(lambda task_id=task_id: _true(seen[-1] == task_id))
        await asyncio.wait_for(collector, 10)
        assert seen == [first, ids[2], ids[3], ids[1]]
        done = await client.wait(ids[1], timeout_s=10)
        assert done["status"] == "completed" and done["attempts"][0]["device_id"] == "dev-1"
    finally:
        await client.close()


async def _true(value: bool) -> bool:
    return value


async def test_wait_times_out(node: MainNode) -> None:
    client = await client_of(node)
    try:
        task_id = await client.submit("echo")
        with pytest.raises(TimeoutError, match="did not end within 0.05 s"):
            await client.wait(task_id, timeout_s=0.05)
    finally:
        await client.close()


async def test_updates_stream_after_subscribing_to_all(node: MainNode) -> None:
    client = await client_of(node)
    try:
        stream = client.updates()
        await client.subscribe()
        task_id = await client.submit("echo", {"message": "x"})
        record = await asyncio.wait_for(stream.get(), 10)
        assert record["task_id"] == task_id and record["status"] == "pending"
        stream.close()
    finally:
        await client.close()


async def test_waiting_survives_a_dropped_connection(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    client = await client_of(node, backoff_initial_s=0.01)
    try:
        task_id = await client.submit("echo", {"message": "m"})
        task = await take_assignment(worker)
        waiting = asyncio.ensure_future(client.wait(task_id, timeout_s=30))
        await eventually(lambda: _true(any(c.subscribed for c in node.server.connections)))
        for conn in list(node.server.connections):
            if conn.device_id is None:
                conn.close()  # the client's connection
        await report(worker, task, "after the drop")  # the update is pushed while the client is away
        record = await asyncio.wait_for(waiting, 30)
        assert record["result"]["output"] == "after the drop"
        assert client.connections_opened >= 2
    finally:
        await client.close()


# -- a main node that breaks the connection after reading one request ----------------------------


class Flaky:
    """Accepts connections; drops the first request on each of the first ``drops`` connections,
    answers the next ``overloads`` requests ``overloaded``, then answers like a main node would
    (task_status and task_submit only)."""

    def __init__(self, drops: int = 1, overloads: int = 0) -> None:
        self.drops = drops
        self.overloads = overloads
        self.received: List[Dict[str, Any]] = []
        self.server: Optional[asyncio.base_events.Server] = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                msg = json.loads(line)
                self.received.append(msg)
                if self.drops:
                    self.drops -= 1
                    return
                result: Dict[str, Any] = {"task": {"task_id": "t1", "status": "pending"}}
                if msg["message_type"] == "task_submit":
                    result = {"task_id": "t1"}
                reply = {"message_type": "ack", "message_id": "s", "sender_id": "main-node",
                         "data": {"original_message_id": msg["message_id"], "result": result}}
                if self.overloads:
                    self.overloads -= 1
                    reply = {"message_type": "error", "message_id": "s", "sender_id": "main-node",
                             "data": {"original_message_id": msg["message_id"], "code": "overloaded",
                                      "error": "More than 5000 requests per second on this connection."}}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_idempotent_reads_are_sent_again_on_a_new_connection() -> None:
    flaky = Flaky(drops=1)
    client = AsyncClient(await flaky.start(), None, timeout_s=10, backoff_initial_s=0.01)
    try:
        assert (await client.status("t1"))["status"] == "pending"
        assert client.connections_opened == 2
        assert [m["message_type"] for m in flaky.received] == ["task_status", "task_status"]
    finally:
        await client.close()
        await flaky.stop()


async def test_a_submit_is_not_repeated_unless_it_has_an_idempotency_key() -> None:
    flaky = Flaky(drops=3)
    client = AsyncClient(await flaky.start(), None, timeout_s=10, backoff_initial_s=0.01)
    try:
        with pytest.raises(ConnectionLost, match="task_submit was sent but not answered"):
            await client.request("task_submit", {"task": {"task_type": "echo", "payload": {}}})  # no key
        assert await client.submit("echo") == "t1"  # submit() gives it a key of its own: sent again
        assert await client.submit("echo", idempotency_key="k1") == "t1"
        assert [m["message_type"] for m in flaky.received] == ["task_submit"] * 5
        keys = [m["data"]["task"].get("idempotency_key") for m in flaky.received]
        assert keys[0] is None and keys[4] == "k1"
        assert len(set(keys[1:4])) == 1 and keys[1].startswith("sub-")  # the same key, three times
    finally:
        await client.close()
        await flaky.stop()


async def test_overloaded_requests_are_sent_again_after_a_pause() -> None:
    flaky = Flaky(drops=0, overloads=3)
    client = AsyncClient(await flaky.start(), None, timeout_s=10, backoff_initial_s=0.01)
    try:
        assert await client.submit("echo") == "t1"  # not acted on when refused: safe to repeat
        assert [m["message_type"] for m in flaky.received] == ["task_submit"] * 4
    finally:
        await client.close()
        await flaky.stop()


async def test_a_request_overloaded_until_the_timeout_raises_the_main_nodes_sentence_not_a_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """Before, the last pause ran into the deadline and the user read "no reply to task_submit within 30 s;
    the main node may be overloaded", although it had answered, each time, why it refused."""
    flaky = Flaky(drops=0, overloads=10_000)
    address = await flaky.start()
    client = AsyncClient(address, None, timeout_s=1, backoff_initial_s=0.05)
    try:
        with caplog.at_level("WARNING", logger="retire_cluster.client"):
            with pytest.raises(Overloaded, match="More than 5000 requests per second"):
                await client.submit("echo")
        assert len(flaky.received) > 1  # it did send it again meanwhile
        # Said once (not at every try), so that a CLI user does not wait in silence:
        notes = [r.getMessage() for r in caplog.records if "busy" in r.getMessage()]
        assert notes == ["the main node is busy; sending task_submit again for up to 1 s "
                         "(More than 5000 requests per second on this connection.)"]
    finally:
        await client.close()
    # A pause longer than the time left: the refusal at once, not a timeout after the pause.
    client = AsyncClient(address, None, timeout_s=0.3, backoff_initial_s=2.0)
    try:
        with pytest.raises(Overloaded, match="More than 5000 requests per second"):
            await client.submit("echo")
    finally:
        await client.close()
        await flaky.stop()


def test_the_blocking_client_also_raises_the_overloaded_sentence_at_its_timeout() -> None:
    async def scenario() -> None:
        flaky = Flaky(drops=0, overloads=10_000)
        address = await flaky.start()

        def blocking() -> None:
            with Client(address, None, timeout_s=1, backoff_initial_s=0.05) as client:
                with pytest.raises(Overloaded, match="More than 5000 requests per second"):
                    client.submit("echo")
            with Client(address, None, timeout_s=0.3, backoff_initial_s=2.0) as client:
                with pytest.raises(Overloaded, match="More than 5000 requests per second"):
                    client.submit("echo")

        try:
            await asyncio.to_thread(blocking)
            assert len(flaky.received) > 1
        finally:
            await flaky.stop()

    asyncio.run(scenario())


def test_the_blocking_client_also_retries_reads_and_keyed_submits_but_not_others() -> None:
    async def scenario() -> None:
        flaky = Flaky(drops=3)
        address = await flaky.start()

        def blocking() -> None:
            with Client(address, None, timeout_s=10, backoff_initial_s=0.01) as client:
                with pytest.raises(ConnectionLost):
                    client.request("task_submit", {"task": {"task_type": "echo", "payload": {}}})  # no key
                assert client.submit("echo") == "t1"  # a key of its own: sent again after two drops
                assert client.status("t1")["status"] == "pending"
                assert client.connections_opened == 4
                keys = [m["data"]["task"].get("idempotency_key") for m in flaky.received[1:4]]
                assert len(set(keys)) == 1 and keys[0].startswith("sub-")

        try:
            await asyncio.to_thread(blocking)
        finally:
            await flaky.stop()

    asyncio.run(scenario())


# -- execute() with a local fallback ----------------------------------------------------------


async def test_fallback_runs_locally_when_no_device_takes_the_task(node: MainNode) -> None:
    client = await client_of(node)
    try:
        record = await client.execute("python_eval", {"expression": "sum(range(100000))"},
                                      fallback="local", fallback_after_s=0.1)
        assert record["ran_on"] == "local" and record["status"] == "completed"
        assert record["result"]["output"] == "4999950000"
        assert (await client.status(record["task_id"]))["status"] == "cancelled"
        failed = await client.execute("python_eval", {"expression": "1/0"}, fallback="local", fallback_after_s=0)
        assert failed["status"] == "failed" and "ZeroDivisionError" in failed["error"]
        with pytest.raises(ValueError, match="runs only echo, python_eval, sleep"):
            await client.execute("command", {"argv": ["true"]}, fallback="local")
    finally:
        await client.close()


async def test_fallback_is_not_used_when_a_device_takes_the_task(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    client = await client_of(node)
    try:
        running = asyncio.ensure_future(client.execute("echo", {"message": "hi"}, fallback="local",
                                                       fallback_after_s=30))
        task = await take_assignment(worker)
        await report(worker, task, "hi from dev-1")
        record = await asyncio.wait_for(running, 30)
        assert record["ran_on"] == "cluster:dev-1" and record["result"]["output"] == "hi from dev-1"
    finally:
        await client.close()


async def test_fallback_uses_the_cluster_result_when_the_cancel_comes_too_late(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1", accepting=False)  # registered, but takes nothing yet
    client = await client_of(node)
    real_cancel = client.cancel

    async def cancel_after_the_task_ended(task_id: str) -> Dict[str, Any]:
        await worker.request("heartbeat", {"accepting": True, "active_tasks": 0})
        task = await take_assignment(worker)
        await report(worker, task, "cluster won")
        return await real_cancel(task_id)

    client.cancel = cancel_after_the_task_ended  # type: ignore[method-assign]
    try:
        record = await client.execute("echo", {"message": "x"}, fallback="local", fallback_after_s=0.05)
        assert record["ran_on"] == "cluster:dev-1" and record["result"]["output"] == "cluster won"
    finally:
        await client.close()


# -- the blocking Client and ClusterExecutor, driven from threads ---------------------------------


async def test_blocking_client_waits_and_yields_as_completed(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1", cores=4)

    def submit_three() -> List[str]:
        with Client(addr(node), node.token, timeout_s=10) as client:
            return [client.submit("echo", {"message": m}) for m in "abc"]

    ids = await asyncio.to_thread(submit_three)
    held = {}
    for _ in range(3):
        t = await take_assignment(worker)
        held[t["task_id"]] = t
    await report(worker, held[ids[1]], "b")

    client = Client(addr(node), node.token, timeout_s=10)
    records = client.as_completed(ids, timeout_s=30)
    first = await asyncio.to_thread(next, records)
    assert first["task_id"] == ids[1]
    await report(worker, held[ids[2]], "c")
    assert (await asyncio.to_thread(next, records))["task_id"] == ids[2]
    await report(worker, held[ids[0]], "a")
    assert (await asyncio.to_thread(next, records))["result"]["output"] == "a"
    assert await asyncio.to_thread(list, records) == []
    done = await asyncio.to_thread(client.wait, ids[0], 10)
    assert done["status"] == "completed"
    client.close()


async def test_blocking_wait_survives_a_dropped_connection(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    client = Client(addr(node), node.token, timeout_s=10, backoff_initial_s=0.01)
    task_id = await asyncio.to_thread(client.submit, "echo", {"message": "m"})
    task = await take_assignment(worker)
    waiting = asyncio.ensure_future(asyncio.to_thread(client.wait, task_id, 30))
    await eventually(lambda: _true(any(task_id in c.subscribed for c in node.server.connections)))
    for conn in list(node.server.connections):
        if conn.device_id is None:
            conn.close()
    await report(worker, task, "after the drop")
    record = await asyncio.wait_for(waiting, 30)
    assert record["result"]["output"] == "after the drop" and client.connections_opened == 2
    client.close()


async def test_blocking_subscribe_and_next_update(node: MainNode) -> None:
    def run() -> List[Any]:
        with Client(addr(node), node.token, timeout_s=10) as client:
            client.subscribe()
            nothing = client.next_update(timeout_s=0.01)
            task_id = client.submit("echo", {"message": "x"})
            update = client.next_update(timeout_s=10)
            return [nothing, task_id, update]

    nothing, task_id, update = await asyncio.to_thread(run)
    assert nothing is None and update is not None
    assert update["task_id"] == task_id and update["status"] == "pending"


async def test_blocking_execute_falls_back_locally(node: MainNode) -> None:
    def run() -> Dict[str, Any]:
        with Client(addr(node), node.token, timeout_s=10) as client:
            return client.execute("echo", {"message": "here"}, fallback="local", fallback_after_s=0.05)

    record = await asyncio.to_thread(run)
    assert record["ran_on"] == "local" and record["result"]["output"] == "here"


async def test_executor_map_submit_failure_and_cancel(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1", cores=8)
    ex = await asyncio.to_thread(ClusterExecutor, addr(node), node.token, timeout_s=10)
    try:
        outputs = asyncio.ensure_future(asyncio.to_thread(lambda: list(ex.map("echo", [{"m": i} for i in range(5)]))))
        held = [await take_assignment(worker) for _ in range(5)]
        for task in reversed(held):
            await report(worker, task, f"out-{task['payload']['m']}")
        assert await asyncio.wait_for(outputs, 30) == [f"out-{i}" for i in range(5)]

        bad = ex.submit("echo", {"m": "x"})
        await report(worker, await take_assignment(worker), status="failed")
        with pytest.raises(TaskFailed, match="failed: it broke"):
            await asyncio.to_thread(bad.result, 30)
        assert bad.record is not None and bad.record["status"] == "failed"

        stuck = ex.submit("python_eval", {"expression": "1"})  # no device runs python_eval
        assert await asyncio.to_thread(stuck.cancel) is True
        assert stuck.cancelled() and stuck.task_id is not None
        await settle(node)
        assert node.lookup(stuck.task_id).status.value == "cancelled"

        refused = ex.submit("echo", requirements={"min_cpus": 1})
        with pytest.raises(InvalidMessage):
            await asyncio.to_thread(refused.result, 30)
        with pytest.raises(TypeError):
            ex.submit("echo", colour="blue")
    finally:
        await asyncio.to_thread(ex.shutdown, True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit("echo")


async def test_executor_sends_what_map_submits_a_few_hundred_per_request(node: MainNode) -> None:
    """map() over thousands of payloads was one request per task: past the rate limit's burst, "busy"."""
    import threading

    ex = await asyncio.to_thread(ClusterExecutor, addr(node), node.token, timeout_s=30)
    sizes: List[int] = []
    request = ex.client.request

    other: List[str] = []

    async def counted(message_type: str, data: Any = None, **kwargs: Any) -> Any:
        if message_type == "task_submit":
            sizes.append(len(data["tasks"]) if "tasks" in data else 1)
        else:
            other.append(message_type)
        return await request(message_type, data, **kwargs)

    ex.client.request = counted  # type: ignore[method-assign]
    go = threading.Event()
    ex._loop.call_soon_threadsafe(go.wait, 30)  # the loop takes the submissions below in one pass
    try:
        futs = [ex.submit("echo", {"m": i}) for i in range(1200)]
        futs.append(ex.submit("echo", requirements={"min_cpus": 1}))  # refused: its request is sent one by one
        go.set()

        async def submitted() -> List[Any]:
            return await asyncio.gather(*(f._submitted for f in futs), return_exceptions=True)

        answers = await asyncio.to_thread(ex._call, submitted())
        assert all(isinstance(a, str) for a in answers[:1200]) and len(set(answers[:1200])) == 1200
        assert isinstance(answers[1200], InvalidMessage)
        assert sorted(n for n in sizes if n > 1) == [201, 500, 500] and sizes.count(1) == 201
        stored = {t.task_id: t for t in await node.store.list_tasks(limit=2000)}
        assert [stored[a].payload["m"] for a in answers[:1200]] == list(range(1200))
        with pytest.raises(InvalidMessage):
            await asyncio.to_thread(futs[1200].result, 30)
        # Their ends are followed together: a subscription and a status request per hundred, not two each.
        peer = await Peer.connect(node, "canceller")
        for task_id in answers[:1200]:
            await peer.ok("task_cancel", {"task_id": task_id})
        done, _ = await asyncio.to_thread(concurrent.futures.wait, futs[:1200], 30)
        assert len(done) == 1200 and all(f.cancelled() for f in futs[:1200])
        assert other.count("task_status") <= 15 and other.count("subscribe") <= 6, other  # 1,200 each before
    finally:
        go.set()
        await asyncio.to_thread(lambda: ex.shutdown(True, cancel_futures=True))


async def test_executor_shutdown_waits_for_running_tasks(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    ex = await asyncio.to_thread(ClusterExecutor, addr(node), node.token, timeout_s=10)
    fut = ex.submit("echo", {"message": "late"})
    closing = asyncio.ensure_future(asyncio.to_thread(ex.shutdown, True))
    task = await take_assignment(worker)
    assert not closing.done()
    await report(worker, task, "late")
    await asyncio.wait_for(closing, 30)
    assert fut.result(0) == "late"
    done, _ = concurrent.futures.wait([fut], 0)
    assert done == {fut}


def test_executor_construction_fails_cleanly_without_a_main_node() -> None:
    with pytest.raises(ClientError, match="cannot connect"):
        ClusterExecutor("127.0.0.1:1", None, timeout_s=5)


# -- TLS with a pinned certificate ----------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> Any:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=main",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
async def tls_node(tmp_path: Path, certificate: Any):
    cert, key = certificate
    n = MainNode(make_config(tmp_path, tls_cert=cert, tls_key=key), run_monitor=False)
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


async def test_tls_with_a_pinned_fingerprint(tls_node: MainNode) -> None:
    pin = certificate_fingerprint(tls_node.config.tls_cert)
    async with AsyncClient(addr(tls_node), tls_node.token, tls_fingerprint=pin, timeout_s=10) as client:
        assert await client.devices() == []
    wrong = AsyncClient(addr(tls_node), tls_node.token, tls_fingerprint="ab" * 32, timeout_s=10)
    with pytest.raises(ClientError, match="not the pinned"):
        await wrong.connect()
    await wrong.close()

    def blocking() -> None:
        with Client(addr(tls_node), tls_node.token, tls_fingerprint=format_fingerprint(pin)) as client:
            assert client.tasks() == []
        with Client(addr(tls_node), tls_node.token, tls_fingerprint="ab" * 32) as client:
            with pytest.raises(ClientError, match="not the pinned"):
                client.tasks()

    await asyncio.to_thread(blocking)


# -- run(): task_submit with wait -----------------------------------------------------------


def test_a_fresh_key_puts_the_time_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys made one after the other sort together, so the main node's unique index of keys grows at
    one end (a page or two per group commit) instead of taking a random page per key."""
    import re
    import time

    from retire_cluster.client import common

    keys = []
    for now_ns in (1_764_800_000_000_000_000, 1_764_800_000_000_001_000, 1_764_800_001_000_000_000):
        monkeypatch.setattr(time, "time_ns", lambda now_ns=now_ns: now_ns)
        keys.append(common.fresh_key("sub"))
    assert keys == sorted(keys) and len(set(keys)) == 3
    assert all(re.fullmatch(r"sub-[0-9a-f]{24}", key) for key in keys)


def test_run_gives_its_task_a_key_of_its_own_unless_one_is_given() -> None:
    """run() is one request whose reply can take an hour: a key makes it safe to send again after a drop."""
    from retire_cluster.client.common import is_idempotent, waited_submit

    first, second = (waited_submit("echo", {"message": "x"}, {}, 5) for _ in range(2))
    assert first["task"]["idempotency_key"].startswith("run-") and len(first["task"]["idempotency_key"]) == 28
    assert first["task"]["idempotency_key"] != second["task"]["idempotency_key"]
    assert is_idempotent("task_submit", first)  # so the client sends it again on a new connection
    given = waited_submit("echo", None, {"idempotency_key": "mine", "priority": None}, 5)
    assert given["task"] == {"task_type": "echo", "payload": {}, "idempotency_key": "mine"}


async def test_submit_gives_its_task_a_key_of_its_own_so_it_may_be_sent_again(node: MainNode) -> None:
    """Before, submit() without a key raised ConnectionLost ("check whether it took effect") when the
    connection broke before the answer; with a key of its own it is sent again and finds the same task."""
    from retire_cluster.client.common import is_idempotent, keyed_submit

    body = keyed_submit("echo", {"message": "x"}, {})
    key = body["task"]["idempotency_key"]
    assert key.startswith("sub-") and len(key) == 28 and is_idempotent("task_submit", body)
    assert keyed_submit("echo", None, {"idempotency_key": "mine"})["task"]["idempotency_key"] == "mine"
    client = await client_of(node)
    try:
        task_id = await client.submit("echo", {"message": "x"})
        mine = await client.submit("echo", {"message": "y"}, idempotency_key="mine")
        assert await client.submit("echo", {"message": "y"}, idempotency_key="mine") == mine  # the same task
    finally:
        await client.close()
    keys = {tid: k for k, tid in node._idempotency.items()}
    assert keys[task_id].startswith("sub-") and keys[mine] == "mine"

    def blocking() -> str:
        with Client(addr(node), node.token) as sync_client:
            return sync_client.submit("echo", {"message": "z"})

    from_sync = await asyncio.to_thread(blocking)
    assert {tid: k for k, tid in node._idempotency.items()}[from_sync].startswith("sub-")


@pytest.mark.slow
def test_blocking_run_outlives_a_main_node_restart_and_runs_the_task_once(main_process, worker_process) -> None:
    """Before, run() raised ConnectionLost ("task_submit was sent but not answered, check whether it took
    effect") when the main node restarted under it, though the task went on."""
    import threading
    import time

    main = main_process()
    worker_process(main)
    with Client(main.address, main.token, timeout_s=30) as client:
        deadline = time.monotonic() + 30
        while not client.devices():
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.05)
    outcome: Dict[str, Any] = {}

    def run() -> None:
        with Client(main.address, main.token, timeout_s=60) as client:
            outcome["record"] = client.run("sleep", {"seconds": 2}, wait_s=60)

    running = threading.Thread(target=run)
    running.start()
    again = restart_while_a_task_runs(main, main_process, running)
    assert outcome["record"]["status"] == "completed" and outcome["record"]["result"]["output"] == "slept 2 s"
    with Client(again.address, again.token) as client:
        assert [(t["status"], t["attempt"]) for t in client.tasks()] == [("completed", 1)]


async def test_run_returns_the_final_record_in_one_request(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")
    client = AsyncClient(addr(node), node.token, timeout_s=0.5)  # the reply may take longer: run() allows for it
    await client.connect()
    try:
        running = asyncio.ensure_future(client.run("echo", {"message": "hi"}, priority="high", wait_s=30))
        task = await take_assignment(worker)
        assert task["priority"] == 10
        await asyncio.sleep(0.6)  # longer than timeout_s: run() extends the deadline by wait_s
        await report(worker, task, "hi")
        record = await asyncio.wait_for(running, 10)
        assert record["status"] == "completed" and record["result"]["output"] == "hi"
        assert not client._subscribed and not client._subscribed_all  # no subscription was needed
    finally:
        await client.close()


async def test_run_returns_the_record_so_far_when_the_wait_runs_out(node: MainNode) -> None:
    client = await client_of(node)
    try:
        record = await client.run("echo", wait_s=0.05)
        assert record["status"] == "pending"  # no device: it goes on waiting for one
        with pytest.raises(ValueError, match="wait_s must be more than 0 and at most 3600"):
            await client.run("echo", wait_s=0)
        with pytest.raises(TypeError, match="unknown submit option"):
            await client.run("echo", priorty="high")
    finally:
        await client.close()


async def test_blocking_run(node: MainNode) -> None:
    worker = await fake_worker(node, "dev-1")

    def run_one() -> Dict[str, Any]:
        with Client(addr(node), node.token, timeout_s=10) as client:
            return client.run("echo", {"message": "b"}, wait_s=30)

    running = asyncio.ensure_future(asyncio.to_thread(run_one))
    task = await take_assignment(worker)
    await report(worker, task, "b")
    record = await asyncio.wait_for(running, 10)
    assert record["status"] == "completed" and record["result"]["output"] == "b"
    with pytest.raises(ValueError, match="wait_s must be more than 0"):
        Client(addr(node), node.token).run("echo", wait_s=3601)


class LineServer:
    """A fake main node on 127.0.0.1: answers each request frame with ``answer(frame)`` (no reply if None)."""

    def __init__(self, answer: Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]) -> None:
        import socket
        import threading

        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                result = self.answer(json.loads(line))
                if result is not None:
                    frame = {"message_type": "ack", "message_id": "s-1", "sender_id": "main-node",
                             "data": {"original_message_id": json.loads(line)["message_id"], "result": result}}
                    conn.sendall(json.dumps(frame).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


def test_blocking_client_reads_a_reply_larger_than_its_buffer_and_sets_the_timeout_once(monkeypatch) -> None:
    import socket

    from retire_cluster.client import sync

    big = {"tasks": [{"task_id": f"t{i}", "output": "x" * 1000} for i in range(300)]}  # about 320 KB
    server = LineServer(lambda frame: big if frame["message_type"] == "task_list" else {"n": 1})
    timeouts: List[Optional[float]] = []
    real = socket.socket.settimeout

    def counted(self: socket.socket, value: Optional[float]) -> None:
        timeouts.append(value)
        real(self, value)

    monkeypatch.setattr(socket.socket, "settimeout", counted)
    try:
        with Client(f"127.0.0.1:{server.port}", None, timeout_s=5) as client:
            assert len(big["tasks"]) * 1000 > 4 * sync._RECV_CHUNK
            assert client.tasks() == big["tasks"]  # arrived in several reads of the one buffer
            set_before = len(timeouts)
            for _ in range(20):
                assert client.request("cluster_status") == {"n": 1}
            # back-to-back requests ask for nearly the same timeout: no settimeout() (an ioctl) each
            assert len(timeouts) == set_before
    finally:
        server.close()


def test_blocking_client_still_times_out_at_its_deadline() -> None:
    server = LineServer(lambda frame: None)  # never answers
    try:
        with Client(f"127.0.0.1:{server.port}", None, timeout_s=0.3) as client:
            with pytest.raises(TimeoutError, match="no reply to cluster_status"):
                client.request("cluster_status")
    finally:
        server.close()


async def test_async_client_reads_replies_in_the_protocol_callback_without_a_task() -> None:
    server = LineServer(lambda frame: {"n": 1})
    try:
        before = len(asyncio.all_tasks())
        async with AsyncClient(f"127.0.0.1:{server.port}", None, timeout_s=5) as client:
            await client.connect()
            assert len(asyncio.all_tasks()) == before  # no reader task per connection
            assert [await client.request("cluster_status") for _ in range(3)] == [{"n": 1}] * 3
    finally:
        server.close()


async def test_async_client_drops_a_connection_that_sends_a_bad_frame() -> None:
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'{"message_type": "ack", "message_id": 5}\n')  # not an envelope
            conn.recv(65536)

    threading.Thread(target=serve, daemon=True).start()
    try:
        async with AsyncClient(f"127.0.0.1:{listener.getsockname()[1]}", None, timeout_s=5,
                               reconnect=False) as client:
            with pytest.raises(ClientError, match="sent something that is not a retire-cluster frame") as refused:
                await client.request("task_submit", {"task": {"task_type": "echo"}})
            assert not isinstance(refused.value, ConnectionLost)  # it would only happen again
    finally:
        listener.close()


async def test_a_reply_too_large_for_the_client_says_so_at_once(node: MainNode) -> None:
    """Before, the request was sent again and again until the timeout: "no reply within 30 s"."""
    c = await client_of(node)
    try:
        for n in range(20):
            await c.submit("echo", {"message": "m" * 100})
    finally:
        await c.close()
    small = await client_of(node, max_frame_bytes=1000)
    try:
        with pytest.raises(ClientError, match=r"larger than this client's max_frame_bytes \(1000\)"):
            await small.tasks(limit=50)
    finally:
        await small.close()

    def blocking() -> None:
        with Client(addr(node), node.token, timeout_s=10, max_frame_bytes=1000) as client:
            with pytest.raises(ClientError, match=r"larger than this client's max_frame_bytes \(1000\)"):
                client.tasks(limit=50)
            assert client.connections_opened == 1

    await asyncio.to_thread(blocking)


async def test_a_request_over_the_frame_limit_is_refused_before_sending_and_spoils_nothing(node: MainNode) -> None:
    """Before, the main node closed the connection: ConnectionLost for it and for every request in flight."""
    from retire_cluster.protocol.errors import FrameTooLarge

    big = {"message": "a" * (1 << 20)}
    c = await client_of(node)
    try:
        small = asyncio.ensure_future(c.submit("echo", {"message": "small"}))
        with pytest.raises(FrameTooLarge, match="nothing was sent"):
            await c.submit("echo", big)
        assert isinstance(await small, str) and c.connections_opened == 1
    finally:
        await c.close()

    def blocking() -> None:
        with Client(addr(node), node.token, timeout_s=10) as client:
            with pytest.raises(FrameTooLarge, match="nothing was sent"):
                client.submit("echo", big)
            client.submit("echo", {"message": "after"})
            assert client.connections_opened == 1
        # Set higher than the main node's limit: its own answer (FrameTooLarge), then a new connection.
        with Client(addr(node), node.token, timeout_s=10, max_request_bytes=8 << 20) as client:
            with pytest.raises(FrameTooLarge, match="Frame larger than"):
                client.submit("echo", big)
            client.submit("echo", {"message": "after"})
            assert client.connections_opened == 2

    await asyncio.to_thread(blocking)


# -- the caller's timeout_s holds, whatever the main node does ---------------------------------------


async def test_wait_with_a_timeout_raises_timeout_even_while_the_main_node_is_down(tmp_path: Path) -> None:
    """Before, it waited out the client's own timeout_s reconnecting, then raised ClientError."""
    n = MainNode(make_config(tmp_path), run_monitor=False)
    await n.start()
    address, token = addr(n), n.token
    c = AsyncClient(address, token, timeout_s=5)
    await c.connect()
    blocking = Client(address, token, timeout_s=5)
    await asyncio.to_thread(blocking.connect)
    try:
        task_id = await c.submit("sleep", {"seconds": 60})
        await n.stop()  # nothing listens any more
        with pytest.raises(TimeoutError, match=f"task {task_id} did not end within 0.5 s"):
            await c.wait(task_id, timeout_s=0.5)
        with pytest.raises(TimeoutError, match=f"task {task_id} did not end within 0.5 s"):
            await asyncio.to_thread(blocking.wait, task_id, 0.5)
    finally:
        await c.close()
        blocking.close()


async def test_a_cancel_that_meets_a_refused_connection_is_not_lost(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's timeout cancels a request just as its connection attempt is refused (the race that made
    ``wait(timeout_s=0.5)`` raise ClientError after the client's own timeout_s, once in a CI run): the
    request ends cancelled at once, not retrying on. asyncio.wait_for around the attempt swallowed such a
    cancel on Python 3.11; here the attempt refuses and cancels the request in the same step, every time."""
    n = MainNode(make_config(tmp_path), run_monitor=False)
    await n.start()
    c = AsyncClient(addr(n), n.token, timeout_s=2)
    await c.connect()
    await n.stop()
    for _ in range(1000):  # until the client has read the end of its connection
        if not c.connected:
            break
        await asyncio.sleep(0.01)
    assert not c.connected
    loop = asyncio.get_running_loop()
    attempts: List[int] = []
    request: asyncio.Task[Any]

    async def refused_as_the_caller_gives_up(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            request.cancel()  # the caller's timeout, in the same step as the refusal
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(loop, "create_connection", refused_as_the_caller_gives_up)
    request = asyncio.ensure_future(c.request("task_status", {"task_id": "t-1"}))
    try:
        with pytest.raises(asyncio.CancelledError):
            await request
        assert attempts == [1]  # no attempt after the cancel
    finally:
        await c.close()


class _ItemAsTheCallerGivesUp:
    """A queue whose get() hands over an item and, in the same step, cancels the task reading it."""

    def __init__(self) -> None:
        self.reader: Optional[asyncio.Task[Any]] = None

    async def get(self) -> Dict[str, Any]:
        assert self.reader is not None
        self.reader.cancel()
        return {"task_id": "t-1", "status": "completed"}


async def test_a_cancel_that_comes_as_a_pushed_record_arrives_is_not_lost() -> None:
    """``execute`` reads pushed records with a deadline; its caller's cancel must win over a record read in
    the same step. asyncio.wait_for on Python 3.11 returned the record instead, and the caller went on."""
    from retire_cluster.client.aio import AsyncClient as Async

    queue = _ItemAsTheCallerGivesUp()
    loop = asyncio.get_running_loop()
    reader = asyncio.ensure_future(Async._next_record(queue, {}, loop.time() + 60))  # type: ignore[arg-type]
    queue.reader = reader
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_within_keeps_a_cancel_and_times_out_what_does_not_end() -> None:
    from retire_cluster.client.common import within

    queue = _ItemAsTheCallerGivesUp()
    reader = asyncio.ensure_future(within(queue.get(), 60))
    queue.reader = reader
    with pytest.raises(asyncio.CancelledError):
        await reader
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(asyncio.TimeoutError):
        await within(never, 0)
    assert never.cancelled()  # not left waiting
    assert await within(asyncio.sleep(0, "done"), None) == "done"
    assert await within(asyncio.sleep(0, "in time"), 60) == "in time"


async def test_execute_with_a_local_fallback_keeps_to_timeout_s(node: MainNode) -> None:
    nobody = {"requirements": {"role": "nobody"}}
    c = await client_of(node)
    try:
        with pytest.raises(TimeoutError, match="did not end within 0.5 s"):
            await c.execute("sleep", {"seconds": 30}, fallback="local", fallback_after_s=0.1, timeout_s=0.5, **nobody)
    finally:
        await c.close()

    def blocking() -> None:
        with Client(addr(node), node.token, timeout_s=10) as client:
            with pytest.raises(TimeoutError, match="did not end within 0.5 s"):
                client.execute("sleep", {"seconds": 30}, fallback="local", fallback_after_s=0.1, timeout_s=0.5,
                               **nobody)

            async def inside_a_loop() -> Dict[str, Any]:  # a notebook, or async code calling the blocking client
                return client.execute("echo", {"message": "here"}, fallback="local", fallback_after_s=0.1, **nobody)

            done = asyncio.run(inside_a_loop())
            assert (done["ran_on"], done["result"]["output"]) == ("local", "here")

    await asyncio.to_thread(blocking)


async def test_nan_and_infinity_are_refused_before_sending_not_sent_as_null(node: MainNode) -> None:
    """orjson writes NaN as null: the task ran with a payload other than the one given."""
    c = await client_of(node)
    try:
        with pytest.raises(ValueError, match=r"task.payload.x\[1\] is nan, which JSON cannot carry"):
            await c.submit("echo", {"x": [1.0, float("nan")]})
        with pytest.raises(ValueError, match="task.timeout is inf"):
            await c.submit("echo", {"message": "a"}, timeout=float("inf"))
        assert await c.tasks() == []
    finally:
        await c.close()


async def test_one_task_id_given_as_a_string_is_refused_not_split_into_letters(node: MainNode) -> None:
    c = await client_of(node)
    try:
        with pytest.raises(TypeError, match=r"not one id: pass \['abc'\]"):
            await c.subscribe("abc")
        with pytest.raises(TypeError, match="not one id"):
            async for _ in c.as_completed("abc"):
                pass
    finally:
        await c.close()

    def blocking() -> None:
        with Client(addr(node), node.token, timeout_s=10) as client:
            with pytest.raises(TypeError, match="not one id"):
                client.subscribe("abc")
            with pytest.raises(TypeError, match="not one id"):
                next(client.as_completed("abc"))

    await asyncio.to_thread(blocking)


async def test_a_client_without_the_pin_against_a_tls_main_node_is_told_at_once(tls_node: MainNode) -> None:
    """The main node closes a plain connection at once; the client used to retry until its timeout."""
    hint = "if the main node speaks TLS .* pass --tls-fingerprint"
    plain = AsyncClient(addr(tls_node), tls_node.token, timeout_s=60)
    try:
        with pytest.raises(ClientError, match=hint):
            await plain.connect()
    finally:
        await plain.close()

    def blocking() -> None:
        with pytest.raises(ClientError, match=hint):
            Client(addr(tls_node), tls_node.token, timeout_s=60).connect()

    await asyncio.to_thread(blocking)


async def test_both_clients_pointed_at_the_dashboards_port_say_so_at_once() -> None:
    """`retire-cluster status --main host:5000`: the first connection's authentication got an HTTP 400,
    and the client reconnected with backoff until its timeout ("no reply to subscribe within 30 s")."""
    import socket
    import threading

    from retire_cluster.client.sync import Client

    listener = socket.create_server(("127.0.0.1", 0))
    answered = []

    def serve() -> None:  # what aiohttp answers a JSON line, on every connection
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                answered.append(1)  # counted before answering: the client may raise the moment it reads
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(ClientError, match="not its dashboard's"):
            await asyncio.to_thread(lambda: Client(address, "token", timeout_s=20).cluster_status())
        assert len(answered) == 1  # one connection: nothing worth retrying
        client = AsyncClient(address, "token", timeout_s=20)
        try:
            with pytest.raises(ClientError, match="not its dashboard's"):
                await client.cluster_status()
        finally:
            await client.close()
        assert len(answered) == 2
    finally:
        listener.close()


class _EndedAndPending:
    """What wait_batch uses of an AsyncClient: one task ends, the other is still pending at the deadline."""

    RECORD = {"task_id": "t-1", "task_type": "echo", "status": "completed", "payload": {"message": "x" * 500},
              "attempts": [{"attempt": 1, "device_id": "pi"}], "assigned_device": "pi", "error": None,
              "result": {"output": "x" * 500, "exit_code": 0, "metrics": {"cpu": 1}}, "created_at": "2027-01-01"}

    async def as_completed(self, task_ids: List[str], timeout_s: Optional[float] = None) -> Any:
        yield dict(self.RECORD)
        raise TimeoutError("1 of 2 tasks did not end")

    async def statuses(self, task_ids: List[str]) -> List[Optional[Dict[str, Any]]]:
        return [{"task_id": task_id, "status": "pending", "result": None, "payload": {}, "attempts": []}
                for task_id in task_ids]


async def test_wait_batch_keeps_brief_records_when_asked() -> None:
    """submit-batch --wait kept every whole record (payload, attempts, times, metrics) to the end."""
    from retire_cluster.client.batch import brief_record, summarise, wait_batch

    client: Any = _EndedAndPending()
    whole = await wait_batch(client, ["t-1", "t-2"], timeout_s=1)
    brief = await wait_batch(client, ["t-1", "t-2"], timeout_s=1, brief=True)
    assert whole["t-1"] == _EndedAndPending.RECORD and whole["t-2"]["status"] == "pending"
    assert brief == {"t-1": brief_record(_EndedAndPending.RECORD), "t-2": {
        "task_id": "t-2", "status": "pending", "error": None, "assigned_device": None, "result": None}}
    assert brief["t-1"]["result"] == {"output": "x" * 500, "error": None} and "payload" not in brief["t-1"]
    submitted = [(1, "t-1"), (2, "t-2")]
    assert summarise(submitted, brief) == summarise(submitted, whole)  # the same table, JSON and counts
    with pytest.raises(TimeoutError):
        await wait_batch(client, ["t-1", "t-2"])  # no timeout_s of its own: not for it to swallow


async def test_as_completed_yields_the_tasks_already_ended_batch_by_batch(node: MainNode) -> None:
    """Waiting for many tasks that ended already asks for their records 100 per request, and yields them
    as they come: a big submit-batch --wait neither holds every record at once nor meets the rate limit."""
    client = await client_of(node)
    try:
        ids = await client.submit_many({"task_type": "echo", "payload": {"n": i}} for i in range(250))  # no device
        for task_id in ids:
            await client.cancel(task_id)
        asked: List[int] = []
        request = client.request

        async def counted(message_type: str, data: Any = None, **kwargs: Any) -> Any:
            if message_type == "task_status":
                asked.append(len(data["task_ids"]))
            return await request(message_type, data, **kwargs)

        client.request = counted  # type: ignore[method-assign]
        seen: List[str] = []
        async for record in client.as_completed(ids, timeout_s=30):
            if not seen:
                assert asked == [100]  # the first request's records, not all 250
            seen.append(record["task_id"])
            assert record["status"] == "cancelled"
        assert seen == ids and asked == [100, 100, 50]
        assert [r["task_id"] if r else None for r in await client.statuses([ids[0], "no-such-task"])] == [ids[0], None]
        with pytest.raises(NotFound, match="no-such-task"):
            async for _ in client.as_completed([ids[0], "no-such-task"], timeout_s=30):
                pass
    finally:
        await client.close()
