"""Running one task: the built-in task types and the child process for code.

``python_eval`` runs in a child Python process in its own session (so a
timeout or cancel kills it and everything it started), with a minimal
environment (the cluster token is never passed on) and a time limit. The
result is what DESIGN.md asks: ``output`` text, ``exit_code``, ``stderr``,
``truncated`` and ``metrics``.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, Optional

from ..protocol.codec import dumps, loads

__all__ = ["Executor", "Outcome", "TaskFailed"]

Progress = Callable[[float, str], None]

_EVAL_RUNNER = r"""
import io, json, sys, traceback
request = json.loads(sys.stdin.read())
real_stdout, captured = sys.stdout, io.StringIO()
sys.stdout = captured
try:
    value = eval(compile(request["expression"], "<expression>", "eval"), {"__builtins__": __builtins__}, {})
    reply = {"ok": True, "output": str(value)}
except BaseException as exc:
    reply = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc), "traceback": traceback.format_exc()}
reply["stdout"] = captured.getvalue()
sys.stdout = real_stdout
sys.stdout.write(json.dumps(reply))
"""

_SAFE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TMPDIR", "TERMUX_VERSION", "PREFIX")


class TaskFailed(Exception):
    """The task ran and failed; ``str(exc)`` is the error text for the result."""


@dataclass
class Outcome:
    """How a task ended on this device (the content of ``task_result``)."""

    status: str
    output: Optional[str] = None
    exit_code: Optional[int] = None
    stderr: Optional[str] = None
    stdout: Optional[str] = None
    error: Optional[str] = None
    truncated: bool = False
    execution_time_s: float = 0.0
    metrics: Dict[str, Any] = field(default_factory=dict)

    def result(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "output": self.output,
            "exit_code": self.exit_code,
            "truncated": self.truncated,
            "metrics": self.metrics,
        }
        if self.stderr is not None:
            out["stderr"] = self.stderr
        if self.stdout:
            out["stdout"] = self.stdout
        if self.error is not None:
            out["error"] = self.error
        return out


def _clip(text: Optional[str], limit: int) -> "tuple[Optional[str], bool]":
    if text is None:
        return None, False
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", errors="ignore"), True


def child_env() -> Dict[str, str]:
    """The environment given to task processes: no secrets, only the basics."""
    env = {k: os.environ[k] for k in _SAFE_ENV_KEYS if k in os.environ}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


async def _kill_group(proc: "asyncio.subprocess.Process") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        await proc.wait()
    except Exception:
        pass


class Executor:
    """Runs tasks of the types this worker offers.

    Args:
        allowed: the task types enabled on this worker.
        output_limit_bytes: cap on output (and on stderr), in UTF-8 bytes.
        clock: monotonic seconds, for execution_time.
    """

    def __init__(self, allowed: "frozenset[str]", *, output_limit_bytes: int = 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = allowed
        self.output_limit_bytes = output_limit_bytes
        self.clock = clock
        self._types: Dict[str, Callable[[Dict[str, Any], float, Progress], Awaitable[Outcome]]] = {
            "echo": self._echo,
            "sleep": self._sleep,
            "python_eval": self._python_eval,
        }
        self._pids: "set[int]" = set()

    def child_pids(self) -> "list[int]":
        """Process ids of the task processes running now (for the owner-CPU reading)."""
        return sorted(self._pids)

    @property
    def task_types(self) -> "list[str]":
        return sorted(t for t in self._types if t in self.allowed)

    def can_run(self, task_type: str) -> bool:
        return task_type in self.allowed and task_type in self._types

    async def run(self, task: Dict[str, Any], progress: Progress) -> Outcome:
        """Run ``task`` (``task_assign.data.task``) to its end.

        Returns an :class:`Outcome`; a cancelled run raises CancelledError
        after the task's processes are gone.
        """
        task_type = task["task_type"]
        timeout_s = float(task.get("timeout") or 3600.0)
        started = self.clock()
        runner = self._types[task_type]
        try:
            outcome = await asyncio.wait_for(runner(task.get("payload") or {}, timeout_s, progress), timeout_s)
        except asyncio.TimeoutError:
            outcome = Outcome("timeout", error=f"stopped after the task timeout of {timeout_s:g} s")
        except TaskFailed as exc:
            outcome = Outcome("failed", error=str(exc))
        outcome.execution_time_s = round(self.clock() - started, 6)
        outcome.output, cut_out = _clip(outcome.output, self.output_limit_bytes)
        outcome.stderr, cut_err = _clip(outcome.stderr, self.output_limit_bytes)
        outcome.stdout, cut_std = _clip(outcome.stdout, self.output_limit_bytes)
        outcome.truncated = outcome.truncated or cut_out or cut_err or cut_std
        return outcome

    async def _echo(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        message = payload.get("message", "")
        return Outcome("completed", output=message if isinstance(message, str) else dumps(message).decode(), exit_code=0)

    async def _sleep(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        seconds = payload.get("seconds", 1)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise TaskFailed("sleep needs payload.seconds, a number of seconds >= 0")
        step = 1.0 if seconds > 2 else float(seconds)
        done = 0.0
        while done < seconds:
            chunk = min(step, seconds - done)
            await asyncio.sleep(chunk)
            done += chunk
            if done < seconds:
                progress(round(100.0 * done / seconds, 1), f"slept {done:g} of {seconds:g} s")
        return Outcome("completed", output=f"slept {seconds:g} s", exit_code=0)

    async def _python_eval(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        expression = payload.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise TaskFailed("python_eval needs payload.expression, a Python expression as a string")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _EVAL_RUNNER,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=child_env(), start_new_session=True,
        )  # fmt: skip
        self._pids.add(proc.pid)
        try:
            out, err = await proc.communicate(dumps({"expression": expression}))
        except BaseException:
            await _kill_group(proc)
            raise
        finally:
            self._pids.discard(proc.pid)
        stderr = err.decode("utf-8", errors="replace") or None
        try:
            reply = loads(out) if out else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise TaskFailed(
                f"python_eval child exited with code {proc.returncode} and no result"
                + (f": {stderr.strip()[-500:]}" if stderr else "")
            )
        if reply.get("ok"):
            return Outcome("completed", output=reply.get("output"), exit_code=0,
                           stderr=stderr, stdout=reply.get("stdout") or None)
        return Outcome("failed", output=reply.get("stdout") or None, exit_code=1,
                       error=reply.get("error"), stderr=reply.get("traceback"))
