"""The real worker agent against a real main node, in one process: connection faults."""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path

import pytest
from conftest import Peer, make_config

from retire_cluster.main import MainNode
from retire_cluster.worker import Agent, WorkerConfig
from retire_cluster.worker.outbox import Outbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def agent_for(node_port: int, token: str | None, data_dir: Path, **kw) -> Agent:
    config = WorkerConfig(main_host="127.0.0.1", main_port=node_port, token=token, device_id="phone",
                          data_dir=data_dir, reconnect_min_s=0.05, reconnect_max_s=0.2,
                          heartbeat_interval_s=0.5, **kw)
    return Agent(config)


async def start_node(tmp_path: Path, port: int) -> MainNode:
    node = MainNode(make_config(tmp_path, port=port), run_monitor=False)
    await node.start()
    return node


async def submit(node: MainNode, task_type: str, payload: dict) -> str:
    client = await Peer.connect(node)
    task_id = (await client.ok("task_submit", {"task": {"task_type": task_type, "payload": payload}}))["task_id"]
    await client.close()
    return str(task_id)


async def record(node: MainNode, task_id: str) -> dict:
    client = await Peer.connect(node)
    rec = (await client.ok("task_status", {"task_id": task_id}))["task"]
    await client.close()
    return dict(rec)


@pytest.fixture
def port() -> int:
    return free_port()


async def test_dropped_connection_keeps_the_running_task(tmp_path: Path, port: int) -> None:
    node = await start_node(tmp_path, port)
    agent = agent_for(port, node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        task_id = await submit(node, "sleep", {"seconds": 1.0})
        await wait_until(lambda: task_id in agent.running)
        node.registry.get("phone").conn.close()  # the Wi-Fi drops
        await wait_until(lambda: node.lookup(task_id).terminal)
        rec = await record(node, task_id)
        assert rec["status"] == "completed" and rec["attempt"] == 1
        assert [a["outcome"] for a in rec["attempts"]] == ["completed"]
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_result_finished_while_main_node_was_down_is_delivered(tmp_path: Path, port: int) -> None:
    node = await start_node(tmp_path, port)
    agent = agent_for(port, node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        task_id = await submit(node, "sleep", {"seconds": 0.6})
        await wait_until(lambda: task_id in agent.running)
        await node.stop()  # the main node goes away while the task runs
        await wait_until(lambda: (task_id, 1) in agent.outbox)
        assert list((tmp_path / "w" / "outbox").glob("*.json")), "the result is kept on disk"
        node = await start_node(tmp_path, port)
        await wait_until(lambda: not agent.outbox)
        rec = await record(node, task_id)
        assert rec["status"] == "completed" and rec["attempt"] == 1
        assert rec["result"]["output"] == "slept 0.6 s"
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_a_main_node_that_stops_says_so_and_the_worker_logs_it_as_news_not_a_loss(
        tmp_path: Path, port: int, caplog: pytest.LogCaptureFixture) -> None:
    """Before, a graceful stop closed every connection without a word, and each worker logged a
    WARNING "connection to main node lost" as for a crash or a network fault."""
    from retire_cluster.main.server import STOPPING_SENTENCE

    node = await start_node(tmp_path, port)
    client = await Peer.connect(node)
    agent = agent_for(port, node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        await wait_until(agent.registered.is_set)
        await client.ok("list_devices", {})  # authenticated: only those hear it
        with caplog.at_level("INFO", logger="retire_cluster.worker"):
            await node.stop()
            farewell = await client.next_push("error")  # a client hears it too, unasked
            assert farewell["data"]["original_message_id"] is None
            assert (farewell["data"]["code"], farewell["data"]["error"]) == ("overloaded", STOPPING_SENTENCE)
            await wait_until(lambda: any("main node is stopping" in r.getMessage() for r in caplog.records))
        lost = [r.getMessage() for r in caplog.records if "connection to main node lost" in r.getMessage()]
        assert lost == []
    finally:
        await client.close()
        agent.stop()
        await runner


async def test_result_spooled_before_a_worker_restart_is_delivered(tmp_path: Path, port: int) -> None:
    node = await start_node(tmp_path, port)
    try:
        task_id = await submit(node, "echo", {"message": "x"})
        peer = await Peer.connect(node, "phone")
        await peer.request("register", {
            "device_info": {"hostname": "h", "platform": "linux", "architecture": "x", "python_version": "3"},
            "hardware_specs": {"cpu_cores": 1, "memory_total": 1}, "task_types": ["echo"]})
        push = await peer.next_push("task_assign")
        assert push["data"]["task"]["task_id"] == task_id
        await peer.close()
        # The worker finished it, wrote the result, and was restarted before sending it.
        Outbox(tmp_path / "w" / "outbox").put((task_id, 1), {
            "task_id": task_id, "attempt": 1, "status": "completed", "execution_time": 0.0,
            "result": {"output": "from before the restart", "exit_code": 0}})
        agent = agent_for(port, node.token, tmp_path / "w")
        assert agent.held_tasks() == [{"task_id": task_id, "attempt": 1}]
        runner = asyncio.ensure_future(agent.run())
        await wait_until(lambda: not agent.outbox)
        rec = await record(node, task_id)
        assert rec["status"] == "completed" and rec["attempt"] == 1
        assert rec["result"]["output"] == "from before the restart"
        assert not list((tmp_path / "w" / "outbox").glob("*.json"))
        agent.stop()
        await runner
    finally:
        await node.stop()


async def test_wrong_token_is_fatal_with_exit_2(tmp_path: Path, port: int) -> None:
    node = await start_node(tmp_path, port)
    try:
        agent = agent_for(port, "wrong", tmp_path / "w")
        assert await asyncio.wait_for(agent.run(), 20) == 2
    finally:
        await node.stop()


async def test_the_dashboards_port_given_as_main_is_fatal_in_one_sentence(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The main node prints its dashboard's address too; a worker given that port used to log each line of
    the HTTP answer as a bad frame, at every reconnect, for ever."""
    node = MainNode(make_config(tmp_path, http_enabled=True, http_port=0), run_monitor=False)
    await node.start()
    try:
        assert node.http_address is not None
        agent = agent_for(node.http_address[1], node.token, tmp_path / "w")
        assert await asyncio.wait_for(agent.run(), 20) == 2
        assert (f"127.0.0.1:{node.http_address[1]} answers HTTP: it is a web server (the main node's dashboard, "
                "say), not the main node's TCP port") in caplog.text
        assert "bad frame" not in caplog.text
    finally:
        await node.stop()


@pytest.mark.parametrize("bad", [{"device_id": "bad\x1bid"}, {"device_id": "a" * 300},
                                 {"capabilities": ("c\x07",)}])
async def test_a_registration_the_main_node_refuses_is_fatal_not_retried_forever(
        tmp_path: Path, port: int, bad: dict, caplog: pytest.LogCaptureFixture) -> None:
    node = await start_node(tmp_path, port)
    try:
        settings = {"device_id": "phone", **bad}
        config = WorkerConfig(main_host="127.0.0.1", main_port=port, token=node.token, data_dir=tmp_path / "w",
                              reconnect_min_s=0.05, reconnect_max_s=0.2, **settings)
        assert await asyncio.wait_for(Agent(config).run(), 20) == 2
        assert "The main node refused to register this worker" in caplog.text
    finally:
        await node.stop()


async def test_backoff_grows_with_jitter_within_bounds(tmp_path: Path) -> None:
    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path, reconnect_min_s=1, reconnect_max_s=60))
    for failures in range(1, 12):
        delays = [agent._backoff(failures) for _ in range(50)]
        assert all(1 <= d <= min(60, 2 ** (failures - 1)) for d in delays)
    assert max(agent._backoff(10) for _ in range(200)) > 30


def test_result_frame_is_trimmed_to_fit_including_a_huge_error(tmp_path: Path) -> None:
    from retire_cluster.protocol.codec import encode

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    agent.max_frame_bytes = 64 * 1024
    data = agent._fit({"task_id": "t", "attempt": 1, "status": "failed", "execution_time": 0.0,
                       "result": {"output": "o" * 50_000, "error": "é" * 200_000, "stderr": "s" * 10}})
    assert len(encode(agent._message("task_result", data))) <= agent.max_frame_bytes
    assert data["result"]["truncated"] is True
    assert data["result"]["error"].startswith("é")


def test_trimming_shares_the_cut_so_the_output_is_not_the_first_to_go(tmp_path: Path) -> None:
    """2 MB of stdout and 2 MB of stderr: both kept in part (before, the output was emptied first)."""
    from retire_cluster.protocol.codec import encode

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    data = agent._fit({"task_id": "t", "attempt": 1, "status": "completed", "execution_time": 0.0,
                       "result": {"output": "a" * 2_000_000, "stderr": "b" * 2_000_000, "exit_code": 0}})
    assert len(encode(agent._message("task_result", data))) <= agent.max_frame_bytes
    result = data["result"]
    assert result["truncated"] is True
    assert 400_000 < len(result["output"]) < 600_000 and abs(len(result["output"]) - len(result["stderr"])) < 1000
    small = agent._fit({"task_id": "t", "attempt": 1, "status": "failed", "execution_time": 0.0,
                        "result": {"output": "o" * 3_000_000, "error": "ValueError: bad"}})["result"]
    assert small["error"] == "ValueError: bad"  # a short field loses almost nothing


def test_a_result_that_surely_fits_is_not_encoded_to_measure_it(tmp_path: Path, monkeypatch) -> None:
    from retire_cluster.worker import agent as agent_module

    encoded = []
    monkeypatch.setattr(agent_module, "encode", lambda msg: encoded.append(msg) or b"x" * 100)
    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    small = {"output": "hi \u00e9\n", "exit_code": 0, "truncated": False, "metrics": {"cpu_s": 0.5, "rss_kb": 2**40}}
    data = {"task_id": "t", "attempt": 1, "status": "completed", "execution_time": 0.0, "result": small}
    assert agent._fit(data) is data and encoded == []  # an echo's result: a bound says it fits
    for odd in ({"metrics": {"nested": {"a": 1}}}, {"output": [1, 2]}, {"metrics": {"n": 2**64}},
                {"output": "x" * (agent.max_frame_bytes // 6)}):
        agent._fit({"task_id": "t", "attempt": 1, "status": "completed", "execution_time": 0.0, "result": odd})
    assert len(encoded) == 4  # anything the bound cannot vouch for is measured


def test_outbox_keeps_live_results_in_memory_and_spills_them_on_disconnect(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(("a", 1), {"task_id": "a", "attempt": 1, "status": "completed"}, durable=False)
    assert ("a", 1) in box
    assert not list((tmp_path / "outbox").glob("*.json"))
    box.put(("b", 1), {"task_id": "b", "attempt": 1, "status": "completed"}, durable=False)
    box.remove(("b", 1))
    box.spill()  # the connection dropped before "a" was acknowledged
    assert len(list((tmp_path / "outbox").glob("*.json"))) == 1
    again = Outbox(tmp_path / "outbox")
    assert list(again) == [("a", 1)]
    again.remove(("a", 1))
    assert not list((tmp_path / "outbox").glob("*.json"))


async def test_unanswered_result_times_out_and_stays_in_the_outbox(tmp_path: Path, port: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A main node that never acknowledges a result: the worker stops waiting and keeps the result."""
    from retire_cluster.worker import agent as agent_module

    monkeypatch.setattr(agent_module, "REQUEST_TIMEOUT_S", 0.3)
    node = await start_node(tmp_path, port)
    swallowed = []

    def never_answer(conn, msg):  # the request is taken in, no reply ever goes out
        swallowed.append(msg)
        return asyncio.get_running_loop().create_future()

    monkeypatch.setitem(node.handlers._table, "task_result", never_answer)
    agent = agent_for(port, node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        task_id = await submit(node, "echo", {"message": "hi"})
        await wait_until(lambda: swallowed and agent.tasks_finished == 1)
        await wait_until(lambda: not agent._pending)  # the wait ended (timed out) ...
        assert not agent._results_sent
        assert [key[0] for key in agent.outbox] == [task_id]  # ... and the result is kept for a re-send
        assert not node.lookup(task_id).terminal
    finally:
        agent.stop()
        await runner
        await node.stop()


class RecordingWriter:
    """Stands in for the Link: records each write() (one write is one send on the socket)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.writes: list[bytes] = []
        self.reading = False  # frames given to the agent directly, not in a Link's read
        self.loop = loop or asyncio.get_running_loop()  # as a Link's

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        return None


async def test_an_instant_tasks_ack_and_result_leave_in_one_write(tmp_path: Path) -> None:
    """Frames queued in one loop pass go out together: the main node wakes once for echo's ack and result."""
    import json

    from retire_cluster.protocol.messages import Message

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    writer = RecordingWriter()
    agent._writer = writer  # type: ignore[assignment]
    agent.registered.set()
    agent._on_message(Message("task_assign", "m-1", "main-node", {"task": {
        "task_id": "t-1", "attempt": 1, "task_type": "echo", "payload": {"message": "hi"}, "timeout": 10}}))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(writer.writes) == 1, writer.writes
    frames = [json.loads(line) for line in writer.writes[0].splitlines()]
    assert [f["message_type"] for f in frames] == ["ack", "task_result"]
    assert frames[1]["data"]["result"]["output"] == "hi"
    assert list(agent._pending) == [frames[1]["message_id"]]  # the result waits for the main node's ack
    agent._on_message(Message("ack", "a-1", "main-node", {"original_message_id": frames[1]["message_id"]}))
    assert not agent.running and not list(agent.outbox)  # handled as it was read: no loop pass needed
    assert not agent._pending and not agent._results_sent


async def test_an_instant_task_is_answered_in_the_pass_that_assigned_it(tmp_path: Path) -> None:
    """echo runs inside the assignment's callback: no Task, no loop pass before its result is queued."""
    import json

    from retire_cluster.protocol.messages import Message

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    writer = RecordingWriter()
    agent._writer = writer  # type: ignore[assignment]
    agent.registered.set()
    tasks_before = len(asyncio.all_tasks())
    agent._on_message(Message("task_assign", "m-1", "main-node", {"task": {
        "task_id": "t-1", "attempt": 1, "task_type": "echo", "payload": {"message": "hi"}, "timeout": 10}}))
    frames = [json.loads(frame) for frame in agent._out]  # queued, not yet written
    assert [f["message_type"] for f in frames] == ["ack", "task_result"]
    assert not agent.running and len(asyncio.all_tasks()) == tasks_before
    assert list(agent.outbox) == [("t-1", 1)]  # kept until the main node acknowledges it
    assert list(agent._pending) == [frames[1]["message_id"]]
    agent._on_message(Message("error", "e-1", "main-node",
                              {"original_message_id": frames[1]["message_id"], "code": "forbidden",
                               "error": "This device does not hold that task."}))
    assert not list(agent.outbox)  # a refused result is not sent again
    assert not agent._pending and not agent._results_sent


async def test_an_instant_tasks_answer_is_written_in_the_read_that_assigned_it(tmp_path: Path) -> None:
    """The read's own callback writes echo's ack and result: no loop pass before they reach the socket."""
    import json

    from retire_cluster.link import Link

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    link = Link(agent._on_message, 1 << 20, on_read_end=agent._read_ended)
    writer = RecordingWriter()
    link.connection_made(writer)  # type: ignore[arg-type]
    agent._writer = link
    agent.registered.set()
    flushes: list[object] = []
    flush = agent._flush

    def counting(to: Link) -> None:
        flushes.append(to)
        flush(to)

    agent._flush = counting  # type: ignore[method-assign]
    assign = {"message_type": "task_assign", "message_id": "m-1", "sender_id": "main-node", "data": {"task": {
        "task_id": "t-1", "attempt": 1, "task_type": "echo", "payload": {"message": "hi"}, "timeout": 10}}}
    link.data_received(json.dumps(assign).encode() + b"\n")
    assert len(writer.writes) == 1, writer.writes  # before any loop pass
    frames = [json.loads(line) for line in writer.writes[0].splitlines()]
    assert [f["message_type"] for f in frames] == ["ack", "task_result"]
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(writer.writes) == 1
    # The read's end wrote them; no flush was scheduled for the end of the loop pass (a pass with nothing to do).
    assert flushes == [link]


def one_slot_agent_given_a_sleep(tmp_path: Path) -> "tuple[Agent, RecordingWriter]":
    """A registered 1-slot agent writing to a RecordingWriter, just assigned a 30 s sleep (t-1, attempt 1)."""
    from retire_cluster.protocol.messages import Message

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path, max_tasks=1))
    writer = RecordingWriter()
    agent._writer = writer  # type: ignore[assignment]
    agent.registered.set()
    agent._on_message(Message("task_assign", "m-1", "main-node", {"task": {
        "task_id": "t-1", "attempt": 1, "task_type": "sleep", "payload": {"seconds": 30}, "timeout": 60}}))
    return agent, writer


async def test_a_task_cancelled_in_the_read_that_assigned_it_frees_its_slot_and_is_reported(
        tmp_path: Path) -> None:
    """The job is cancelled before its first step: its coroutine (and its cleanup) never runs."""
    import json

    from retire_cluster.protocol.messages import Message

    agent, writer = one_slot_agent_given_a_sleep(tmp_path)
    agent._on_message(Message("task_cancel", "m-2", "main-node", {"task_id": "t-1", "attempt": 1,
                                                                    "reason": "not_stored"}))
    await wait_until(lambda: not agent.running)  # the one slot is free again
    frames = [json.loads(line) for data in writer.writes for line in data.splitlines()]
    (result,) = [f for f in frames if f["message_type"] == "task_result"]
    assert result["data"]["status"] == "cancelled" and result["data"]["task_id"] == "t-1"
    agent._on_message(Message("task_assign", "m-3", "main-node", {"task": {
        "task_id": "t-2", "attempt": 1, "task_type": "echo", "payload": {"message": "next"}, "timeout": 10}}))
    await wait_until(lambda: any(b'"output":"next"' in data.replace(b" ", b"") for data in writer.writes))


async def test_the_backoff_starts_over_after_a_connection_that_registered(tmp_path: Path, port: int) -> None:
    """Before, it grew with every lost connection for the worker's life: 16 s to come back after a few."""
    node = await start_node(tmp_path, port)
    agent = agent_for(port, node.token, tmp_path / "w")
    asked = []
    real = agent._backoff
    agent._backoff = lambda failures: (asked.append(failures), real(failures))[1]  # type: ignore[method-assign]
    runner = asyncio.ensure_future(agent.run())
    try:
        for n in range(4):
            # Registered on both sides: the worker has the register ack (else the drop counts as a failure).
            await wait_until(lambda: agent.registered.is_set() and node.registry.get("phone") is not None
                             and node.registry.get("phone").conn is not None)
            node.registry.get("phone").conn.close()  # the Wi-Fi drops, after a good registration
            await wait_until(lambda n=n: len(asked) > n)
        assert asked == [1, 1, 1, 1]
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_a_result_the_main_node_could_not_take_is_kept_and_sent_again(tmp_path: Path, port: int,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`internal` (its disk was full) is not a refusal: before, the worker dropped the result from its
    outbox, so a main node that died before its disk recovered had the task run again."""
    from retire_cluster.protocol.errors import InternalError
    from retire_cluster.worker import agent as agent_module

    monkeypatch.setattr(agent_module, "RESULT_RETRY_S", 0.05, raising=False)
    node = await start_node(tmp_path, port)
    original = node.handlers._table["task_result"]
    refused = []

    def disk_full_once(conn, msg):
        if not refused:
            refused.append(msg)
            raise InternalError("The main node could not write its database (database or disk is full).")
        return original(conn, msg)

    monkeypatch.setitem(node.handlers._table, "task_result", disk_full_once)
    agent = agent_for(port, node.token, tmp_path / "w")
    runner = asyncio.ensure_future(agent.run())
    try:
        task_id = await submit(node, "echo", {"message": "hi"})
        await wait_until(lambda: node.lookup(task_id) is not None and node.lookup(task_id).terminal)
        assert refused and (await record(node, task_id))["result"]["output"] == "hi"
        await wait_until(lambda: not agent.outbox)  # acknowledged the second time, then gone
    finally:
        agent.stop()
        await runner
        await node.stop()


async def test_a_cancelled_tasks_slot_takes_the_next_task_sent_with_the_cancel(tmp_path: Path) -> None:
    """The main node frees the slot of a task it cancels and may send the next task in the same write.

    Before, the worker still counted the stopping task (its process is reaped a pass or more later),
    refused the next one as "all task slots are busy", and that refusal paused the device until its
    next heartbeat: a minute by default.
    """
    import json

    from retire_cluster.protocol.messages import Message

    agent, writer = one_slot_agent_given_a_sleep(tmp_path)
    for _ in range(5):
        await asyncio.sleep(0)  # it runs
    agent._on_message(Message("task_cancel", "m-2", "main-node", {"task_id": "t-1", "attempt": 1,
                                                                    "reason": "cancelled"}))
    agent._on_message(Message("task_assign", "m-3", "main-node", {"task": {
        "task_id": "t-2", "attempt": 1, "task_type": "sleep", "payload": {"seconds": 0}, "timeout": 10}}))
    await wait_until(lambda: not agent.running)
    frames = [json.loads(line) for data in writer.writes for line in data.splitlines()]
    replies = {f["data"]["original_message_id"]: f["message_type"] for f in frames
               if f["message_type"] in ("ack", "error")}
    assert replies == {"m-1": "ack", "m-3": "ack"}
    results = {f["data"]["task_id"]: f["data"]["status"] for f in frames if f["message_type"] == "task_result"}
    assert results == {"t-1": "cancelled", "t-2": "completed"}


async def test_a_result_unanswered_when_the_connection_ends_is_kept_without_noise(tmp_path: Path) -> None:
    """The connection ends while a result waits for its answer: the result stays in the outbox for the next
    register, its timer is cancelled, and its future's ConnectionError (nobody awaits it) is retrieved, so
    it is not logged as "Future exception was never retrieved"."""
    from retire_cluster.protocol.messages import Message

    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    agent._writer = RecordingWriter()  # type: ignore[assignment]
    agent.registered.set()
    agent._on_message(Message("task_assign", "m-1", "main-node", {"task": {
        "task_id": "t-1", "attempt": 1, "task_type": "echo", "payload": {"message": "hi"}, "timeout": 10}}))
    (waiting,) = agent._pending.values()
    assert list(agent._results_sent) == list(agent._pending)
    timer = agent._results_timer
    assert timer is not None
    reported: list = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx["message"]))
    agent._connection_ended()
    assert waiting.done() and not waiting.cancelled()
    assert timer.cancelled() and agent._results_timer is None and not agent._results_sent and not agent._pending
    assert list(agent.outbox) == [("t-1", 1)]  # sent again after the next register
    del waiting  # the last reference: an unretrieved exception would be reported now
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []


class _ManualTimers:
    """A loop's clock and timers under the test's control (futures come from the running loop)."""

    class Timer:
        def __init__(self, when: float, callback, args: tuple) -> None:
            self.when, self.callback, self.args, self.done = when, callback, args, False

        def cancel(self) -> None:
            self.done = True

        def cancelled(self) -> bool:
            return self.done

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_ManualTimers.Timer] = []

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def call_later(self, delay: float, callback, *args):
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when: float, callback, *args):
        timer = self.Timer(when, callback, args)
        self.timers.append(timer)
        return timer

    def live(self) -> list[float]:
        return [t.when for t in self.timers if not t.done]

    def advance_to(self, now: float) -> None:
        self.now = now
        for timer in [t for t in self.timers if not t.done and t.when <= now]:
            timer.done = True
            timer.callback(*timer.args)


async def test_one_timer_gives_up_on_unanswered_results_oldest_first(tmp_path: Path) -> None:
    """Results in flight share one timer, due at the oldest one's deadline: at each deadline the results
    unanswered for REQUEST_TIMEOUT_S are given up on (kept in the outbox), an answered one is not, and the
    timer waits for the next oldest. The clock is the test's; nothing sleeps."""
    from retire_cluster.protocol.messages import Message
    from retire_cluster.worker.agent import REQUEST_TIMEOUT_S

    timers = _ManualTimers()
    agent = Agent(WorkerConfig(device_id="x", data_dir=tmp_path))
    agent._writer = RecordingWriter(loop=timers)  # type: ignore[arg-type,assignment]
    agent.registered.set()
    sent: dict[str, str] = {}  # task id -> message id of its result

    def run_echo(task_id: str, at: float) -> None:
        timers.now = at
        agent._on_message(Message("task_assign", f"m-{task_id}", "main-node", {"task": {
            "task_id": task_id, "attempt": 1, "task_type": "echo", "payload": {"message": "hi"}, "timeout": 10}}))
        sent[task_id] = next(mid for mid, (key, _due) in agent._results_sent.items() if key[0] == task_id)

    run_echo("t-1", 0.0)
    run_echo("t-2", 10.0)
    run_echo("t-3", 20.0)
    assert timers.live() == [REQUEST_TIMEOUT_S]  # one timer for three results
    futures = {task_id: agent._pending[mid] for task_id, mid in sent.items()}
    timers.now = 15.0
    agent._on_message(Message("ack", "a-2", "main-node", {"original_message_id": sent["t-2"],
                                                          "result": {"task_id": "t-2", "status": "completed"}}))
    assert ("t-2", 1) not in agent.outbox

    timers.advance_to(REQUEST_TIMEOUT_S)  # t-1's deadline
    assert isinstance(futures["t-1"].exception(), asyncio.TimeoutError)
    assert not futures["t-3"].done()
    assert list(agent._results_sent) == [sent["t-3"]]
    assert timers.live() == [20.0 + REQUEST_TIMEOUT_S]  # t-2 was answered: next due is t-3's

    timers.advance_to(20.0 + REQUEST_TIMEOUT_S)
    assert isinstance(futures["t-3"].exception(), asyncio.TimeoutError)
    assert not agent._results_sent and not agent._pending and agent._results_timer is None
    assert timers.live() == []
    assert sorted(agent.outbox) == [("t-1", 1), ("t-3", 1)]  # sent again after the next register
