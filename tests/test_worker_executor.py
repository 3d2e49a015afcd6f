"""The worker's executor: built-in task types, the python_eval child process, limits.

These run real child processes (that is what is under test) but never wait for
a task's own timeout longer than needed: timeouts here are 1-3 s and each such
test says why. Processes the tests cause to exist are found by pid and checked
to be gone (absent, or a zombie waiting for its new parent to reap it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from retire_cluster.worker import executor as executor_module
from retire_cluster.worker.executor import Executor, Outcome

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional for the worker
    psutil = None  # type: ignore[assignment]

ALL_TYPES = frozenset({"echo", "sleep", "python_eval"})
ProgressCalls = List[Tuple[float, str]]

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="checks processes through /proc")


def _no_progress(percent: float, message: str) -> None:
    raise AssertionError(f"unexpected progress {percent} {message!r}")


async def run(
    executor: Executor,
    task_type: str,
    payload: Dict[str, Any],
    *,
    timeout: float = 30.0,
    progress: Callable[[float, str], None] = _no_progress,
) -> Outcome:
    return await executor.run({"task_type": task_type, "payload": payload, "timeout": timeout}, progress)


async def evaluate(
    expression: str, *, timeout: float = 30.0, output_limit_bytes: int = 1024 * 1024
) -> Outcome:
    executor = Executor(ALL_TYPES, output_limit_bytes=output_limit_bytes)
    return await run(executor, "python_eval", {"expression": expression}, timeout=timeout)


# -- process helpers ------------------------------------------------------------


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: absent, or a zombie (dead, not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except OSError:
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X", "x")


async def wait_until(condition: Callable[[], bool], limit_s: float = 5.0) -> bool:
    """Poll ``condition`` every 50 ms for at most ``limit_s``; returns its last value."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        await asyncio.sleep(0.05)
    return True


def read_pids(path: Path) -> Optional[Tuple[int, int]]:
    """The (child, grandchild) pids the expression wrote, once the file is complete."""
    try:
        parts = path.read_text(encoding="utf-8").split()
    except OSError:
        return None
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def pid_file_expression(path: Path, then: str) -> str:
    """An expression that writes its own pid and a `sleep 3600` grandchild's pid, then runs ``then``."""
    return (
        f"(__import__('pathlib').Path({str(path)!r}).write_text("
        "str(__import__('os').getpid()) + ' ' + "
        "str(__import__('subprocess').Popen(['sleep', '3600']).pid)), "
        f"{then})"
    )


def kill_leftovers(pids: Optional[Tuple[int, int]]) -> None:
    """Test hygiene when an assertion failed: the processes this test caused, by pid."""
    for pid in pids or ():
        if not pid_gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- echo ---------------------------------------------------------------------


async def test_echo_returns_the_message() -> None:
    outcome = await run(Executor(frozenset({"echo"})), "echo", {"message": "hello, cluster"})
    assert outcome.status == "completed"
    assert outcome.output == "hello, cluster"
    assert outcome.exit_code == 0
    assert outcome.truncated is False
    assert outcome.result() == {"output": "hello, cluster", "exit_code": 0, "truncated": False, "metrics": {}}


async def test_echo_of_a_non_string_is_its_json() -> None:
    outcome = await run(Executor(frozenset({"echo"})), "echo", {"message": {"a": [1, 2]}})
    assert outcome.status == "completed"
    assert outcome.output == '{"a":[1,2]}'


async def test_echo_without_message_is_empty() -> None:
    outcome = await run(Executor(frozenset({"echo"})), "echo", {})
    assert (outcome.status, outcome.output) == ("completed", "")


# -- sleep --------------------------------------------------------------------


async def test_short_sleep_completes() -> None:
    outcome = await run(Executor(ALL_TYPES), "sleep", {"seconds": 0.05})
    assert outcome.status == "completed"
    assert outcome.exit_code == 0
    assert outcome.output == "slept 0.05 s"


async def test_sleep_zero_completes() -> None:
    outcome = await run(Executor(ALL_TYPES), "sleep", {"seconds": 0})
    assert outcome.status == "completed"


async def test_sleep_reports_progress_and_ends_at_the_task_timeout() -> None:
    # A 3 s sleep reports progress each second; the 1.2 s task timeout stops it after the first report.
    calls: ProgressCalls = []
    outcome = await run(
        Executor(ALL_TYPES), "sleep", {"seconds": 3}, timeout=1.2, progress=lambda p, m: calls.append((p, m))
    )
    assert outcome.status == "timeout"
    assert outcome.output is None
    assert "timeout" in (outcome.error or "")
    assert calls, "no progress was reported"
    percent, message = calls[0]
    assert 0 < percent < 100
    assert message == "slept 1 of 3 s"


@pytest.mark.parametrize("seconds", [-1, -0.5, "2", "soon", True, None, [1]])
async def test_sleep_with_bad_seconds_fails_with_a_clear_error(seconds: Any) -> None:
    outcome = await run(Executor(ALL_TYPES), "sleep", {"seconds": seconds})
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert "payload.seconds" in outcome.error
    assert "number" in outcome.error


# -- python_eval: results -------------------------------------------------------


async def test_python_eval_seed_example() -> None:
    outcome = await evaluate("sum(range(100000))")
    assert outcome.status == "completed"
    assert outcome.output == "4999950000"
    assert outcome.exit_code == 0
    assert outcome.error is None


async def test_python_eval_result_is_str_of_the_value() -> None:
    outcome = await evaluate("{'k': [1, 2.5, None]}")
    assert outcome.output == "{'k': [1, 2.5, None]}"


async def test_python_eval_of_a_huge_integer_is_its_digits() -> None:
    """Python 3.11 refuses str() of an int over 4,300 digits unless told otherwise."""
    outcome = await evaluate("2 ** 100000")
    assert outcome.status == "completed", outcome.error
    assert len(outcome.output) == 30103 and outcome.output.startswith("99900209301438450794")


async def test_python_eval_non_ascii_result() -> None:
    outcome = await evaluate("'héllo ' + chr(0x20AC) + ' ' + chr(0x1F600)")
    assert outcome.status == "completed"
    assert outcome.output == "héllo \u20ac \U0001f600"


async def test_python_eval_exception_fails_naming_it() -> None:
    outcome = await evaluate("1 // 0")
    assert outcome.status == "failed"
    assert "ZeroDivisionError" in (outcome.error or "")
    assert outcome.output is None
    assert outcome.exit_code != 0
    # The traceback starts at the expression (before: a frame of the sandbox's own script first).
    assert outcome.stderr is not None and "<string>" not in outcome.stderr
    assert outcome.stderr.startswith('Traceback (most recent call last):\n  File "<expression>", line 1')
    syntax = await evaluate("import os")
    assert syntax.status == "failed" and syntax.stderr is not None
    assert syntax.stderr.startswith('  File "<expression>", line 1\n    import os\n') and "<string>" not in \
        syntax.stderr


async def test_python_eval_print_does_not_corrupt_the_result() -> None:
    outcome = await evaluate("print('noise', '{not json') or print('more') or 42")
    assert outcome.status == "completed"
    assert outcome.output == "42"
    assert outcome.stdout == "noise {not json\nmore\n"
    assert outcome.result()["stdout"] == "noise {not json\nmore\n"


@pytest.mark.parametrize("expression", ["1 +", "def f(): pass", "x = 1", "import os"])
async def test_python_eval_syntax_error_fails(expression: str) -> None:
    outcome = await evaluate(expression)
    assert outcome.status == "failed"
    assert "SyntaxError" in (outcome.error or "")


@pytest.mark.parametrize("expression", ["", "   ", None, 42])
async def test_python_eval_without_an_expression_fails(expression: Any) -> None:
    outcome = await evaluate(expression)
    assert outcome.status == "failed"
    assert "payload.expression" in (outcome.error or "")


async def test_python_eval_system_exit_is_a_failure_not_a_crash() -> None:
    outcome = await evaluate("__import__('sys').exit(3)")
    assert outcome.status == "failed"
    assert "SystemExit" in (outcome.error or "")


async def test_python_eval_child_dying_without_a_result_fails() -> None:
    outcome = await evaluate("__import__('os')._exit(7)")
    assert outcome.status == "failed"
    assert "no result" in (outcome.error or "")
    assert "7" in (outcome.error or "")
    # The expression ended its own process: the task's fault, not the device's (no breaker count).
    assert outcome.fault is None and outcome.result()["fault"] == "task"


async def test_python_eval_child_that_cannot_start_the_sandbox_is_the_devices_fault(monkeypatch) -> None:
    """A child that ends before it evaluates anything (this device's Python is broken) is a device fault."""
    monkeypatch.setattr(executor_module, "eval_argv",
                        lambda limits, timeout_s: [sys.executable, "-c", "import sys; sys.exit(1)"])
    outcome = await evaluate("1 + 1")
    assert outcome.status == "failed"
    assert "no result" in (outcome.error or "")
    assert outcome.fault == "device"


# -- python_eval: environment ------------------------------------------------


async def test_python_eval_child_does_not_see_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETIRE_CLUSTER_TOKEN", "s3cret")
    monkeypatch.setenv("SOME_API_KEY", "also-secret")
    outcome = await evaluate("__import__('os').environ.get('RETIRE_CLUSTER_TOKEN')")
    assert (outcome.status, outcome.output) == ("completed", "None")
    outcome = await evaluate("sorted(__import__('os').environ)")
    assert outcome.status == "completed"
    assert "RETIRE_CLUSTER_TOKEN" not in (outcome.output or "")
    assert "SOME_API_KEY" not in (outcome.output or "")


# -- python_eval: timeout and cancel kill everything -----------------------------


async def test_python_eval_infinite_loop_ends_timeout() -> None:
    # any() over an endless stream of zeros: CPU-bound forever, without eating memory.
    before = {p.pid for p in psutil.Process().children(recursive=True)} if psutil else set()
    outcome = await evaluate("any(iter(int, 1))", timeout=1)
    assert outcome.status == "timeout"
    assert outcome.output is None
    if psutil is not None:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert left == [], f"child processes left after the timeout: {left}"


@needs_proc
async def test_python_eval_timeout_kills_the_child_and_its_children(tmp_path: Path) -> None:
    # 3 s leaves the child ample time to start and write its pids before the timeout.
    path = tmp_path / "pids"
    pids = None
    try:
        outcome = await evaluate(pid_file_expression(path, "__import__('time').sleep(60)"), timeout=3)
        pids = read_pids(path)
        assert outcome.status == "timeout"
        assert pids is not None, "the expression did not get to write its pids"
        assert await wait_until(lambda: all(pid_gone(p) for p in pids)), (
            f"still running after the timeout: {[p for p in pids if not pid_gone(p)]}"
        )
    finally:
        kill_leftovers(pids or read_pids(path))


@needs_proc
async def test_cancel_kills_the_child_and_its_children(tmp_path: Path) -> None:
    path = tmp_path / "pids"
    executor = Executor(ALL_TYPES)
    job = asyncio.ensure_future(
        run(
            executor,
            "python_eval",
            {
                "expression": pid_file_expression(path, "__import__('time').sleep(60)"),
            },
            timeout=120,
        )
    )
    pids = None
    try:
        assert await wait_until(lambda: read_pids(path) is not None or job.done(), 30.0)
        assert not job.done(), job.result()
        pids = read_pids(path)
        assert pids is not None
        assert not any(pid_gone(p) for p in pids), "the child and grandchild should be running now"
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert pid_gone(pids[0]), "the child outlived the cancel"
        assert await wait_until(lambda: all(pid_gone(p) for p in pids)), (
            f"still running after the cancel: {[p for p in pids if not pid_gone(p)]}"
        )
    finally:
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        kill_leftovers(pids or read_pids(path))


# -- output cap -------------------------------------------------------------------


async def test_output_is_capped_and_marked_truncated() -> None:
    executor = Executor(frozenset({"echo"}), output_limit_bytes=100)
    outcome = await run(executor, "echo", {"message": "x" * 1000})
    assert outcome.status == "completed"
    assert outcome.output is not None
    assert len(outcome.output.encode("utf-8")) <= 100
    assert outcome.output == "x" * 100
    assert outcome.truncated is True
    assert outcome.result()["truncated"] is True


async def test_output_at_the_cap_is_not_truncated() -> None:
    executor = Executor(frozenset({"echo"}), output_limit_bytes=100)
    outcome = await run(executor, "echo", {"message": "x" * 100})
    assert outcome.output == "x" * 100
    assert outcome.truncated is False


@pytest.mark.parametrize("char", ["é", "\u20ac", "\U0001f600"])
async def test_output_cap_never_splits_a_character(char: str) -> None:
    # 101 bytes is not a multiple of 2, 3 or 4: a byte cut would land inside a character.
    executor = Executor(frozenset({"echo"}), output_limit_bytes=101)
    outcome = await run(executor, "echo", {"message": char * 200})
    assert outcome.truncated is True
    assert outcome.output is not None
    size = len(char.encode("utf-8"))
    assert outcome.output == char * (101 // size)
    assert len(outcome.output.encode("utf-8")) <= 101


async def test_python_eval_output_and_stdout_are_capped() -> None:
    outcome = await evaluate("print('p' * 5000) or 'v' * 5000", output_limit_bytes=64)
    assert outcome.status == "completed"
    assert outcome.output == "v" * 64
    assert outcome.stdout is not None and len(outcome.stdout.encode("utf-8")) <= 64
    assert outcome.truncated is True


# -- which types run ---------------------------------------------------------------


def test_python_eval_runs_only_when_allowed() -> None:
    plain = Executor(frozenset({"echo", "sleep"}))
    assert plain.can_run("echo") and plain.can_run("sleep")
    assert not plain.can_run("python_eval")
    assert plain.task_types == ["echo", "sleep"]

    opted_in = Executor(frozenset({"echo", "sleep", "python_eval"}))
    assert opted_in.can_run("python_eval")
    assert opted_in.task_types == ["echo", "python_eval", "sleep"]


def test_unknown_types_never_run() -> None:
    executor = Executor(frozenset({"echo", "no_such_type"}))
    assert not executor.can_run("no_such_type")
    assert not executor.can_run("")
    assert executor.task_types == ["echo"]


def test_command_runs_only_when_allowed() -> None:
    assert not Executor(frozenset({"echo", "sleep"}), plugins={}).can_run("command")
    opted_in = Executor(frozenset({"echo", "command"}), plugins={})
    assert opted_in.can_run("command")
    assert opted_in.task_types == ["command", "echo"]


async def test_a_type_not_enabled_fails_instead_of_running() -> None:
    outcome = await run(Executor(frozenset({"echo"}), plugins={}), "python_eval", {"expression": "1"})
    assert outcome.status == "failed"
    assert "not enabled" in (outcome.error or "")


async def test_a_timed_out_task_keeps_what_it_wrote_until_then() -> None:
    """What a hung task printed is what one needs to see where it hung (before, it was all dropped)."""
    outcome = await evaluate("print('partial', flush=True) or __import__('time').sleep(100)", timeout=1)
    assert outcome.status == "timeout" and outcome.error == "stopped after the task timeout of 1 s"
    assert outcome.stdout == "partial\n" and outcome.output is None
