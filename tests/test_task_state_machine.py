"""A hypothesis state machine over the main node's task semantics.

Rules drive a real MainNode (real store in a temp dir, fake clock, in-memory
connections) through submit, assign, accept, result, duplicate result, stale
and forged results, device loss, reconnects, cancel and timeout. After every
step the invariants of DESIGN.md must hold: each task in exactly one state and
held by at most one device; at most one recorded result; attempts only grow;
terminal states stay terminal.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from conftest import FakeClock, make_config, register_data
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from retire_cluster.main import MainNode
from retire_cluster.protocol.codec import loads
from retire_cluster.protocol.messages import ACTIVE_STATUSES, TERMINAL_STATUSES, Message, error_reply

DEVICES = ["d1", "d2", "d3"]


class FakeConn:
    """What MainNode needs of a connection, recording what it is sent."""

    def __init__(self, name: str) -> None:
        self.peer = name
        self.authenticated = True
        self.device_id: Optional[str] = None
        self.closed = False
        self.subscribed_all = False
        self.subscribed: set = set()
        self.pending_assigns: Dict[str, Any] = {}
        self.received: List[Dict[str, Any]] = []

    def send(self, message: Message) -> None:
        if not self.closed:
            self.received.append(message.to_wire())

    def send_bytes(self, frame: bytes) -> None:
        if not self.closed:
            self.received.append(loads(frame))

    send_now = send_bytes  # a reply that waited for a commit (written at once on a real connection)

    def send_error(self, message_id: Optional[str], exc: Any) -> None:  # the farewell when the node stops
        self.send(error_reply(message_id, exc.code, exc.message))
    send_lazy = send_bytes  # the ack of a result (with the next frame, on a real connection)

    def close(self) -> None:
        self.closed = True

    def stop_reading(self) -> None:  # the node is stopping: nothing is read from a fake anyway
        pass


class TaskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="rc-sm-"))
        self.clock = FakeClock()
        self.node = MainNode(make_config(self.dir, offline_timeout_s=300), clock=self.clock, run_monitor=False)
        self.loop.run_until_complete(self.node.start())
        self.client = FakeConn("client")
        self.conns: Dict[str, FakeConn] = {}
        self.n = 0
        self.task_ids: List[str] = []
        self.results: Dict[str, Any] = {}  # first recorded result per task
        self.terminal: Dict[str, str] = {}
        self.max_attempt: Dict[str, int] = {}
        self.sent_results: List[Dict[str, Any]] = []

    def teardown(self) -> None:
        self.loop.run_until_complete(self.node.stop())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- plumbing ---------------------------------------------------------

    def settle(self, action: Any = None) -> None:
        """Run ``action`` (a callable) on the loop, then let callbacks and commits finish."""

        async def go() -> None:
            if action is not None:
                action()
            for _ in range(4):
                await asyncio.sleep(0)
                await self.node.store.flush()

        self.loop.run_until_complete(go())

    def send(self, conn: FakeConn, message_type: str, data: Dict[str, Any], sender: str) -> Dict[str, Any]:
        self.n += 1
        mid = f"m{self.n}"
        self.settle(lambda: self.node.dispatch(conn, Message(message_type, mid, sender, data)))
        for msg in conn.received:
            if msg["message_type"] in ("ack", "error") and msg["data"].get("original_message_id") == mid:
                return msg
        raise AssertionError(f"no reply to {message_type}")

    def assignments(self, device: str) -> List[Dict[str, Any]]:
        conn = self.conns.get(device)
        return [m for m in conn.received if m["message_type"] == "task_assign"] if conn else []

    # -- rules ------------------------------------------------------------

    @rule(max_retries=st.integers(0, 2), timeout=st.sampled_from([30, 3600]))
    def submit(self, max_retries: int, timeout: int) -> None:
        reply = self.send(self.client, "task_submit", {"task": {"task_type": "echo", "payload": {},
                                                                 "max_retries": max_retries, "timeout": timeout}},
                          "client")
        assert reply["message_type"] == "ack"
        self.task_ids.append(reply["data"]["result"]["task_id"])

    @rule(device=st.sampled_from(DEVICES), report_running=st.booleans())
    def register(self, device: str, report_running: bool) -> None:
        old = self.conns.get(device)
        running = []
        if report_running and old is not None:
            running = [{"task_id": a["data"]["task"]["task_id"], "attempt": a["data"]["task"]["attempt"]}
                       for a in self.assignments(device)]
        conn = FakeConn(device)
        self.settle(lambda: self.node.connection_made(conn))  # type: ignore[arg-type]
        self.conns[device] = conn
        data = register_data(cores=2, running=running)
        assert self.send(conn, "register", data, device)["message_type"] == "ack"
        if old is not None:
            old.received.extend(m for m in conn.received if m["message_type"] == "task_assign")
            conn.received = [m for m in conn.received if m["message_type"] != "task_assign"] + \
                [m for m in old.received if m["message_type"] == "task_assign"]

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(self.conns)))
        conn = self.conns[device]
        for push in self.assignments(device):
            ack = Message("ack", f"a-{push['message_id']}", device,
                          {"original_message_id": push["message_id"], "result": {}})
            self.settle(lambda ack=ack: self.node.dispatch(conn, ack))  # type: ignore[arg-type]

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), status=st.sampled_from(["completed", "failed", "timeout", "cancelled"]))
    def result(self, data: st.DataObject, status: str) -> None:
        device = data.draw(st.sampled_from(sorted(self.conns)))
        pushes = self.assignments(device)
        if not pushes:
            return
        task = data.draw(st.sampled_from(pushes))["data"]["task"]
        payload = {"task_id": task["task_id"], "attempt": task["attempt"], "status": status,
                   "execution_time": 0.1, "result": {"output": f"{device}-{task['attempt']}", "exit_code": 0}}
        reply = self.send(self.conns[device], "task_result", payload, device)
        assert reply["message_type"] == "ack", reply  # current, stale or duplicate: always acknowledged
        self.sent_results.append({"device": device, "data": payload})

    @precondition(lambda self: self.sent_results)
    @rule(data=st.data())
    def duplicate_result(self, data: st.DataObject) -> None:
        sent = data.draw(st.sampled_from(self.sent_results))
        conn = self.conns.get(sent["device"])
        if conn is None or conn.closed:
            return
        assert self.send(conn, "task_result", sent["data"], sent["device"])["message_type"] == "ack"

    @precondition(lambda self: self.task_ids and self.conns)
    @rule(data=st.data())
    def forged_result(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.task_ids))
        device = data.draw(st.sampled_from(sorted(self.conns)))
        task = self.node.lookup(task_id)
        if task is None or task.ever_held_by(device) or self.conns[device].closed:
            return
        reply = self.send(self.conns[device], "task_result",
                          {"task_id": task_id, "attempt": max(task.attempt, 1), "status": "completed"}, device)
        assert reply["data"]["code"] == "forbidden"

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def lose_device(self, data: st.DataObject) -> None:
        device = data.draw(st.sampled_from(sorted(self.conns)))
        conn = self.conns.pop(device)
        conn.close()
        self.settle(lambda: self.node.connection_lost(conn))  # type: ignore[arg-type]
        self.clock.advance(301)
        for other in self.conns:  # the others stay alive
            self.send(self.conns[other], "heartbeat", {}, other)
        self.settle(lambda: self.node.tick(self.clock()))

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.task_ids))
        was_terminal = self.node.lookup(task_id) is not None and self.node.lookup(task_id).terminal
        reply = self.send(self.client, "task_cancel", {"task_id": task_id}, "client")
        if was_terminal:
            assert reply["data"]["code"] == "conflict"
        else:
            assert reply["message_type"] == "ack"

    @rule(seconds=st.sampled_from([10, 40, 4000]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)
        for device, conn in self.conns.items():  # live devices keep heartbeating
            self.send(conn, "heartbeat", {}, device)
        self.settle(lambda: self.node.tick(self.clock()))

    # -- invariants ---------------------------------------------------------

    @invariant()
    def tasks_are_consistent(self) -> None:
        holders: Dict[str, str] = {}
        for device in self.node.registry:
            for task_id in device.running:
                assert task_id not in holders, f"{task_id} held by two devices"
                holders[task_id] = device.device_id
        for task_id in self.task_ids:
            task = self.node.lookup(task_id)
            assert task is not None
            if task.status in ACTIVE_STATUSES:
                assert holders.get(task_id) == task.assigned_device, (task_id, task.status, holders.get(task_id))
            else:
                assert task_id not in holders
            assert task.attempt >= self.max_attempt.get(task_id, 0), "attempt went down"
            self.max_attempt[task_id] = task.attempt
            if task_id in self.terminal:
                assert task.status.value == self.terminal[task_id], "a terminal state changed"
            elif task.status in TERMINAL_STATUSES:
                self.terminal[task_id] = task.status.value
            if task.result is not None:
                first = self.results.setdefault(task_id, task.result)
                assert task.result == first, "a second result was recorded"
            assert len([a for a in task.attempts if a.outcome == "completed"]) <= 1


TaskMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_task_state_machine = TaskMachine.TestCase
