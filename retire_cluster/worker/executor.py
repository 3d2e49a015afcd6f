"""Running one task: the built-in task types, plug-ins, and the result.

``echo`` and ``sleep`` run in the worker. ``python_eval`` and ``command`` run
code in a child process with resource limits, in its own session and a
scratch directory, with a minimal environment (the cluster token is never
passed on); :mod:`.sandbox` and :mod:`.trampoline` explain how. Plug-in types come from
:mod:`.plugins`. Every run ends in an :class:`Outcome`, whose ``result()`` is
what DESIGN.md asks: ``output`` text, ``exit_code``, ``stderr``,
``truncated`` and ``metrics`` (plus ``error`` when it did not complete), each
text capped so the ``task_result`` frame stays small.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Set

from ..protocol.codec import dumps, loads
from .plugins import TaskContext, load_plugins, plugin_result
from .sandbox import (
    DRAIN_S,
    REAP_S,
    ChildResult,
    child_env,
    default_scratch_base,
    describe_exit,
    make_scratch_dir,
    remove_scratch_dir,
    run_child,
)
from .trampoline import STARTED, Limits, command_argv, eval_argv

log = logging.getLogger("retire_cluster.worker")

__all__ = ["BUILTIN_TASK_TYPES", "ERROR_LIMIT_BYTES", "DeviceFault", "Executor", "Limits", "Outcome", "TaskFailed",
           "child_env"]

Progress = Callable[[float, str], None]
Runner = Callable[[Dict[str, Any], float, Progress], Awaitable["Outcome"]]

#: The types this module implements; plug-ins cannot take these names.
BUILTIN_TASK_TYPES = frozenset({"echo", "sleep", "python_eval", "command"})
#: The most of an error text kept, in UTF-8 bytes: it is a sentence, not a log.
ERROR_LIMIT_BYTES = 4096
DEFAULT_TIMEOUT_S = 3600.0
#: How long after its timeout a task's child may take to be killed, drained and reaped.
CHILD_GRACE_S = DRAIN_S + REAP_S + 1.0


class TaskFailed(Exception):
    """The task ran and failed; ``str(exc)`` is the error text for the result."""

    #: ``result.fault``: None (the task's own doing: "task"), or "device" (see DeviceFault)
    fault: Optional[str] = None


class DeviceFault(TaskFailed):
    """This device could not run the task at all (no process, no scratch space, no such type).

    Its result says ``"fault": "device"``, so it counts against the device's
    circuit breaker on the main node; a task's own failure does not.
    """

    fault = "device"


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
    #: "device" when this device could not run the task (its circuit breaker counts it)
    fault: Optional[str] = None

    def result(self) -> Dict[str, Any]:
        """The ``task_result.data.result`` object."""
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
        if self.fault is not None:
            out["fault"] = self.fault
        elif self.status == "failed":
            out["fault"] = "task"  # said outright, so the main node need not guess from the wording
        return out


def _timed_out(timeout_s: float, child: ChildResult, *, output: Optional[str] = None,
               stdout: Optional[str] = None) -> "Outcome":
    """A child stopped at the task timeout: what it wrote until then is kept (it shows where it hung)."""
    return Outcome("timeout", output=output, stdout=stdout, error=f"stopped after the task timeout of {timeout_s:g} s",
                   stderr=_non_empty(child.text("stderr")),
                   truncated=child.stdout_truncated or child.stderr_truncated)


def _clip(text: Optional[str], limit: int) -> "tuple[Optional[str], bool]":
    """At most ``limit`` UTF-8 bytes of ``text``, never cutting a character in two."""
    if text is None:
        return None, False
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", errors="ignore"), True


def _clip_error(text: Optional[str]) -> Optional[str]:
    clipped, cut = _clip(text, ERROR_LIMIT_BYTES - 16)
    return clipped + " [truncated]" if cut and clipped is not None else clipped


def _non_empty(text: str) -> Optional[str]:
    return text or None


async def _guarded(awaitable: Awaitable[Any]) -> "tuple[Any, Optional[BaseException]]":
    """Await a plug-in's ``run``; what it raises, SystemExit included, comes back as a value.

    (A Task whose coroutine raises SystemExit or KeyboardInterrupt re-raises it
    out of the event loop: one plug-in calling sys.exit() stopped the worker.)
    """
    try:
        return await awaitable, None
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # a plug-in's SystemExit is its task's failure, not the worker's end
        return None, exc


def _from_thread(report: Callable[[float, str], None]) -> Callable[[float, str], None]:
    """``report`` made callable from a plug-in's thread: the call is passed to the worker's loop."""
    loop = asyncio.get_running_loop()

    def call(percent: float, message: str) -> None:
        try:
            loop.call_soon_threadsafe(report, percent, message)
        except RuntimeError:  # the worker's loop is closed
            pass

    return call


async def _await_plugin(name: str, awaitable: Awaitable[Any]) -> Any:
    """The value of a plug-in's ``run``, awaited in a Task of its own.

    So a CancelledError is told apart: the task's cancellation (a cancel, the
    timeout, eviction, the worker stopping) cancels the inner Task and is
    raised on; one the plug-in raised by itself while nobody cancelled it
    (a sub-task of its own cancelled and awaited) is the task's failure. Both
    used to end the task "cancelled", which the main node takes for a hand-back
    (no retry used) and assigned again at once: to this device, for ever.

    Raises:
        TaskFailed: the plug-in raised (its message), or cancelled itself.
        asyncio.CancelledError: the task was cancelled (the plug-in has been cancelled and awaited).
    """
    inner = asyncio.ensure_future(_guarded(awaitable))
    try:
        await asyncio.wait({inner})
    except asyncio.CancelledError:
        inner.cancel()
        await asyncio.wait({inner})  # as a plain await did: the plug-in's own clean-up runs first
        raise
    if inner.cancelled():
        raise TaskFailed(f"plug-in {name!r} raised CancelledError while the task was not cancelled")
    value, error = inner.result()
    if error is not None:
        raise _plugin_failed(name, error)
    return value


def _plugin_failed(name: str, exc: BaseException) -> TaskFailed:
    """The task's failure for what a plug-in raised: its message (its type when it has none)."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # "3" alone would say nothing
        return TaskFailed(f"plug-in {name!r} raised {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
    return TaskFailed(str(exc) or type(exc).__name__)


class Executor:
    """Runs tasks of the types this worker offers.

    Args:
        allowed: the built-in task types enabled on this worker (plug-ins are
            enabled by being installed).
        output_limit_bytes: cap on output, stdout and stderr, each, in UTF-8 bytes.
        clock: monotonic seconds, for execution_time.
        limits: resource limits for python_eval and command processes.
        python_eval_timeout_s: cap on a python_eval's time, whatever the task asks.
        scratch_base: where per-task scratch directories go; None means
            ``<tmp>/retire-cluster-<uid>``.
        plugins: {task type: plug-in object}; None means the installed ones
            (the ``retire_cluster.task_types`` entry points).
    """

    def __init__(self, allowed: "frozenset[str]", *, output_limit_bytes: int = 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic, limits: Limits = Limits(),
                 python_eval_timeout_s: Optional[float] = None, scratch_base: Optional[Path] = None,
                 plugins: Optional[Mapping[str, Any]] = None) -> None:
        self.allowed = allowed
        self.output_limit_bytes = output_limit_bytes
        self.clock = clock
        self.limits = limits
        self.python_eval_timeout_s = python_eval_timeout_s
        self.scratch_base = Path(scratch_base) if scratch_base is not None else default_scratch_base()
        found = load_plugins(BUILTIN_TASK_TYPES) if plugins is None else plugins
        self.plugins: Dict[str, Any] = {k: v for k, v in found.items() if k not in BUILTIN_TASK_TYPES}
        self._types: Dict[str, Runner] = {
            "echo": self._echo,
            "sleep": self._sleep,
            "python_eval": self._python_eval,
            "command": self._command,
        }
        for name, plugin in self.plugins.items():
            self._types[name] = partial(self._plugin, name, plugin)
        self._pids: Set[int] = set()
        #: plug-in threads still running after their task ended (a synchronous run cannot be stopped)
        self._lingering: Set[threading.Thread] = set()

    @property
    def lingering(self) -> int:
        """Synchronous plug-in runs still going after their task ended: each keeps a task slot."""
        return len(self._lingering)

    def child_pids(self) -> "list[int]":
        """Process ids of the task processes running now (for the owner-CPU reading)."""
        return sorted(self._pids)

    @property
    def task_types(self) -> "list[str]":
        """What this worker advertises at register: enabled built-ins and plug-ins."""
        return sorted(t for t in self._types if self.can_run(t))

    def can_run(self, task_type: str) -> bool:
        """True for an enabled built-in or an installed plug-in; the agent refuses the rest."""
        return task_type in self._types and (task_type in self.allowed or task_type in self.plugins)

    def _timeout_s(self, task: Dict[str, Any]) -> float:
        """The task's timeout (DESIGN.md default 3600 s), python_eval's capped by the owner's limit."""
        timeout_s = task.get("timeout") or DEFAULT_TIMEOUT_S
        if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s):
            timeout_s = DEFAULT_TIMEOUT_S
        if task.get("task_type") == "python_eval" and self.python_eval_timeout_s is not None:
            timeout_s = min(timeout_s, self.python_eval_timeout_s)
        return float(timeout_s)

    async def run(self, task: Dict[str, Any], progress: Progress) -> Outcome:
        """Run ``task`` (``task_assign.data.task``) to its end.

        Returns an :class:`Outcome`; a cancelled run raises CancelledError
        after the task's processes are gone.
        """
        task_type = str(task.get("task_type"))
        if self.instant(task):
            return self.run_instant(task)
        timeout_s = self._timeout_s(task)
        started = self.clock()
        runner = self._types.get(task_type) if self.can_run(task_type) else None
        try:
            if runner is None:
                raise DeviceFault(f"task type {task_type!r} is not enabled on this worker")
            # A child process is stopped at timeout_s by run_child itself, keeping what it wrote;
            # this deadline is then only a backstop, after the time to kill and reap it.
            backstop = timeout_s + (CHILD_GRACE_S if task_type in ("python_eval", "command") else 0.0)
            outcome = await asyncio.wait_for(runner(task.get("payload") or {}, timeout_s, progress), backstop)
        except asyncio.TimeoutError:
            outcome = Outcome("timeout", error=f"stopped after the task timeout of {timeout_s:g} s")
        except TaskFailed as exc:
            outcome = Outcome("failed", error=str(exc), fault=exc.fault)
        return self._ended(outcome, started)

    def instant(self, task: Dict[str, Any]) -> bool:
        """True when ``task`` is answered at once (echo): no Task, timer or process of its own."""
        task_type = str(task.get("task_type"))
        return self._types.get(task_type) == self._echo and self.can_run(task_type)

    def run_instant(self, task: Dict[str, Any]) -> Outcome:
        """Run an :meth:`instant` task here and now (a no-op task's cost is all overhead)."""
        started = self.clock()
        return self._ended(self._echo_now(task.get("payload") or {}), started)

    def _ended(self, outcome: Outcome, started: float) -> Outcome:
        outcome.execution_time_s = round(self.clock() - started, 6)
        outcome.output, cut_out = _clip(outcome.output, self.output_limit_bytes)
        outcome.stderr, cut_err = _clip(outcome.stderr, self.output_limit_bytes)
        outcome.stdout, cut_std = _clip(outcome.stdout, self.output_limit_bytes)
        outcome.truncated = outcome.truncated or cut_out or cut_err or cut_std
        outcome.error = _clip_error(outcome.error)
        return outcome

    # -- in the worker --------------------------------------------------------------

    async def _echo(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        return self._echo_now(payload)

    @staticmethod
    def _echo_now(payload: Dict[str, Any]) -> Outcome:
        message = payload.get("message", "")
        return Outcome("completed", output=message if isinstance(message, str) else dumps(message).decode(), exit_code=0)

    async def _sleep(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        seconds = payload.get("seconds", 1)
        if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                or not math.isfinite(seconds) or seconds < 0):
            raise TaskFailed("sleep needs payload.seconds, a finite number of seconds >= 0")
        step = 1.0 if seconds > 2 else float(seconds)
        done = 0.0
        while done < seconds:
            chunk = min(step, seconds - done)
            await asyncio.sleep(chunk)
            done += chunk
            if done < seconds:
                progress(round(100.0 * done / seconds, 1), f"slept {done:g} of {seconds:g} s")
        return Outcome("completed", output=f"slept {seconds:g} s", exit_code=0)

    async def _plugin(self, name: str, plugin: Any, payload: Dict[str, Any], timeout_s: float,
                      progress: Progress) -> Outcome:
        running = True  # a plain run's thread may report after its task ended: that is dropped

        def report(percent: float, message: str) -> None:  # a plug-in's arguments go on the wire
            if not running:
                return
            try:
                progress(max(0.0, min(100.0, float(percent))), str(message))
            except (TypeError, ValueError):
                pass

        scratch = self._scratch_dir()
        try:
            try:
                if inspect.iscoroutinefunction(plugin.run):
                    value = plugin.run(payload, TaskContext(report, timeout_s, scratch))
                else:  # a plain function may block: it runs in a thread, the worker's loop goes on
                    value = await self._in_thread(name, plugin.run, payload,
                                                  TaskContext(_from_thread(report), timeout_s, scratch))
                if inspect.isawaitable(value):
                    value = await _await_plugin(name, value)
                checked = plugin_result(value, name)
            except (TaskFailed, asyncio.CancelledError):  # (a CancelledError here is ours: see _await_plugin)
                raise
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # the plug-in's error is the task's error
                raise _plugin_failed(name, exc) from None
        finally:
            running = False
            await remove_scratch_dir(scratch)
        failed = checked.exit_code != 0
        return Outcome("failed" if failed else "completed", output=checked.output, exit_code=checked.exit_code,
                       stderr=checked.stderr, metrics=checked.metrics or {},
                       error=describe_exit(checked.exit_code) if failed else None)

    async def _in_thread(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread of its own; its value, or TaskFailed for what it raised.

        A cancellation (the task's timeout, a cancel, the worker stopping)
        ends the wait at once, but Python cannot stop a thread: it runs on,
        counted in :attr:`lingering` (so its slot stays taken) until it returns.
        """
        loop = asyncio.get_running_loop()
        done: "asyncio.Future[tuple[Any, Optional[BaseException]]]" = loop.create_future()

        def work() -> None:
            try:
                outcome: "tuple[Any, Optional[BaseException]]" = (fn(*args), None)
            except BaseException as exc:  # noqa: B036 - SystemExit in a plug-in fails its task only
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(ended, outcome)
            except RuntimeError:  # the worker's loop is closed: it stopped, nobody waits
                pass

        def ended(outcome: "tuple[Any, Optional[BaseException]]") -> None:  # on the loop
            self._lingering.discard(thread)
            if not done.done():
                done.set_result(outcome)

        thread = threading.Thread(target=work, name=f"plug-in {name}", daemon=True)
        thread.start()
        try:
            value, error = await asyncio.shield(done)
        except asyncio.CancelledError:
            if thread.is_alive():
                self._lingering.add(thread)
                log.warning("plug-in %r is still running after its task ended; a synchronous run cannot be "
                            "stopped, so its thread keeps a task slot until it returns", name)
            raise
        if error is not None:
            raise _plugin_failed(name, error)
        return value

    # -- in a child process ----------------------------------------------------------

    def _scratch_dir(self) -> Path:
        try:
            return make_scratch_dir(self.scratch_base)
        except OSError as exc:
            raise DeviceFault(f"cannot create a scratch directory under {self.scratch_base}: {exc}") from None

    async def _run_child(self, argv: "list[str]", scratch: Path, stdin: Optional[bytes], timeout_s: float,
                         reply_limit_bytes: Optional[int] = None) -> ChildResult:
        try:
            return await run_child(argv, cwd=scratch, env=child_env(scratch), stdin=stdin,
                                   output_limit_bytes=self.output_limit_bytes,
                                   reply_limit_bytes=reply_limit_bytes, pids=self._pids, timeout_s=timeout_s)
        except OSError as exc:
            raise DeviceFault(f"cannot start the task process: {exc}") from None

    async def _command(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        argv = payload.get("argv")
        if (not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv)
                or not argv[0]):
            raise TaskFailed("command needs payload.argv, a non-empty list of strings (it is run without a shell)")
        stdin = payload.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise TaskFailed("command payload.stdin must be a string when given")
        scratch = self._scratch_dir()
        try:
            child = await self._run_child(command_argv(argv, self.limits, timeout_s), scratch,
                                          None if stdin is None else stdin.encode("utf-8"), timeout_s)
        finally:
            await remove_scratch_dir(scratch, leftovers=True)
        if child.timed_out:
            return _timed_out(timeout_s, child, output=child.text("stdout"))
        code = child.returncode
        stderr = child.text("stderr")
        error = None
        if code != 0:
            error = describe_exit(code)
            if code in (126, 127) and stderr.startswith("retire-cluster: cannot run"):
                error += ": " + stderr[len("retire-cluster: "):].strip()
        return Outcome("completed" if code == 0 else "failed", output=child.text("stdout"), exit_code=code,
                       stderr=stderr, error=error, truncated=child.stdout_truncated or child.stderr_truncated)

    async def _python_eval(self, payload: Dict[str, Any], timeout_s: float, progress: Progress) -> Outcome:
        expression = payload.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise TaskFailed("python_eval needs payload.expression, a Python expression as a string")
        request = dumps({"expression": expression, "limit": self.output_limit_bytes,
                         "error_limit": ERROR_LIMIT_BYTES})
        scratch = self._scratch_dir()
        try:
            child = await self._run_child(eval_argv(self.limits, timeout_s), scratch, request, timeout_s,
                                          reply_limit_bytes=4 * (self.output_limit_bytes + ERROR_LIMIT_BYTES) + len(STARTED))
        finally:
            await remove_scratch_dir(scratch, leftovers=True)
        if child.timed_out:
            return _timed_out(timeout_s, child, stdout=_non_empty(child.text("stdout")))
        stderr = _non_empty(child.text("stderr"))
        stdout = _non_empty(child.text("stdout"))
        truncated = child.stdout_truncated or child.stderr_truncated
        answer = child.reply or b""
        started = answer.startswith(STARTED)
        if started:
            answer = answer[len(STARTED):]
        try:
            reply = loads(answer) if answer and not child.reply_truncated else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            # Killed by a signal (the task's own limits, memory or CPU, or its own doing), or
            # ended while evaluating (os._exit): the task failed. Ended before it got that far
            # without a signal: this device's Python could not run the sandbox.
            own = started or (child.returncode is not None and child.returncode < 0)
            died = TaskFailed if own else DeviceFault
            raise died(
                f"python_eval child ended with {describe_exit(child.returncode)} and no result"
                + (f": {stderr.strip()[-500:]}" if stderr else "")
            )
        if reply.get("ok"):
            return Outcome("completed", output=str(reply.get("output")), exit_code=0, stderr=stderr,
                           stdout=stdout, truncated=truncated or bool(reply.get("truncated")))
        return Outcome("failed", exit_code=1, error=str(reply.get("error")), stderr=stderr, stdout=stdout,
                       truncated=truncated)
