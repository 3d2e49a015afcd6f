"""The circuit breaker counts the device's failures, not the task's own (retire_cluster/main/health.py).

Before, every ``failed`` or ``timeout`` result counted: five typos in a row in
python_eval rested the only worker for 60 s, and every later task waited. The
node tests play the worker with raw JSON frames (time from a FakeClock); the
executor tests run the real worker's executor, so that the texts the main node
reads (health.DEVICE_ERRORS) stay those the worker writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from conftest import FakeClock, Peer, fake_worker, settle

from retire_cluster.main import MainNode
from retire_cluster.main.health import device_at_fault
from retire_cluster.protocol.messages import TaskStatus
from retire_cluster.worker import executor as executor_module
from retire_cluster.worker.executor import Executor, Outcome


async def submit(client: Peer, task_type: str = "echo", **task: Any) -> str:
    spec: Dict[str, Any] = {"task_type": task_type, "payload": task.pop("payload", {"message": "hi"}), **task}
    return str((await client.ok("task_submit", {"task": spec}))["task_id"])


async def take_assignment(worker: Peer) -> Dict[str, Any]:
    """The next task_assign, accepted (the task is then running)."""
    push = await worker.next_push("task_assign")
    reply = {"original_message_id": push["message_id"], "result": {}}
    await worker.send_raw(json.dumps({"message_type": "ack", "message_id": f"a-{push['message_id']}",
                                      "sender_id": worker.sender_id, "data": reply}).encode() + b"\n")
    return dict(push["data"]["task"])


async def report(worker: Peer, task: Dict[str, Any], status: str, result: Dict[str, Any]) -> Dict[str, Any]:
    reply = await worker.request("task_result", {
        "task_id": task["task_id"], "attempt": task["attempt"], "status": status, "execution_time": 0.01,
        "result": result,
    })
    assert reply["message_type"] == "ack", reply
    return reply


TYPES = ["command", "echo", "python_eval", "sleep"]

# What our worker sends (retire_cluster/worker/executor.py), by case.
RAISED = {"output": None, "exit_code": 1, "error": "NameError: name 'sum_' is not defined", "truncated": False,
          "metrics": {}}
NON_ZERO = {"output": "", "exit_code": 3, "stderr": "", "error": "exit code 3", "truncated": False, "metrics": {}}
BAD_PAYLOAD = {"output": None, "exit_code": None, "truncated": False, "metrics": {},
               "error": "python_eval needs payload.expression, a Python expression as a string"}
CANNOT_START = {"output": None, "exit_code": None, "truncated": False, "metrics": {},
                "error": "cannot start the task process: [Errno 12] Cannot allocate memory"}
TIMED_OUT = {"output": "", "exit_code": None, "truncated": False, "metrics": {},
             "error": "stopped after the task timeout of 5 s"}


@pytest.mark.parametrize(("status", "result"), [
    ("failed", RAISED), ("failed", NON_ZERO), ("failed", BAD_PAYLOAD), ("timeout", TIMED_OUT),
], ids=["expression-raised", "command-exit-3", "invalid-payload", "reported-timeout"])
async def test_the_tasks_own_failures_do_not_rest_the_only_worker(
    node: MainNode, status: str, result: Dict[str, Any]
) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1, task_types=TYPES)
    for _ in range(node.config.breaker_failures + 2):
        await submit(client, "python_eval", payload={"expression": "sum_(range(3))"})
        await report(worker, await take_assignment(worker), status, result)
    device = node.registry.get("dev-1")
    assert (device.breaker.state, device.breaker.consecutive_failures) == ("closed", 0)
    assert device.stats.failures == node.config.breaker_failures + 2  # still in its statistics
    good = await submit(client, payload={"message": "next"})
    task = await take_assignment(worker)  # before: pending for breaker_reset_s
    assert task["task_id"] == good


async def test_the_devices_own_failures_still_open_the_breaker(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1, task_types=TYPES)
    for _ in range(node.config.breaker_failures):
        await submit(client, "command", payload={"argv": ["true"]})
        await report(worker, await take_assignment(worker), "failed", CANNOT_START)
    assert node.registry.get("dev-1").breaker.state == "open"
    parked = await submit(client)
    await settle(node)
    assert node.lookup(parked).status is TaskStatus.PENDING


async def test_a_typo_between_device_failures_neither_resets_nor_adds(node: MainNode) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1, task_types=TYPES)
    for result in (CANNOT_START, RAISED, CANNOT_START, BAD_PAYLOAD):
        await submit(client)
        await report(worker, await take_assignment(worker), "failed", result)
    assert node.registry.get("dev-1").breaker.consecutive_failures == 2


async def test_an_expired_lease_counts_against_the_device(node: MainNode, clock: FakeClock) -> None:
    """No result by timeout + lease_grace_s: the device, not the task (a worker reports its timeouts)."""
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1, task_types=TYPES)
    for _ in range(node.config.breaker_failures):
        task_id = await submit(client, timeout=10)
        await take_assignment(worker)
        node.tick(clock.advance(10 + node.config.lease_grace_s + 1))
        await settle(node)
        assert node.lookup(task_id).status is TaskStatus.TIMEOUT
        assert [a.outcome for a in node.lookup(task_id).attempts] == ["timeout"]
    assert node.registry.get("dev-1").breaker.state == "open"


async def test_a_half_open_trial_that_fails_on_its_own_lets_the_next_trial_go(
    node: MainNode, clock: FakeClock
) -> None:
    client = await Peer.connect(node)
    worker = await fake_worker(node, cores=1, task_types=TYPES)
    for _ in range(node.config.breaker_failures):
        await submit(client)
        await report(worker, await take_assignment(worker), "failed", CANNOT_START)
    breaker = node.registry.get("dev-1").breaker
    assert breaker.state == "open"
    await submit(client, "python_eval", payload={"expression": "1/0"})
    await submit(client, payload={"message": "second"})
    node.tick(clock.advance(node.config.breaker_reset_s + 1))
    trial = await take_assignment(worker)
    assert breaker.state == "half_open"
    await report(worker, trial, "failed", RAISED)  # before: open again, for another breaker_reset_s
    assert breaker.state == "half_open"  # the trial ended without a verdict: the next task is the trial
    second = await take_assignment(worker)
    assert second["payload"] == {"message": "second"}
    await report(worker, second, "completed", {"output": "second", "exit_code": 0})
    assert breaker.state == "closed"


# -- the rule, on what the real worker reports ----------------------------------------------------


async def outcome_of(executor: Executor, task_type: str, payload: Dict[str, Any]) -> Outcome:
    return await executor.run({"task_type": task_type, "payload": payload, "timeout": 30}, lambda p, m: None)


def blamed(outcome: Outcome) -> bool:
    return device_at_fault(outcome.status, outcome.result())


CODE = frozenset({"python_eval", "command", "echo", "sleep"})


@pytest.mark.parametrize(("task_type", "payload"), [
    ("python_eval", {"expression": "1/0"}),
    ("python_eval", {"expression": "sum_(range(3))"}),
    ("python_eval", {"expression": "(("}),
    ("python_eval", {"expression": ""}),
    ("python_eval", {}),
    ("command", {"argv": "ls -l"}),
    ("command", {"argv": ["python3-typo-no-such-program"]}),
    ("command", {"argv": ["sh", "-c", "exit 3"]}),
    ("sleep", {"seconds": -1}),
], ids=["zero-division", "name-error", "syntax-error", "empty-expression", "no-expression", "argv-string",
        "no-such-program", "exit-3", "negative-sleep"])
async def test_what_the_worker_reports_for_a_bad_task_is_the_tasks_doing(
    tmp_path: Path, task_type: str, payload: Dict[str, Any]
) -> None:
    outcome = await outcome_of(Executor(CODE, scratch_base=tmp_path), task_type, payload)
    assert outcome.status == "failed", outcome
    assert not blamed(outcome), outcome.result()
    assert outcome.result()["fault"] == "task"


async def test_what_the_worker_reports_when_it_cannot_run_a_task_is_the_devices_doing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    no_scratch = await outcome_of(Executor(CODE, scratch_base=not_a_dir), "command", {"argv": ["true"]})
    not_enabled = await outcome_of(Executor(frozenset(), scratch_base=tmp_path), "command", {"argv": ["true"]})

    async def no_fork(*args: Any, **kwargs: Any) -> Any:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(executor_module, "run_child", no_fork)
    no_process = await outcome_of(Executor(CODE, scratch_base=tmp_path), "python_eval", {"expression": "1"})
    for outcome in (no_scratch, not_enabled, no_process):
        assert outcome.status == "failed" and blamed(outcome), outcome.result()
        assert outcome.result()["fault"] == "device"  # said outright, not read from the wording


async def test_a_python_eval_sandbox_that_dies_before_evaluating_is_the_devices_doing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This device's Python cannot set up the sandbox: it ends, without a signal, before the expression runs."""
    monkeypatch.setattr(executor_module, "eval_argv",
                        lambda limits, timeout_s: [sys.executable, "-c", "import os; os._exit(3)"])
    outcome = await outcome_of(Executor(CODE, scratch_base=tmp_path), "python_eval", {"expression": "1"})
    assert outcome.status == "failed" and outcome.exit_code is None, outcome.result()
    assert blamed(outcome) and outcome.result()["fault"] == "device"


async def test_a_python_eval_expression_that_ends_its_own_process_is_the_tasks_doing(tmp_path: Path) -> None:
    outcome = await outcome_of(Executor(CODE, scratch_base=tmp_path), "python_eval",
                               {"expression": "__import__('os')._exit(3)"})
    assert outcome.status == "failed" and outcome.exit_code is None, outcome.result()
    assert not blamed(outcome) and outcome.result()["fault"] == "task"


async def test_a_python_eval_sandbox_killed_by_a_signal_is_the_tasks_doing(tmp_path: Path) -> None:
    """A signal is how the task's own limits (memory, CPU) end it, or the expression's own doing."""
    outcome = await outcome_of(Executor(CODE, scratch_base=tmp_path), "python_eval",
                               {"expression": "__import__('os').kill(__import__('os').getpid(), 9)"})
    assert outcome.status == "failed" and "SIGKILL" in (outcome.error or ""), outcome.result()
    assert not blamed(outcome) and outcome.result()["fault"] == "task"


@pytest.mark.parametrize(("status", "result", "counts"), [
    ("completed", {"exit_code": 0}, False),
    ("cancelled", None, False),
    ("timeout", {"exit_code": None, "error": "stopped after the task timeout of 5 s"}, False),
    ("failed", {"exit_code": 0, "output": "ok"}, True),  # the task succeeded and the worker failed anyway
    ("failed", {"exit_code": -9, "error": "exit code -9 (killed by SIGKILL)"}, False),
    ("failed", {"exit_code": True}, False),  # not an exit code
    ("failed", {"exit_code": None, "error": "worker error: KeyError: 'x'"}, True),
    ("failed", {"exit_code": None, "error": "my plug-in says the payload has no url"}, False),
    ("failed", {}, False),
    ("failed", None, False),
    # A worker that says whose fault it was is believed over the wording.
    ("failed", {"exit_code": 1, "error": "exit code 1", "fault": "device"}, True),
    ("failed", {"exit_code": None, "error": "cannot start the task process: x", "fault": "task"}, False),
    ("failed", {"exit_code": None, "error": "my plug-in lost its GPU", "fault": "device"}, True),
    ("failed", {"exit_code": None, "error": "worker error: KeyError: 'x'", "fault": "nonsense"}, True),
])
def test_device_at_fault(status: str, result: Optional[Dict[str, Any]], counts: bool) -> None:
    assert device_at_fault(status, result) is counts
