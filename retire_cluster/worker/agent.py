"""The worker's connection to the main node: register, heartbeat, run what is assigned.

Theory of operation: one persistent TCP connection. After ``register`` the
main node pushes ``task_assign`` and ``task_cancel`` on it; the agent answers
each assignment at once (ack, or error to hand it back), runs accepted tasks
concurrently up to its slots, and sends ``task_result``. A result stays in the
*outbox* until the main node acknowledges it; if the connection drops, the
agent reconnects with exponential backoff and jitter, re-registers reporting
every task it still holds (running, or finished with the result not yet
acknowledged) and sends the outbox again, so a reconnect neither loses a
result nor makes the main node run a task twice.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import ssl
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional, Set, Tuple

from ..link import AnsweredHttp, ClosedByMainNode, Link
from ..protocol.codec import encode, encode_ack, encode_frame
from ..protocol.errors import ProtocolError, error_from_code
from ..protocol.messages import STOPPING_REASON, Message, error_reply, new_message_id, utc_timestamp
from ..tls import FingerprintMismatch, check_fingerprint, client_context, speaks_plain, speaks_tls
from .config import WorkerConfig, load_or_create_device_id
from .executor import Executor, Outcome
from .outbox import Outbox
from .policy import Decision, OwnerPolicy, Readings
from .profiler import OwnerCpu, Profiler, read_battery
from .sandbox import sweep_scratch_dirs

__all__ = ["Agent", "FatalError"]

log = logging.getLogger("retire_cluster.worker")

#: Frames from the main node may be as large as what it accepts; leave room.
INBOUND_FRAME_LIMIT = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
#: Answers to a task_result that mean "not taken, nothing done" (not "refused"): the result
#: stays in the outbox and is sent again after RESULT_RETRY_S.
RESULT_RETRY_CODES = frozenset({"internal", "overloaded"})
RESULT_RETRY_S = 10.0


#: At least the JSON length of a 64-bit integer, a float, true, false or null.
_SCALAR_BOUND = 32


def _fatal_refusal(exc: ProtocolError) -> "Optional[FatalError]":
    """A refused registration that asking again cannot fix (the worker then exits 2)."""
    if exc.code == "unauthorized":
        return FatalError("The main node refused the token; run `retire-cluster token` on the "
                          "main node and pass it with --token.")
    if exc.code == "invalid_message":
        return FatalError(f"The main node refused to register this worker ({exc.message}); "
                          "check --device-id (or the device_id file in --data-dir), --role and --capability.")
    return None


def _replaced(exc: ConnectionError, device_id: str) -> "Optional[FatalError]":
    """The main node closed this live connection because another one registered as the same device.

    Only a connection still alive hears it: a worker that reconnects (a
    phone that changed networks) has left its old connection before it
    registers again, so this is a second worker with the same id. If both
    kept reconnecting they would knock each other off for ever.
    """
    if isinstance(exc, ClosedByMainNode) and exc.code == "conflict":
        return FatalError(f"Another worker registered as the same device id ({device_id!r}); "
                          "give each worker its own --device-id.")
    return None


def _fair_cap(lengths: "list[int]", budget: int) -> int:
    """The largest cap with sum(min(n, cap) for n in lengths) <= budget (``lengths`` sorted)."""
    for i, n in enumerate(lengths):
        share = max(0, budget) // (len(lengths) - i)
        if n > share:
            return share
        budget -= n
    return lengths[-1] if lengths else 0


def _json_size_bound(value: Any, depth: int = 2) -> Optional[int]:
    """An upper bound of ``value``'s JSON length (every character of a string
    as a six-byte escape), for scalars, strings and objects of them nested at
    most ``depth`` deep; None for anything else (the caller then encodes it to
    measure)."""
    if value is None or isinstance(value, (bool, float)):
        return _SCALAR_BOUND
    if isinstance(value, int):
        return _SCALAR_BOUND if -(2**63) <= value < 2**64 else None
    if isinstance(value, str):
        return 6 * len(value) + 2
    if isinstance(value, dict) and depth > 0:
        total = 2
        for key, item in value.items():
            size = _json_size_bound(item, depth - 1) if isinstance(key, str) else None
            if size is None:
                return None
            total += 6 * len(key) + 4 + size
        return total
    return None


class FatalError(Exception):
    """Retrying cannot help (the token was refused); the worker exits."""


@dataclass
class Running:
    task: Dict[str, Any]
    job: "asyncio.Task[Any]"
    #: told to stop (cancelled, taken back, evicted): its slot is free for the next task
    stopping: bool = False

    @property
    def attempt(self) -> int:
        return int(self.task["attempt"])

    def stop(self) -> None:
        """Cancel the job; its process is killed at once, and its slot counts as free from now."""
        self.stopping = True
        self.job.cancel()


class Agent:
    """One worker device.

    Args:
        config: the worker's settings.
        profiler, executor: replaceable for tests.
    """

    def __init__(self, config: WorkerConfig, *, profiler: Optional[Profiler] = None,
                 executor: Optional[Executor] = None) -> None:
        self.config = config
        self.device_id = config.device_id or load_or_create_device_id(config.data_dir)
        self.profiler = profiler or Profiler(config.role, config.data_dir, config.capabilities)
        self.executor = executor or Executor(config.task_types, output_limit_bytes=config.output_limit_bytes,
                                             python_eval_timeout_s=config.python_eval_timeout_s,
                                             limits=config.limits, scratch_base=config.scratch_dir)
        self.running: Dict[str, Running] = {}
        self.outbox = Outbox(config.data_dir / "outbox")
        self.heartbeat_interval_s = config.heartbeat_interval_s or 60.0
        self.max_frame_bytes = 1024 * 1024
        self.tasks_finished = 0
        self.registered = asyncio.Event()
        self._writer: Optional[Link] = None
        self._out: "list[bytes]" = []  # frames queued in this loop pass, written together at its end
        self._pending: Dict[str, "asyncio.Future[Message]"] = {}
        #: message_id of a task_result sent -> (its outbox key, when its answer is given up on), oldest first
        self._results_sent: Dict[str, "Tuple[Tuple[str, int], float]"] = {}
        #: the one timer that gives up on unanswered results: due at the oldest one's deadline
        self._results_timer: "Optional[asyncio.TimerHandle]" = None
        self._stopping = asyncio.Event()
        self._last_activity = time.time()
        self.policy = OwnerPolicy(config.policy)
        self.decision = Decision(True)
        self.battery: Dict[str, Any] = {}
        self._policy_checks = 0
        self._owner_cpu = OwnerCpu()

    # -- owner policy -----------------------------------------------------

    def _warn_unreadable_battery(self) -> None:
        """Once, at start: a battery rule the device gives no reading for never pauses it (unknown never blocks)."""
        policy, battery = self.config.policy, self.battery
        unread = [(flag, what) for flag, needed, key, what in (
            ("--only-when-charging", policy.only_when_charging, "charging", "charging state"),
            ("--min-battery", policy.min_battery_pct is not None, "percent", "battery level"),
            ("--max-battery-temp", policy.max_battery_temp_c is not None, "temperature", "battery temperature"),
        ) if needed and battery.get(key) is None]  # fmt: skip
        if unread:
            log.warning("%s will not pause this worker: the device gives no %s (on Termux: pkg install "
                        "termux-api, and the Termux:API app)", " and ".join(f for f, _ in unread),
                        " or ".join(w for _, w in unread))

    async def check_policy(self, local_time: Optional[dt.time] = None) -> Decision:
        """Read the device, apply the owner's rules, act on a change.

        On a change the main node hears at once (an extra heartbeat); with
        --evict, running tasks are stopped and handed back when lending stops.
        """
        if self._stopping.is_set():  # stopping is the last word: no policy change undoes it
            return self.decision
        # Read at every check when a rule needs it; otherwise about once a heartbeat, which
        # reports it (before, only once: a phone lent without rules showed its battery level
        # at the worker's start for good). termux-battery-status is slow, hence not every check.
        every = max(1, int(self.heartbeat_interval_s // max(self.config.policy_interval_s, 1e-3)))
        if self.config.policy.active or self._policy_checks % every == 0:
            self.battery = await read_battery()
        if self._policy_checks == 0:
            self._warn_unreadable_battery()
        self._policy_checks += 1
        owner = self._owner_cpu.sample(self.executor.child_pids()) if self.config.policy.max_owner_cpu_pct else None
        readings = Readings(battery_pct=self.battery.get("percent"), charging=self.battery.get("charging"),
                            battery_temp_c=self.battery.get("temperature"), owner_cpu_pct=owner)
        decision = self.policy.evaluate(readings, local_time or dt.datetime.now().time())
        if decision != self.decision:
            log.info("%s", "accepting tasks again" if decision.accepting else f"not accepting tasks: {decision.reason}")
            self.decision = decision
            if self.registered.is_set():
                try:
                    self._send(self._message("heartbeat", self._heartbeat_data()))
                except ConnectionError:
                    pass
            if not decision.accepting and self.config.policy.evict and self.running:
                log.info("evicting %d running task(s)", len(self.running))
                for held in list(self.running.values()):
                    held.stop()
        return decision

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.policy_interval_s)
            try:
                await self.check_policy()
            except Exception:  # a broken sensor must not stop the worker
                log.exception("owner policy check failed")

    # -- lifecycle --------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish (running tasks are cancelled and reported)."""
        self._stopping.set()

    async def run(self) -> int:
        """Connect, serve, reconnect until stopped. Returns the exit code."""
        failures = 0
        await self.check_policy()
        await self._sweep_scratch()
        policy_task = asyncio.ensure_future(self._policy_loop())
        try:
            while not self._stopping.is_set():
                try:
                    link = await self._connect()
                except OSError as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("cannot reach main node %s:%d (%s); retrying in %.1f s",
                                self.config.main_host, self.config.main_port, exc.strerror or exc, delay)
                    await self._sleep_unless_stopped(delay)
                    continue
                failures = await self._serve(link, failures)
                if self._burst_done():
                    break
                if not self._stopping.is_set():
                    delay = self._backoff(max(failures, 1))
                    log.info("reconnecting in %.1f s", delay)
                    await self._sleep_unless_stopped(delay)
        except FatalError as exc:
            log.error("%s", exc)
            return 2
        finally:
            policy_task.cancel()
            await asyncio.gather(policy_task, return_exceptions=True)
            await self._cancel_all()
            self.outbox.spill()
        return 0

    async def _connect(self) -> Link:
        """Open a connection to the main node; with a pin, check the certificate before anything is sent.

        Raises:
            FatalError: another certificate than the pinned one, or a pin against a main node without TLS.
            OSError: the main node cannot be reached now (the caller retries).
        """
        pinned = self.config.tls_fingerprint
        try:
            _, link = await asyncio.get_running_loop().create_connection(
                lambda: Link(self._on_message, INBOUND_FRAME_LIMIT, on_read_end=self._read_ended),
                self.config.main_host, self.config.main_port,
                ssl=client_context() if pinned else None,
            )
        except ssl.SSLError:
            fatal = await self._not_tls()
            if fatal is not None:
                raise fatal from None
            raise
        if pinned is not None:
            try:  # before a single byte (the token least of all) is sent
                check_fingerprint(link.get_extra_info("ssl_object"), pinned)
            except FingerprintMismatch as exc:
                link.close()
                raise FatalError(f"Refusing the main node: {exc}.") from None
        return link

    async def _serve(self, link: Link, failures: int) -> int:
        """One connection, from register to its end. Returns the failures in a row since the last success.

        Raises:
            FatalError: retrying cannot help (see :func:`_fatal_refusal`, :func:`_replaced`,
                :meth:`_tls_needed`).
        """
        unanswered = False  # closed before the main node said a word: is it TLS?
        try:
            await self._session(link)
            return 0
        except (ConnectionError, OSError, asyncio.TimeoutError, ProtocolError) as exc:
            # A connection that got as far as registering was a success: the backoff
            # starts over. (It never did, so a worker that had lost three connections
            # came back 16 s after a main-node restart, past a short offline_timeout.)
            failures = 1 if self.registered.is_set() else failures + 1
            if isinstance(exc, ConnectionError):
                fatal = _replaced(exc, self.device_id) or self._web_server(exc)
                if fatal is not None:
                    raise fatal from None
                unanswered = link.messages == 0 and self.config.tls_fingerprint is None
            if isinstance(exc, ClosedByMainNode) and exc.code == "overloaded":  # its farewell: it is stopping
                log.info("the main node is stopping; connecting again when it is back")
            elif not unanswered:
                log.warning("connection to main node lost (%s)", exc or type(exc).__name__)
        finally:
            self._connection_ended()
            link.close()
        if unanswered:
            fatal = await self._tls_needed()
            if fatal is not None:
                raise fatal
            log.warning("connection to main node lost (the main node closed it before answering)")
        return failures

    def _web_server(self, exc: ConnectionError) -> "Optional[FatalError]":
        """--main names a web server (the dashboard's port, most likely): no retry can help."""
        if not isinstance(exc, AnsweredHttp):
            return None
        return FatalError(f"{self.config.main_host}:{self.config.main_port} answers HTTP: it is a web server "
                          "(the main node's dashboard, say), not the main node's TCP port; pass the --main "
                          "that `retire-cluster main` prints in its `retire-cluster worker` line (port 8080 by "
                          "default).")

    def _connection_ended(self) -> None:
        """The connection is gone: requests waiting for an answer fail, results wait for the next register."""
        self.registered.clear()
        self.outbox.spill()  # unacknowledged results survive a restart from now on
        self._writer = None
        for mid, fut in self._pending.items():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))
                if mid in self._results_sent:
                    fut.exception()  # retrieved: a result's future has no one to raise it to
        self._pending.clear()
        self._results_sent.clear()  # unanswered: sent again after the next register
        if self._results_timer is not None:
            self._results_timer.cancel()
            self._results_timer = None

    async def _tls_needed(self) -> "Optional[FatalError]":
        """After a plain connection the main node closed without a word: is it because it speaks TLS?

        A TLS main node closes a plain connection at once, which looked like
        any lost connection: the worker retried for ever. One TLS handshake
        (nothing is sent over it) tells; anything less than a certificate
        shown is not certain, and the worker retries as before.
        """
        host, port = self.config.main_host, self.config.main_port
        if not await speaks_tls(host, port):
            return None
        return FatalError(f"The main node at {host}:{port} speaks TLS; pass --tls-fingerprint "
                          "<the fingerprint `retire-cluster main` printed>.")

    async def _not_tls(self) -> "Optional[FatalError]":
        """After a failed TLS handshake (with --tls-fingerprint): is the main node plain TCP?

        One plain frame without the token and asking for nothing tells: a
        main node answers it. Anything else is not certain, and the worker
        retries as before.
        """
        host, port = self.config.main_host, self.config.main_port
        if not await speaks_plain(host, port):
            return None
        return FatalError(f"The main node at {host}:{port} does not speak TLS; drop --tls-fingerprint "
                          "or start the main node with --tls-cert and --tls-key.")

    async def _sweep_scratch(self) -> None:
        """Remove what workers killed with -9 left in the scratch base (in a thread: it is disk work)."""
        try:
            removed, killed = await asyncio.to_thread(sweep_scratch_dirs, self.executor.scratch_base)
        except Exception:  # a leftover directory must not stop the worker
            log.exception("cleaning up old scratch directories failed")
            return
        if killed:
            log.warning("killed %d process%s that tasks of a killed worker left running",
                        killed, "" if killed == 1 else "es")
        if removed:
            log.info("removed %d scratch director%s left by stopped workers", removed, "y" if removed == 1 else "ies")

    def _backoff(self, failures: int) -> float:
        """Exponential from reconnect_min_s to reconnect_max_s, with full jitter above the minimum."""
        lo, hi = self.config.reconnect_min_s, self.config.reconnect_max_s
        ceiling = min(hi, lo * (2 ** min(failures - 1, 16)))
        return float(lo + random.random() * (ceiling - lo))

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _burst_done(self) -> bool:
        return (
            self.config.burst and self.tasks_finished > 0 and not self.running and not self.outbox
        )

    async def _cancel_all(self) -> None:
        jobs = [r.job for r in self.running.values()]
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    # -- one connection ---------------------------------------------------

    async def _session(self, link: Link) -> None:
        self._writer = link
        read_task = link.closed  # fails with the reason when the connection ends
        stop_task = asyncio.ensure_future(self._stopping.wait())
        try:
            try:
                reply = await self._request("register", self._register_data(), wait_for=read_task)
            except ProtocolError as exc:
                fatal = _fatal_refusal(exc)
                if fatal is not None:
                    raise fatal from None
                raise
            result = reply.data.get("result") or {}
            if self.config.heartbeat_interval_s is None and result.get("heartbeat_interval"):
                self.heartbeat_interval_s = float(result["heartbeat_interval"])
            if result.get("max_frame_bytes"):
                self.max_frame_bytes = int(result["max_frame_bytes"])
            self.registered.set()
            log.info("registered with %s:%d as %s (%s)", self.config.main_host, self.config.main_port,
                     self.device_id, ", ".join(self.executor.task_types))
            for key in list(self.outbox):
                self._spawn(self._deliver(key))
            next_beat = time.monotonic() + self.heartbeat_interval_s
            while True:
                if self._burst_done():
                    return
                wait_s = max(0.0, next_beat - time.monotonic())
                if self.config.burst:
                    wait_s = min(wait_s, 0.1)  # notice idleness promptly
                waiting: Set["asyncio.Future[Any]"] = {read_task, stop_task}
                done, _ = await asyncio.wait(waiting, timeout=wait_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if read_task in done:
                    read_task.result()  # raises what ended the connection
                    raise ConnectionError("main node closed the connection")
                if stop_task in done:
                    await self._shutdown_gracefully()
                    return
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval_s
                    self._send(self._message("heartbeat", self._heartbeat_data()))
        finally:
            for t in (read_task, stop_task):
                t.cancel()
            await asyncio.gather(read_task, stop_task, return_exceptions=True)

    async def _shutdown_gracefully(self) -> None:
        """Say "not accepting", stop running tasks (they are handed back), deliver what is in the outbox.

        The heartbeat goes first, so the main node does not give a handed-back
        task straight back to this device, which would then hold it, gone,
        until the main node's offline_timeout.
        """
        log.info("stopping%s", f": handing back {len(self.running)} running task(s)" if self.running else "")
        self.decision = Decision(False, STOPPING_REASON)
        try:
            self._send(self._message("heartbeat", self._heartbeat_data()))
        except ConnectionError:
            pass
        await self._cancel_all()
        pending = [asyncio.ensure_future(self._deliver(key)) for key in list(self.outbox)]
        if pending:
            await asyncio.wait(pending, timeout=5.0)

    def _message(self, message_type: str, data: Dict[str, Any], message_id: Optional[str] = None) -> Message:
        return Message(message_type, message_id or new_message_id(), self.device_id, data,
                       timestamp=utc_timestamp(), auth_token=self.config.token)

    def _send(self, message: Message) -> None:
        """Queue a frame; every frame queued in this loop pass goes out in one write.

        An instant task's ack and result then reach the main node together,
        which wakes it once instead of twice. Frames queued while a read is
        handled go out at the end of that read (:meth:`_read_ended`), the
        others at the end of the loop pass.
        """
        self._send_frame(encode(message))

    def _send_frame(self, frame: bytes) -> None:
        """:meth:`_send` for a frame already encoded (the hot ones: an ack, a result)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionError("not connected")
        if not self._out and not writer.reading:
            asyncio.get_running_loop().call_soon(self._flush, writer)
        self._out.append(frame)

    def _accept(self, message_id: str, task_id: str) -> None:
        """The ``ack`` of a task_assign ("accepted"), encoded as ``ack(...)`` would be, without a Message."""
        self._send_frame(encode_ack(message_id, {"task_id": task_id}, None, sender_id=self.device_id))

    def _flush(self, writer: Link) -> None:
        out, self._out = self._out, []
        if out and writer is self._writer and not writer.is_closing():
            writer.write(b"".join(out))

    def _read_ended(self) -> None:
        """What the main node's frames of one read made us send goes out now, in one write.

        An instant task's ack and result then leave in the read's own
        callback, one pass of the event loop sooner, and :meth:`_send`
        schedules no flush at the end of the pass for them (a pass of the
        loop that had nothing left to write).
        """
        if self._out and self._writer is not None:
            self._flush(self._writer)

    async def _request(self, message_type: str, data: Dict[str, Any], wait_for: "asyncio.Future[Any]") -> Message:
        """Send a request and wait for its reply, or for ``wait_for`` (the connection's end).

        An error reply raises its ProtocolError. (Results do not come here:
        :meth:`_send_result` meets their replies with a callback.)
        """
        msg = self._message(message_type, data)
        fut: "asyncio.Future[Message]" = asyncio.get_running_loop().create_future()
        self._pending[msg.message_id] = fut
        try:
            self._send(msg)
            assert self._writer is not None
            await self._writer.drain()
            done, _ = await asyncio.wait({fut, wait_for}, timeout=REQUEST_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Not left for the end of the connection to fail: nobody would retrieve that exception.
            self._pending.pop(msg.message_id, None)
        if fut not in done:
            if wait_for in done:
                wait_for.result()
                raise ConnectionError("main node closed the connection")
            raise asyncio.TimeoutError(f"no reply to {message_type} within {REQUEST_TIMEOUT_S:g} s")
        return self._answer(fut.result())

    @staticmethod
    def _answer(reply: Message) -> Message:
        """The reply, or its error raised as the typed ProtocolError."""
        if reply.message_type == "error":
            raise error_from_code(str(reply.data.get("code")), str(reply.data.get("error")))
        return reply

    # -- what the main node sends -----------------------------------------

    def _on_message(self, msg: Message) -> None:
        kind = msg.message_type
        if kind in ("ack", "error"):
            answered = str(msg.data.get("original_message_id"))
            fut = self._pending.pop(answered, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            sent = self._results_sent.pop(answered, None)
            if sent is not None:  # handled here, not by a callback of the future one loop pass later
                self._result_answered(sent[0], msg)
        elif kind == "task_assign":
            self._on_assign(msg)
        elif kind == "task_cancel":
            self._on_cancel(msg)
        else:
            log.debug("ignoring %s from main node", kind)

    def _on_assign(self, msg: Message) -> None:
        task = msg.data.get("task")
        if not isinstance(task, dict) or "task_id" not in task or "attempt" not in task:
            self._send(error_reply(msg.message_id, "invalid_message", "task_assign without a task.",
                                   sender_id=self.device_id))
            return
        task_id, attempt = str(task["task_id"]), int(task["attempt"])
        held = self.running.get(task_id)
        if held is not None and held.attempt == attempt or (task_id, attempt) in self.outbox:
            self._accept(msg.message_id, task_id)
            return
        if not self.executor.can_run(str(task.get("task_type"))):
            self._send(error_reply(msg.message_id, "forbidden",
                                   f"task type {task.get('task_type')!r} is not enabled on this worker.",
                                   sender_id=self.device_id))
            return
        if not self.decision.accepting:
            self._send(error_reply(msg.message_id, "overloaded", f"not accepting tasks: {self.decision.reason}",
                                   sender_id=self.device_id))
            return
        if self.busy_slots() >= self.config.slots:
            self._send(error_reply(msg.message_id, "overloaded", "all task slots are busy.",
                                   sender_id=self.device_id))
            return
        if held is not None:  # an older attempt of the same task: it was taken from us
            held.stop()
        if self.executor.instant(task):  # echo: ack and result leave in this pass, no Task for it
            self._accept(msg.message_id, task_id)
            self._finished(task, self.executor.run_instant(task))
            return
        job = asyncio.ensure_future(self._run_task(task))  # its first step runs before the flush of the ack
        self.running[task_id] = Running(task, job)
        job.add_done_callback(partial(self._never_started, task))
        self._accept(msg.message_id, task_id)

    def busy_slots(self) -> int:
        """Slots taken: running tasks, not counting those told to stop.

        The main node frees a cancelled task's slot at once and may send the
        next task in the same write as the cancel; a stopping task's process
        is killed at once, but its job ends a loop pass or more later (after
        the process is reaped). Counting it refused that next task, and the
        refusal paused this device until its next heartbeat (a minute by default).
        """
        running = sum(1 for held in self.running.values() if not held.stopping)
        return running + self.executor.lingering  # a plug-in's thread that outlived its task

    def _never_started(self, task: Dict[str, Any], job: "asyncio.Future[None]") -> None:
        """A job cancelled before its first step (a cancel in the same read as the assignment).

        Its coroutine never ran, so neither did the ``finally`` that frees the
        slot: without this the slot stayed taken for good, and the main node
        never heard how the attempt ended.
        """
        if not job.cancelled():
            return  # _run_task ran: it cleaned up and reported
        task_id, attempt = str(task["task_id"]), int(task["attempt"])
        current = self.running.get(task_id)
        if current is not None and current.attempt == attempt:
            del self.running[task_id]
        self._finished(task, Outcome("cancelled", error="cancelled on the worker"))

    def _on_cancel(self, msg: Message) -> None:
        task_id = str(msg.data.get("task_id"))
        attempt = msg.data.get("attempt")
        held = self.running.get(task_id)
        if held is not None and (attempt is None or int(attempt) == held.attempt):
            log.info("cancelling task %s (%s)", task_id, msg.data.get("reason", "cancelled"))
            held.stop()

    # -- running tasks ----------------------------------------------------

    async def _run_task(self, task: Dict[str, Any]) -> None:
        task_id, attempt = str(task["task_id"]), int(task["attempt"])
        self._last_activity = time.time()

        def progress(percent: float, message: str) -> None:
            try:
                self._send(self._message("task_progress", {"task_id": task_id, "attempt": attempt,
                                                           "progress": percent, "message": message[:1024]}))
            except ConnectionError:
                pass

        try:
            outcome = await self.executor.run(task, progress)
        except asyncio.CancelledError:
            outcome = Outcome("cancelled", error="cancelled on the worker")
        except Exception as exc:  # a bug in a task type must not kill the worker
            log.exception("task %s crashed the executor", task_id)
            outcome = Outcome("failed", error=f"worker error: {type(exc).__name__}: {exc}", fault="device")
        finally:
            current = self.running.get(task_id)
            if current is not None and current.attempt == attempt:
                del self.running[task_id]
        self._finished(task, outcome)

    def _finished(self, task: Dict[str, Any], outcome: Outcome) -> None:
        """Keep the result in the outbox and send it (when connected)."""
        task_id, attempt = str(task["task_id"]), int(task["attempt"])
        self._last_activity = time.time()
        key = (task_id, attempt)
        connected = self.registered.is_set()
        self.outbox.put(key, durable=not connected, data=self._fit({
            "task_id": task_id,
            "attempt": attempt,
            "status": outcome.status,
            "execution_time": outcome.execution_time_s,
            "result": outcome.result(),
        }))
        self.tasks_finished += 1
        if connected:
            self._send_result(key)

    async def _deliver(self, key: Tuple[str, int]) -> None:
        """Send one outbox result and wait until it is answered (or the wait is given up)."""
        sent = self._send_result(key)
        if sent is not None:
            await asyncio.wait([sent])

    def _send_result(self, key: Tuple[str, int]) -> "Optional[asyncio.Future[Message]]":
        """Send one outbox result; it leaves the outbox once acknowledged.

        The reply is handled where it is read (:meth:`_on_message`), not by a
        waiting coroutine or a callback of the returned future: an instant
        task needs no Task at all, and no loop pass after the main node's
        answer. No reply (the connection dropped, or nothing within
        REQUEST_TIMEOUT_S) leaves it in the outbox for the next register.
        The future (for :meth:`_deliver`) resolves with the reply.
        """
        data = self.outbox.get(key)
        if data is None:
            return None
        mid = new_message_id()
        try:
            self._send_frame(encode_frame("task_result", mid, self.device_id, data, timestamp=utc_timestamp(),
                                          auth_token=self.config.token))
        except ConnectionError:
            return None  # re-sent after the next register
        assert self._writer is not None
        loop = self._writer.loop
        fut: "asyncio.Future[Message]" = loop.create_future()
        self._pending[mid] = fut
        self._results_sent[mid] = (key, loop.time() + REQUEST_TIMEOUT_S)
        if self._results_timer is None:
            self._results_timer = loop.call_later(REQUEST_TIMEOUT_S, self._results_due, loop)
        return fut

    def _results_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give up on the results unanswered for REQUEST_TIMEOUT_S; wait for the oldest of the others.

        One timer for all results in flight, not one per result: a result's
        answer usually comes within a millisecond, and a timer made and
        cancelled per result was about 5% of the worker's instructions for
        an echo task (benchmarks/instructions.py). Results are sent (and so
        due) in order, so the oldest is first.
        """
        self._results_timer = None
        sent, now = self._results_sent, loop.time()
        while sent:
            message_id, (_key, due) = next(iter(sent.items()))
            if due > now:
                self._results_timer = loop.call_at(due, self._results_due, loop)
                return
            self._result_unanswered(message_id)

    def _result_unanswered(self, message_id: str) -> None:
        """No answer to a result within REQUEST_TIMEOUT_S: it stays in the outbox, sent again after the next register."""
        self._results_sent.pop(message_id, None)
        fut = self._pending.pop(message_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(asyncio.TimeoutError(f"no reply to task_result within {REQUEST_TIMEOUT_S:g} s"))
            fut.exception()  # retrieved: a result's future has no one to raise it to

    def _result_answered(self, key: Tuple[str, int], reply: Message) -> None:
        try:
            self._answer(reply)
        except ProtocolError as exc:
            if exc.code in RESULT_RETRY_CODES:
                # Not refused, not taken (a full disk on the main node, say): send it again later.
                log.warning("main node could not take the result of %s yet (%s); sending it again in %g s",
                            key[0], exc, RESULT_RETRY_S)
                asyncio.get_running_loop().call_later(RESULT_RETRY_S, self._send_result, key)
                return
            log.warning("main node refused result of %s: %s", key[0], exc)
        self.outbox.remove(key)

    def _spawn(self, coro: Any) -> None:
        asyncio.ensure_future(coro)

    def _fit(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """Trim output so the task_result frame fits the main node's max_frame_bytes."""
        limit = self.max_frame_bytes - 1024  # envelope and margin
        result = data["result"]
        bound = _json_size_bound(result)
        if bound is not None and bound + 4096 < limit:  # fits without encoding it to find out
            return data
        for _ in range(8):
            size = len(encode(self._message("task_result", data)))
            if size <= limit:
                return data
            excess = size - limit
            texts = {k: (result.get(k) or "").encode("utf-8") for k in ("output", "stdout", "stderr", "error")}
            total = sum(len(t) for t in texts.values())
            if not total:
                break
            # One cap for all texts, as high as the frame allows: short texts stay whole and
            # long ones keep the same length (2 MB of output and 2 MB of stderr keep about half a
            # megabyte each; before, the output was cut first, all of it).
            cap = _fair_cap(sorted(len(t) for t in texts.values()), total - excess - 256)
            for field, text in texts.items():
                if len(text) > cap:
                    result[field] = text[:cap].decode("utf-8", errors="ignore")
            result["truncated"] = True
        return data

    # -- message contents -------------------------------------------------

    def held_tasks(self) -> "list[Dict[str, Any]]":
        held = {(tid, r.attempt) for tid, r in self.running.items()} | set(self.outbox)
        return [{"task_id": tid, "attempt": att} for tid, att in sorted(held)]

    def _register_data(self) -> Dict[str, Any]:
        return {
            "device_info": self.profiler.device_info(),
            "hardware_specs": self.profiler.hardware_specs(),
            "capabilities": self.profiler.capabilities(),
            "task_types": self.executor.task_types,
            "max_concurrent_tasks": self.config.slots,
            "weight": self.config.weight,
            "running_tasks": self.held_tasks(),
            "accepting": self.decision.accepting,
            "reason": self.decision.reason,
        }

    def _heartbeat_data(self) -> Dict[str, Any]:
        metrics = self.profiler.system_metrics()
        metrics["battery_percent"] = self.battery.get("percent")
        metrics["charging"] = self.battery.get("charging")
        metrics["battery_temperature"] = self.battery.get("temperature")
        return {
            "system_metrics": metrics,
            "status": "online" if self.decision.accepting else "paused",
            "active_tasks": len(self.running),
            "last_activity": utc_timestamp(self._last_activity),
            "accepting": self.decision.accepting,
            "reason": self.decision.reason,
        }
