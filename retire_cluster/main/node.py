"""The main node: wiring of server, registry, scheduler, monitor and store.

Theory of operation: all live state (devices, unfinished tasks, the queue) is
in memory and changed only from the event loop, so no locks are needed. Every
change that matters is written through the store's group commit, and whatever
the change leads to (an ``ack``, a ``task_assign``, a ``task_update``) is sent
only once that commit resolved. After a crash, :meth:`MainNode.start` rebuilds
the memory from the database: unfinished tasks go back to the queue or stay
with their device, and devices that were online get ``offline_timeout`` to
reconnect before their tasks are taken back.

Time comes from the injected ``clock`` (epoch seconds). The monitor loop calls
:meth:`tick` with it; tests call :meth:`tick` with whatever time they want.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..protocol.codec import encode_ack, encode_frame
from ..protocol.errors import (
    Overloaded,
)
from ..protocol.messages import (
    ACTIVE_STATUSES,
    STOPPING_REASON,
    TERMINAL_STATUSES,
    DeviceStatus,
    Message,
    TaskStatus,
    new_message_id,
    utc_timestamp,
)
from ..protocol.validation import MessageValidator
from .config import ConfigError, MainConfig
from .dispatch import REPLIED, Dispatcher
from .handlers import Handlers
from .health import CircuitBreaker, device_at_fault
from .keyfilter import KeyFilter
from .monitor import Monitor
from .registry import Device, Registry
from .scheduler import Scheduler
from .server import Connection, Server
from .store import Op, Store, StoreUnavailable
from .tasks import Attempt, Task

__all__ = ["MainNode", "load_or_create_token", "tls_context"]

log = logging.getLogger("retire_cluster.main")

NODE_ID = "main-node"
#: Finished tasks kept in memory (for task_status, waits, the dashboard): at most this many,
RECENT_TASKS = 10_000
#: ... holding at most about this many bytes of payload and result (outputs can be megabytes,
#: and the main node may be a Raspberry Pi). Older ones are read from the store when asked for.
RECENT_BYTES = 64 * 2**20
#: Heartbeats change only last_seen and metrics: written behind, at most this often.
HEARTBEAT_WRITE_INTERVAL_S = 10.0
#: Finished tasks past forget_finished_after_s: how many stored tasks one pass reads (oldest first), and
#: how long it waits before the next pass once it has reached the tasks too recent to forget.
FORGET_BATCH = 250
FORGET_PAUSE_S = 600.0
#: A submission whose client waits for the end (``task_submit`` with
#: ``wait``) and that goes to a free device at once has its commit held this
#: long: an instant task's result then usually comes in time to share it (one
#: commit per task instead of two; the client hears nothing before either).
WAIT_HOLD_S = 0.02
#: Task ids drawn from the OS at once (each is 64 random bits).
ID_POOL = 512
#: task_assign messages awaiting the device's ack/error, per connection. Our worker answers every one;
#: a peer that does not would otherwise grow this for as long as it stays connected. A reply to one
#: forgotten changes nothing that its result will not (assigned -> completed is a legal move).
PENDING_ASSIGNS_MAX = 4096


def load_or_create_token(config: MainConfig) -> str:
    """The cluster token from the data dir, created (mode 0600) on first start."""
    path = config.token_path
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    config.data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    while not token[0].isalnum():  # a leading "-" would read as an option in shell scripts
        token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def tls_context(config: MainConfig) -> tuple[Any, str | None]:
    """(SSL context, certificate SHA-256) when tls_cert/tls_key are set, else (None, None).

    Raises ConfigError, one sentence, when they cannot be used. Reads the two
    files and creates nothing: the CLI calls it before it opens a log file.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None, None
    from ..tls import certificate_fingerprint, server_context

    try:
        return server_context(config.tls_cert, config.tls_key), certificate_fingerprint(config.tls_cert)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"cannot use --tls-cert {config.tls_cert} / --tls-key {config.tls_key} ({exc}); "
            "give a PEM certificate and its private key."
        ) from None


class MainNode(Dispatcher):
    """One main node. ``await start()``, then ``await stop()``.

    Args:
        config: settings; ``port=0`` picks a free port (see :attr:`address`).
        clock: epoch seconds; tests pass a fake one and call :meth:`tick`.
        run_monitor: start the loop that calls :meth:`tick` every
            ``monitor_interval_s``; tests driving time themselves pass False.
    """

    def __init__(
        self,
        config: MainConfig,
        *,
        clock: Callable[[], float] = time.time,
        run_monitor: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.token: str | None = None
        #: SHA-256 of the TLS certificate (hex) when TLS is on; peers pin it
        self.tls_fingerprint: str | None = None
        self.registry = Registry()
        self.scheduler = Scheduler(config.strategy)
        self.monitor = Monitor(self.registry, offline_timeout_s=config.offline_timeout_s)
        self.store = Store(config.db_path, synchronous=config.synchronous)
        self.server = Server(self)
        self.validator = MessageValidator()
        self.handlers = Handlers(self)
        self.address: tuple[str, int] = (config.host, config.port)
        self.started_at = 0.0
        #: unfinished tasks (held with :meth:`hold`, let go with :meth:`let_go`); finished ones are in _recent
        self.tasks: dict[str, Task] = {}
        #: the payload bytes (as stored) of the unfinished tasks: max_unfinished_bytes bounds it
        self.unfinished_bytes = 0
        self._recent: OrderedDict[str, Task] = OrderedDict()
        #: about what each recent task's payload and result hold, and their sum (RECENT_BYTES)
        self._recent_sizes: dict[str, int] = {}
        self._recent_bytes = 0
        self.recent_tasks, self.recent_bytes = RECENT_TASKS, RECENT_BYTES
        #: idempotency key -> task id, for the keyed tasks held in memory (unfinished or recent)
        self._idempotency: dict[str, str] = {}
        #: every idempotency key the store may hold ("maybe" sends a submission to the store)
        self._old_keys = KeyFilter()
        #: keys being looked up in the store: a submission with the same key waits for the answer
        self._key_lookups: dict[str, asyncio.Future[None]] = {}
        self._seq = 0
        self._id_pool: list[str] = []
        #: the running loop, once started (asyncio.get_running_loop() costs a getpid() call each time)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_monitor = run_monitor
        self._monitor_task: asyncio.Task[None] | None = None
        self._schedule_handle: asyncio.Handle | None = None  # a scheduling pass is due at the end of this loop pass
        #: work arrived in the read being handled (a task, a free slot): place it when that read ends
        self._place_after_read = False
        #: a connection's read is being handled (begin_read .. after_read): what it asks of the end of
        #: the loop pass (a scheduling pass, the running states' write, a commit) is done when it ends
        self.in_read = False
        self._schedule_due = False  # schedule_soon() was called during the read
        self._dirty_devices: set[str] = set()  # heartbeats to write
        self._heartbeats_written_at = 0.0
        self._changed_devices: set[str] = set()  # to re-index in the scheduler
        self._background: set[asyncio.Task[Any]] = set()
        self._subs_all: set[Connection] = set()
        self._subs: dict[str, set[Connection]] = {}
        #: task_id -> the waits answered when the task's end is committed (task_submit with wait)
        self._end_waiters: dict[str, list[_EndWaiter]] = {}
        self.wait_hold_s = WAIT_HOLD_S
        self._held: list[Task] = []  # submissions with wait, until the next scheduling pass
        #: (task, its version) marked running in this loop pass: written at its end (write_running)
        self._running: list[tuple[Task, int]] = []
        #: tasks whose latest state failed to commit (a full or broken disk): written again at each tick
        self._unstored: dict[str, Task] = {}
        #: forget_finished: the seq it has read up to, when its next pass may start, whether one runs
        self._forget_cursor = 0
        self._forget_next_at = 0.0
        self._forgetting = False
        self._stopping = False
        self.stopped = asyncio.Event()
        #: callback(kind, obj) on every ("task", Task) publish, ("device", Device) change and ("forget", Device)
        self._listeners: list[Callable[[str, Any], None]] = []
        #: the HTTP side (retire_cluster.web.WebApp) and its bound address, when http_enabled
        self.web: Any = None
        self.http_address: tuple[str, int] | None = None

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Open the store, recover state, listen, start the monitor.

        A start that fails on its settings (a bad TLS certificate) leaves
        nothing behind; the token is created only once the store's lock is
        held, so that two main nodes started at once on a new data dir
        cannot each write a token of their own.
        """
        self._loop = asyncio.get_running_loop()
        tls = self._tls_context()  # before anything is created or opened: a bad certificate stops here
        await self.store.open()
        try:
            if not self.config.insecure:
                self.token = load_or_create_token(self.config)
            now = self.clock()
            self.started_at = now
            await self._recover(now)
            self.address = await self.server.start(self.config.host, self.config.port, ssl=tls)
            if self.config.http_enabled:
                await self._start_http()
        except BaseException:
            await self.stop()  # close the store: its thread would keep the process alive
            raise
        if self._run_monitor:
            self._monitor_task = asyncio.get_running_loop().create_task(
                self._monitor_loop(), name="monitor"
            )
        self.schedule_soon()
        log.info("main node listening on %s:%d", *self.address)

    async def _start_http(self) -> None:
        from ..web import WebApp  # aiohttp is imported only by a node that serves HTTP

        try:
            self.web = WebApp(self)
            self.http_address = await self.web.start(self.config.http_bind_host, self.config.http_port)
        except BaseException:
            await self.stop()
            raise

    def _tls_context(self) -> Any:
        """The server's SSL context when tls_cert/tls_key are set (see retire_cluster.tls)."""
        context, self.tls_fingerprint = tls_context(self.config)
        return context

    async def _recover(self, now: float) -> None:
        """Rebuild memory from the store after a (clean or unclean) stop."""
        for device in await self.store.load_devices():
            if device.online:
                # Restart grace: it gets offline_timeout from now to reconnect.
                device.last_seen = now
            device.breaker = self.new_breaker()
            self.registry.add(device)
        tasks = await self.store.load_unfinished_tasks()
        self._seq = await self.store.max_seq()
        for task in tasks:
            self.hold(task)  # accepted before the stop: never refused, whatever the limits now
            if task.idempotency_key:
                self._idempotency[task.idempotency_key] = task.task_id
            if task.status is TaskStatus.PENDING:
                self.scheduler.push(task, now)
                continue
            holder = self.registry.get(task.assigned_device or "")
            if holder is None or not holder.online:
                self.requeue(task, "worker_lost", now)
            else:
                holder.running.add(task.task_id)
                self.monitor.watch(task)
        for device in self.registry:
            self.scheduler.update_device(device, now)
        async for key in self.store.idempotency_keys():
            self._old_keys.add(key)
        if tasks:
            log.info("recovered %d unfinished tasks", len(tasks))

    async def stop(self) -> None:
        """Stop accepting, finish writes, close the database."""
        if self._stopping:
            return
        self._stopping = True
        self.server.stop_accepting()
        if self.web is not None:
            await self.web.stop()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            try:
                await self._monitor_task
            except asyncio.CancelledError:
                pass
        self._flush_heartbeats()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.store.is_open:
            # Requests already taken in hear their answers (once their commit ends), not a
            # closed connection that leaves a client wondering whether its task was stored;
            # nothing more is read meanwhile (close() reads again, to see the peer's EOF).
            self.server.stop_reading()
            try:
                await self.store.flush()
            except Exception:
                pass  # logged by the store, and its waiters were told
            for _ in range(3):  # the commit's callbacks, then the replies they make
                await asyncio.sleep(0)
        try:
            await self.server.close()
        finally:
            await self.store.close()  # its thread would keep the process alive
        self.stopped.set()
        log.info("main node stopped")

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.monitor_interval_s)
            try:
                self.tick(self.clock())
            except Exception:
                log.exception("monitor tick failed")

    def tick(self, now: float) -> None:
        """Act on everything due at ``now``: offline devices, expired leases."""
        due = self.monitor.due(now, self.lookup)
        for device in due.offline:
            self.device_offline(device, now)
        for task, attempt in due.expired:
            # Handling an offline device above may have moved the task on already.
            if task.held_by(task.assigned_device or "", attempt):
                self.expire(task, now)
        forget_after = self.config.forget_offline_after_s
        for device in self.registry:
            reopen = device.breaker.reopens_at()
            if reopen is not None and reopen <= now:
                self.device_changed(device)  # half-open: one trial task may go
            if forget_after and device.status is DeviceStatus.OFFLINE and now - device.last_seen > forget_after:
                self.forget_device(device, now)
        if now - self._heartbeats_written_at >= HEARTBEAT_WRITE_INTERVAL_S:
            self._heartbeats_written_at = now
            self._flush_heartbeats()
        if (self.config.forget_finished_after_s and not self._forgetting and now >= self._forget_next_at
                and self.store.is_open):
            self._forgetting = True
            self.spawn(self.forget_finished(now))
        if self._unstored and self.store.is_open:
            unstored, self._unstored = self._unstored, {}
            log.warning("writing the state of %d task(s) again after a failed commit", len(unstored))
            for task in unstored.values():
                holder = self.registry.get(task.assigned_device or "")
                if task.status is TaskStatus.ASSIGNED and holder is not None:
                    self._write_assignment(task, holder)
                else:
                    self.write_task(task)

    # -- connections ------------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        refused = self.server.admit(conn)
        if refused is not None:
            conn.send_error(None, Overloaded(refused))
            conn.close()

    def connection_lost(self, conn: Connection) -> None:
        self.server.release(conn)
        self.abandon_waits(conn)
        self._subs_all.discard(conn)
        for task_id in conn.subscribed:
            subs = self._subs.get(task_id)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self._subs[task_id]
        if conn.device_id is not None:
            device = self.registry.get(conn.device_id)
            if device is not None and device.conn is conn:
                device.conn = None
                if device.reason == STOPPING_REASON and not device.accepting and not device.running:
                    # Its owner stopped it and it handed everything back: offline now, not after
                    # offline_timeout (a restarted worker registers again just the same).
                    device.status = DeviceStatus.OFFLINE
                    self.write([Store.touch_device(device)])
                    log.info("device %s stopped", device.device_id)
                else:
                    # Stays online until offline_timeout: it may come back.
                    log.info("device %s disconnected", device.device_id)
                self.device_changed(device)

    # -- lookups ----------------------------------------------------------

    def lookup(self, task_id: str) -> Task | None:
        """A task held in memory (unfinished, or recently finished)."""
        return self.tasks.get(task_id) or self._recent.get(task_id)

    async def fetch(self, task_id: str) -> Task | None:
        """A task from memory or, failing that, from the store."""
        return self.lookup(task_id) or await self.store.get_task(task_id)

    def new_task_id(self) -> str:
        """64 random bits as hex, from a pool refilled 512 ids at a time (one getrandom call, not one each)."""
        if not self._id_pool:
            pool = secrets.token_bytes(8 * ID_POOL).hex()
            self._id_pool = [pool[i : i + 16] for i in range(0, len(pool), 16)]
        return self._id_pool.pop()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- state changes ----------------------------------------------------

    def write(self, ops: list[Op]) -> asyncio.Future[None]:
        return self.store.write(ops)

    def write_task(self, task: Task, *, lazy: bool = False) -> asyncio.Future[None]:
        """Queue ``task``'s state for commit and publish it once committed.

        The publication is skipped when a newer state of the task was queued
        in the meantime (its own commit publishes it): subscribers never see
        a state before it is on disk.
        """
        version = self.bump(task)
        fut = self.store.write(Store.update_task(task), lazy=lazy)
        fut.add_done_callback(lambda f: self._task_committed(f, task, version))
        return fut

    def write_running(self, task: Task) -> None:
        """Queue ``task``'s running state for a lazy commit at the end of this loop pass, unless a newer one replaces it.

        A worker sends its ack and an instant task's result in one write, so
        both come in one read. The result's write carries the whole row and
        the attempt (``started_at`` included): the running state's own write
        would be folded into it in the transaction and its publication skipped
        as outdated. So it is made at the end of the pass (of the read, when
        a read marked it: :meth:`after_read`), and only when nothing newer of
        the task was queued by then.
        """
        if not self._running and not self.in_read:  # (after a read, after_read writes them)
            (self._loop or asyncio.get_running_loop()).call_soon(self._write_running)
        self._running.append((task, task.version))

    def _write_running(self) -> None:
        marked, self._running = self._running, []
        if not self.store.is_open:  # stopped meanwhile: recovery takes assigned for running anyway
            return
        for task, version in marked:
            if task.version == version and task.status is TaskStatus.RUNNING:
                self.write_task(task, lazy=True)

    def _task_committed(self, fut: asyncio.Future[None], task: Task, version: int) -> None:
        """After a commit of ``task``'s state: publish it, or, when the disk refused it, write it again later.

        Memory has moved on already (a result recorded, a task ended), and
        nothing else would write that state again: without this the database
        would keep the task assigned or running until a restart, which runs
        it once more.
        """
        if not fut.cancelled() and isinstance(fut.exception(), StoreUnavailable):
            if self.lookup(task.task_id) is task:  # not dropped as never stored (forget_uncommitted)
                self._unstored[task.task_id] = task
            return
        if self._unstored and task.version == version and not fut.cancelled() and fut.exception() is None:
            self._unstored.pop(task.task_id, None)  # its latest state is on disk now
        self.publish_committed(fut, task, version)

    @staticmethod
    def bump(task: Task) -> int:
        task.version += 1
        return task.version

    def publish_committed(self, fut: asyncio.Future[None], task: Task, version: int) -> None:
        """After a commit: publish ``task`` if that commit holds its latest state."""
        if task.version == version and not fut.cancelled() and fut.exception() is None:
            self.publish(task)

    def new_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.config.breaker_failures, self.config.breaker_reset_s)

    def device_changed(self, device: Device) -> None:
        """Anything about ``device`` changed: re-index it at the next scheduling pass."""
        if self._listeners:
            self._notify("device", device)
        self._changed_devices.add(device.device_id)
        self.schedule_soon()

    def schedule_soon(self) -> None:
        """Run a scheduling pass at the end of this loop pass (coalesced).

        Asked during a read, it is arranged when the read ends (:meth:`after_read`),
        so that a read that places its work itself leaves no loop pass behind.
        """
        if self.in_read:
            self._schedule_due = True
        elif self._schedule_handle is None and not self._stopping:
            self._schedule_handle = (self._loop or asyncio.get_running_loop()).call_soon(self._schedule)

    def schedule_after_read(self) -> None:
        """Work arrived (a task, a free slot): run the scheduling pass when the read being handled ends."""
        self._place_after_read = True
        self.schedule_soon()

    def begin_read(self) -> None:
        """A connection's read is about to be handled; :meth:`after_read` follows it, whatever happens."""
        self.in_read = self.store.in_read = True

    def after_read(self) -> None:
        """A read was handled: place the work it brought and start its commit now, not at the end of the pass.

        The assignment of a submitted task then leaves before anything else
        the loop has queued, and a result's commit starts at once. Reads that
        only change devices (heartbeats) keep their pass at the end of the
        loop pass, so a thousand of them still cost one scheduling pass.
        What the read asked of the end of the pass is done here (the running
        states it marked, written unless a newer state was queued; its
        scheduling pass; its commit), not by callbacks queued for it: a
        read that brings a submission, or a worker's accept and result,
        leaves the loop no pass of its own to run (benchmarks/README.md,
        "Eighth pass"). A failure here is logged, as the loop logs a failed
        callback: it is not the connection's doing, which carries on.
        """
        self.in_read = self.store.in_read = False
        try:
            if self._running:
                self._write_running()
            due, self._schedule_due = self._schedule_due, False
            if self._place_after_read:
                self._place_after_read = False
                handle = self._schedule_handle
                if handle is not None:
                    handle.cancel()
                if (due or handle is not None) and not self._stopping:
                    self._schedule()
            elif due:
                self.schedule_soon()  # devices changed (heartbeats): one pass at the end of the loop pass
        except Exception:
            log.exception("scheduling after a read failed")
        try:  # whatever failed above, what the read queued is committed
            self.store.start_now()
        except Exception:
            log.exception("starting a commit after a read failed")

    def hold_insert(self, task: Task) -> None:
        """``task`` was submitted with ``wait``: its insert waits for the next scheduling pass.

        That pass keeps it held (``wait_hold_s``) if the task goes to a device
        at once, and commits it at once otherwise.
        """
        self._held.append(task)
        self.schedule_soon()

    def _schedule(self) -> None:
        self._schedule_handle = None
        held, self._held = self._held, []
        self._place({task.task_id for task in held})
        for task in held:
            if task.status is not TaskStatus.ASSIGNED or task.insert_batch != self.store.next_batch:
                self.store.hurry()  # not sent early: nothing to wait for
                break

    def _place(self, held: set[str]) -> None:
        """Plan and send assignments; ``held`` are the submissions with ``wait`` of this pass."""
        if self._stopping:
            return
        now = self.clock()
        if not len(self.scheduler):
            # Nothing to place: devices that changed (every heartbeat changes
            # one) are re-indexed when work arrives, not at each heartbeat.
            return
        if self._changed_devices:
            for device_id in self._changed_devices:
                device = self.registry.get(device_id)
                if device is not None:
                    self.scheduler.update_device(device, now)
            self._changed_devices.clear()
        plan = self.scheduler.pick(now)
        if not plan:
            return
        ops: list[Op] = []
        sent: list[tuple[Task, Device, int, int]] = []
        for task, device in plan:
            task.move(TaskStatus.ASSIGNED)
            task.attempt += 1
            task.assigned_device = device.device_id
            task.assigned_at = now
            task.started_at = None
            task.progress = None
            task.attempts.append(Attempt(task.attempt, device.device_id, now))
            self.monitor.watch(task)
            ops.extend(Store.update_task(task))
            sent.append((task, device, task.attempt, self.bump(task)))
        batch = self.store.next_batch  # the transaction these ops join
        # Early only to a device whose register reply went out: a worker reads
        # that reply first (PROTOCOL.md), and the reply waits for its own commit.
        early: list[tuple[Task, Device, int, int]] = []
        late: list[tuple[Task, Device, int, int]] = []
        for item in sent:
            task, device = item[0], item[1]
            ready = task.insert_batch == batch and device.conn is not None and device.conn.welcomed
            (early if ready else late).append(item)
        # Only held submissions sent early: the commit waits for their results (wait_hold_s).
        hold = not late and all(item[0].task_id in held for item in early)
        fut = self.store.write(ops, within=self.wait_hold_s if hold else None)
        if early:
            self._send_assignments(early)
        fut.add_done_callback(lambda f: self._assignments_committed(f, sent, late))

    def _write_assignment(self, task: Task, device: Device) -> None:
        """An assignment whose commit failed, so it was never sent: write it again, then send it."""
        item = (task, device, task.attempt, self.bump(task))
        fut = self.store.write(Store.update_task(task))
        fut.add_done_callback(lambda f: self._assignments_committed(f, [item], [item]))

    def _send_assignments(self, sent: list[tuple[Task, Device, int, int]]) -> None:
        """Send each device its new tasks (and write them out now, not at the end of the pass).

        The first assignment of a task whose insert is in the same
        transaction goes out while that transaction commits, so the device's
        work overlaps the commit instead of waiting for it (the largest step
        of a single round trip). Nothing the device says is believed before
        that commit: its ack and result are handled in memory and written in
        later transactions, which SQLite applies in order, and the submitter
        and subscribers hear of the task only after its commit. If the main
        node dies first, the task never existed: it was not acknowledged, its
        id is never used again (so no attempt number is reused), and the
        device's claim and result are refused when it re-registers
        (at-least-once execution allows the run; nothing records it). If the
        commit fails, :meth:`forget_uncommitted` tells the device to stop.
        Every other assignment (a retry, a task stored earlier) is sent only
        after its commit: a device may hold that task's attempt number
        across a restart, so it must be on disk before anyone hears it.
        """
        frames: dict[Connection, list[bytes]] = {}
        now = self.clock()
        for task, device, attempt, _version in sent:
            if not task.held_by(device.device_id, attempt):
                continue  # cancelled or lost in the meantime
            conn = device.conn
            if conn is None or conn.closed:
                continue  # the lease expires and requeues it
            mid = new_message_id()
            pending = conn.pending_assigns
            if len(pending) >= PENDING_ASSIGNS_MAX:  # a peer that never answers: forget its oldest
                del pending[next(iter(pending))]
            pending[mid] = (task.task_id, attempt)
            frame = encode_frame("task_assign", mid, NODE_ID, {"task": task.assignment()},
                                 target_id=device.device_id, timestamp=utc_timestamp(now))
            frames.setdefault(conn, []).append(frame)
        for conn, batch in frames.items():
            conn.write_now(batch)

    def _assignments_committed(
        self,
        fut: asyncio.Future[None],
        sent: list[tuple[Task, Device, int, int]],
        late: list[tuple[Task, Device, int, int]],
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if isinstance(fut.exception(), StoreUnavailable):
                # Those not sent yet go out once written (tick); those sent come back with a result.
                log.error("assignments not committed; written again and sent at the next tick")
                for task, device, attempt, _version in late:
                    if task.held_by(device.device_id, attempt):
                        self._unstored[task.task_id] = task
            else:
                log.error("assignments not committed; their leases will expire and requeue them")
            return
        if late:
            self._send_assignments(late)
        for task, device, attempt, version in sent:
            if task.held_by(device.device_id, attempt):
                if self._unstored and task.version == version:
                    self._unstored.pop(task.task_id, None)
                self.publish_committed(fut, task, version)

    def forget_uncommitted(self, task: Task) -> None:
        """The insert of a new task failed to commit: it must not run (its device is told to stop)."""
        log.error("task %s was not stored; dropping it", task.task_id)
        self._unstored.pop(task.task_id, None)
        if task.idempotency_key is not None:
            self._idempotency.pop(task.idempotency_key, None)
        self.let_go(task)
        self._forget_recent(task.task_id)
        self.monitor.release(task)
        self.bump(task)  # publications queued for it are skipped: nobody hears of it
        if task.status in ACTIVE_STATUSES:
            self.send_cancel(task, "not_stored")  # it was sent to its device while the commit ran
        device = self.registry.get(task.assigned_device or "")
        if device is not None and task.task_id in device.running:
            device.running.discard(task.task_id)
            self.device_changed(device)
        if not task.terminal:
            task.move(TaskStatus.CANCELLED)  # the scheduler and the monitor skip it

    def requeue(self, task: Task, outcome: str, now: float, *, handback: bool = False) -> None:
        """Take a task back from its device: to the queue, or failed when out of retries."""
        self._release(task, outcome, now)
        if handback:
            task.handbacks += 1
        if not handback and not task.retries_left:
            self.finish(
                task,
                TaskStatus.FAILED,
                now,
                error=f"{outcome}: gave up after {task.attempts_used} "
                f"attempt{'' if task.attempts_used == 1 else 's'} (max_retries {task.max_retries})",
                released=True,
            )
            return
        task.move(TaskStatus.PENDING)
        task.assigned_device = None
        task.assigned_at = None
        task.started_at = None
        task.progress = None
        self.write_task(task)
        self.scheduler.push(task, now)
        self.schedule_soon()

    def _release(self, task: Task, outcome: str, now: float, *, device_failed: bool | None = None) -> None:
        """Free the device slot, close the current attempt, update the device's record.

        ``device_failed`` says whether a failed or timed-out ``outcome`` was
        the device's doing (counted by its circuit breaker) or the task's
        own (see :mod:`.health`); None means: only ``worker_lost`` is.
        """
        device = self.registry.get(task.assigned_device or "")
        if device is not None and task.task_id in device.running:
            device.running.discard(task.task_id)
            if device_failed is None:
                device_failed = outcome == "worker_lost"
            if outcome == "completed":
                device.stats.record_success(task.task_type, task.execution_time_s)
                device.breaker.on_success()
            else:
                if outcome in ("failed", "timeout", "worker_lost"):
                    device.stats.failures += 1
                if device_failed:
                    if device.breaker.on_failure(now):
                        log.warning("device %s: circuit breaker open after %d failures in a row",
                                    device.device_id, device.breaker.consecutive_failures)
                else:  # the task's own failure, handed back, refused, cancelled: says nothing
                    device.breaker.trial_running = False
            self.touch(device)
            self.device_changed(device)
            self.schedule_after_read()  # a free slot: the next task may go to it at once
        self.monitor.release(task)
        current = task.current_attempt()
        if current is not None and current.finished_at is None:
            current.finished_at = now
            current.outcome = outcome

    def finish(
        self,
        task: Task,
        status: TaskStatus,
        now: float,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        execution_time_s: float | None = None,
        released: bool = False,
    ) -> asyncio.Future[None]:
        """Move a task to a terminal state; the future resolves once committed."""
        if execution_time_s is not None:
            task.execution_time_s = execution_time_s
        if not released:
            # Ended by its device's task_result (or a cancel): the result says whose doing a failure was.
            self._release(task, status.value, now, device_failed=device_at_fault(status.value, result))
        task.move(status)
        task.finished_at = now
        if status is TaskStatus.COMPLETED and task.progress is not None:
            task.progress = 100.0  # not the last report before the end (66.7% for a 3 s sleep)
        if result is not None:
            task.result = result
        if error is not None:
            task.error = error
        self.let_go(task)
        self._keep_recent(task)
        fut = self.write_task(task)
        waiters = self._end_waiters.get(task.task_id)
        if waiters:
            for waiter in waiters:
                waiter.ending(fut)
        self.schedule_soon()
        return fut

    def hold(self, task: Task) -> None:
        """Hold ``task`` in memory as unfinished."""
        if self.tasks.setdefault(task.task_id, task) is task:
            self.unfinished_bytes += task.payload_bytes

    def let_go(self, task: Task) -> None:
        """``task`` ended, or was never stored: it is no longer held as unfinished."""
        if self.tasks.pop(task.task_id, None) is not None:
            self.unfinished_bytes -= task.payload_bytes

    def refuse_when_full(self) -> None:
        """Raise Overloaded when no new task may be held (max_unfinished_tasks, max_unfinished_bytes).

        Checked before a submission makes a task, so that a client (or a
        token holder) cannot grow the main node's memory without bound; the
        clients send an ``overloaded`` request again with backoff.
        """
        config = self.config
        if len(self.tasks) >= config.max_unfinished_tasks:
            raise Overloaded(
                f"The main node holds {len(self.tasks):,} unfinished tasks, its limit (max_unfinished_tasks); "
                "submit again when some have finished, or cancel some."
            )
        if self.unfinished_bytes >= config.max_unfinished_bytes:
            raise Overloaded(
                f"The unfinished tasks carry {self.unfinished_bytes / 2**20:.0f} MiB of payload, the main node's "
                "limit (max_unfinished_bytes); submit again when some have finished, or cancel some."
            )

    def _keep_recent(self, task: Task) -> None:
        """Keep a finished task in memory, forgetting the oldest past recent_tasks or recent_bytes."""
        self._forget_recent(task.task_id)
        size = _held_bytes(task)
        self._recent[task.task_id] = task
        self._recent_sizes[task.task_id] = size
        self._recent_bytes += size
        while len(self._recent) > self.recent_tasks or (self._recent_bytes > self.recent_bytes
                                                          and len(self._recent) > 1):
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= self._recent_sizes.pop(old.task_id, 0)
            # Its key is on disk (and in _old_keys): memory holds only the keys of tasks in memory.
            if old.idempotency_key is not None and self._idempotency.get(old.idempotency_key) == old.task_id:
                del self._idempotency[old.idempotency_key]

    def _forget_recent(self, task_id: str) -> None:
        if self._recent.pop(task_id, None) is not None:
            self._recent_bytes -= self._recent_sizes.pop(task_id, 0)

    def expire(self, task: Task, now: float) -> None:
        """The lease of ``task`` ran out: stop it on its device, then retry or end it."""
        self.send_cancel(task, "timeout")
        # The device said nothing by timeout + lease_grace_s (a worker stops a task at its
        # timeout and reports it): that counts against the device, unlike a reported timeout.
        self._release(task, "timeout", now, device_failed=True)
        if task.retry_on_timeout and task.attempts_used <= task.max_retries:
            self.requeue(task, "timeout", now)
        else:
            self.finish(
                task,
                TaskStatus.TIMEOUT,
                now,
                error=f"no result within the task timeout of {task.timeout_s:g} s",
                released=True,
            )

    def send_cancel(self, task: Task, reason: str) -> None:
        """Tell the device holding ``task`` to stop it (if it is connected)."""
        device = self.registry.get(task.assigned_device or "")
        if device is not None and device.conn is not None:
            self.send_cancel_to(device.conn, device.device_id, task.task_id, task.attempt, reason)

    def send_cancel_to(
        self, conn: Connection, device_id: str, task_id: str, attempt: int, reason: str
    ) -> None:
        conn.send(
            Message(
                "task_cancel",
                new_message_id(),
                NODE_ID,
                {"task_id": task_id, "attempt": attempt, "reason": reason},
                target_id=device_id,
                timestamp=utc_timestamp(self.clock()),
            )
        )

    def device_offline(self, device: Device, now: float) -> None:
        """A device missed heartbeats for offline_timeout: take its tasks back."""
        log.warning("device %s offline (silent for %.0f s)", device.device_id, now - device.last_seen)
        device.status = DeviceStatus.OFFLINE
        if device.conn is not None:
            device.conn.close()
            device.conn = None
        self.device_changed(device)
        for task_id in sorted(device.running):
            task = self.tasks.get(task_id)
            if task is None:
                device.running.discard(task_id)
                continue
            self.requeue(task, "worker_lost", now)
        self._dirty_devices.discard(device.device_id)
        self.write([Store.touch_device(device)])

    def forget_device(self, device: Device, now: float) -> None:
        """``device`` has been offline for forget_offline_after_s: forget it (memory and store).

        A house retires its old devices for good; without this each one stayed
        listed, indexed and stored forever. One that comes back registers afresh.
        """
        log.info("forgetting device %s: offline for %.0f days", device.device_id,
                 (now - device.last_seen) / 86400)
        device_id = device.device_id
        self.registry.remove(device_id)
        self.scheduler.forget_device(device_id)
        self._changed_devices.discard(device_id)
        self._dirty_devices.discard(device_id)
        if self._listeners:
            self._notify("forget", device)
        self.write([Store.delete_device(device_id)])

    async def forget_finished(self, now: float) -> int:
        """One pass of forget_finished_after_s: delete up to FORGET_BATCH stored tasks that ended before then.

        Reads the stored tasks oldest first from where the last pass stopped
        (apart from the commits), and deletes, in one commit, those that ended
        long enough ago and are no longer held in memory. Once it meets a task
        created after the cutoff, the rest are newer: it starts over from the
        oldest FORGET_PAUSE_S later. A pass that read a whole batch lets the
        next tick run another, so a long history is worked off 250 tasks a
        second (a pass's commit takes the writer 5-12 ms). Returns how many
        tasks it deleted.
        """
        try:
            cutoff = now - self.config.forget_finished_after_s
            rows = await self.store.oldest_tasks(self._forget_cursor, FORGET_BATCH)
            doomed: list[str] = []
            done = len(rows) < FORGET_BATCH
            for seq, task_id, status, created_at, finished_at in rows:
                if created_at >= cutoff:
                    done = True
                    break
                self._forget_cursor = seq
                if (status in TERMINAL_STATUSES and finished_at is not None and finished_at < cutoff
                        and self._let_go_of_finished(task_id, cutoff)):
                    doomed.append(task_id)
            if done:
                self._forget_cursor = 0
                self._forget_next_at = now + FORGET_PAUSE_S
            if doomed and self.store.is_open:
                await self.store.write(Store.forget_tasks(doomed))
                log.info("forgot %d task%s that ended over %s ago (forget_finished_after_s)", len(doomed),
                         "" if len(doomed) == 1 else "s", _days(self.config.forget_finished_after_s))
            return len(doomed)
        except Exception:  # the disk refused, or the store closed meanwhile: the next pass tries again
            if self.store.is_open:
                log.exception("could not forget old finished tasks now; trying again in %g s", FORGET_PAUSE_S)
            self._forget_next_at = now + FORGET_PAUSE_S
            return 0
        finally:
            self._forgetting = False

    def _let_go_of_finished(self, task_id: str, cutoff: float) -> bool:
        """Drop a task that ended before ``cutoff`` from memory, if it is there; False if it must stay."""
        if task_id in self.tasks or task_id in self._unstored:
            return False  # unfinished in memory, or its end still to be written
        task = self._recent.get(task_id)
        if task is not None:
            if not task.terminal or task.finished_at is None or task.finished_at >= cutoff:
                return False
            self._forget_recent(task_id)
            if task.idempotency_key is not None and self._idempotency.get(task.idempotency_key) == task_id:
                del self._idempotency[task.idempotency_key]
        return True

    def touch(self, device: Device) -> None:
        """Remember to write this device's heartbeat at the next tick."""
        self._dirty_devices.add(device.device_id)

    def _flush_heartbeats(self) -> None:
        if not self._dirty_devices or not self.store.is_open:
            return
        ops = []
        for device_id in self._dirty_devices:
            device = self.registry.get(device_id)
            if device is not None:
                ops.append(Store.touch_device(device))
        self._dirty_devices.clear()
        if ops:
            self.write(ops)

    # -- subscriptions ----------------------------------------------------

    def subscribe(self, conn: Connection, task_ids: list[str] | None) -> None:
        """Push ``task_update`` to ``conn`` for these tasks (every task when None).

        A subscription ends with its task's end (or the connection). One to a
        task that will never change again is not kept, or a client that waits
        for tasks already ended would grow its connection's subscriptions for
        as long as it stays connected: a task not in memory ended long ago (or
        never existed), and one that ended moments ago is dropped once its end
        is committed and so published.
        """
        if task_ids is None:
            conn.subscribed_all = True
            self._subs_all.add(conn)
            return
        ended: list[str] = []
        for task_id in task_ids:
            task = self.lookup(task_id)
            if task is None:
                continue  # unfinished tasks are all in memory: this one will never change
            conn.subscribed.add(task_id)
            self._subs.setdefault(task_id, set()).add(conn)
            if task.terminal:
                ended.append(task_id)
        if ended and self.store.is_open:
            # Its end may be committing still: its publication (which ends the subscription) comes first.
            loop = self._loop or asyncio.get_running_loop()
            self.store.write([]).add_done_callback(
                lambda _f: loop.call_soon(self._unsubscribe_ended, conn, ended)
            )

    def _unsubscribe_ended(self, conn: Connection, task_ids: list[str]) -> None:
        for task_id in task_ids:
            task = self.lookup(task_id)
            if task is not None and (not task.terminal or task_id in self._unstored):
                continue  # still to be published (its end is written again at the next tick)
            conn.subscribed.discard(task_id)
            subs = self._subs.get(task_id)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self._subs[task_id]

    def add_listener(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback("task", task)`` at every publish() and ``callback("device", device)``
        at every device change, synchronously in the event loop (the web dashboard's feed)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, Any], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, kind: str, obj: Any) -> None:
        for callback in list(self._listeners):
            try:
                callback(kind, obj)
            except Exception:  # a listener's bug must not stop the node
                log.exception("listener %r failed on a %s change", callback, kind)

    def wait_for_end(
        self, task: Task, seconds: float, stored: asyncio.Future[Any], owner: Any = None, reply_to: str | None = None
    ) -> asyncio.Future[Any]:
        """A future of ``{"task_id", "task"}`` once ``task``'s end is committed, or after ``seconds``.

        ``stored`` is a commit that carries the task's insert, and its end
        when it has ended already: nothing is answered before it (its failure
        is the answer), so a record given out is on disk. The record after
        ``seconds`` may be of a task still running.
        The answer is the reply itself (no further future in between), so it
        goes out before the device's own ack in the same pass.
        ``owner`` (a Connection or HttpPeer, with an ``end_waits`` set) is who
        waits: :meth:`abandon_waits` drops its waits once it has gone.
        ``reply_to``: the id of the request whose reply this is, when ``owner``
        is a Connection. The reply to an end then leaves the moment the end's
        commit is heard of (Store.after_commit, set up when the task ends), and
        the future resolves to :data:`REPLIED` instead of the answer.
        """
        waiter = _EndWaiter(self, task, stored, seconds, owner, reply_to)
        return waiter.out

    @staticmethod
    def abandon_waits(owner: Any) -> None:
        """``owner`` went away: cancel its waits for task ends (the tasks go on).

        Otherwise each one, with its request and connection, would stay until
        its task ended or its wait (up to an hour) ran out: a client that
        sends a waited submission (or repeats one with its idempotency key)
        and hangs up, again and again, would grow the main node meanwhile.
        """
        for waiter in list(getattr(owner, "end_waits", ())):
            waiter.abandon()

    def publish(self, task: Task) -> None:
        """Push ``task_update`` to the connections subscribed to this task."""
        if task.terminal and task.task_id in self._end_waiters:
            for waiter in list(self._end_waiters[task.task_id]):
                waiter.answer()
        if self._listeners:
            self._notify("task", task)
        if not self._subs_all and task.task_id not in self._subs:  # nobody subscribed (the common case)
            return
        targets = self._subs_all | self._subs.get(task.task_id, set())
        if not targets:
            return
        frame = encode_frame("task_update", new_message_id(), NODE_ID, {"task": task.to_record()},
                             timestamp=utc_timestamp(self.clock()))
        for conn in targets:
            conn.send_bytes(frame)
        if task.terminal:
            for conn in self._subs.pop(task.task_id, set()):
                conn.subscribed.discard(task.task_id)


class _EndWaiter:
    """One ``task_submit`` with ``wait``: answered at the task's committed end, or when the wait runs out."""

    def __init__(
        self, node: MainNode, task: Task, stored: asyncio.Future[Any], seconds: float, owner: Any = None,
        reply_to: str | None = None,
    ) -> None:
        self.node, self.task, self.stored = node, task, stored
        loop = node._loop or asyncio.get_running_loop()
        self.out: asyncio.Future[Any] = loop.create_future()
        self.due = task.terminal  # answer once stored: it ended (stored carries that end), or the wait ran out
        self.timer = loop.call_later(seconds, self.ran_out)
        if not self.due:
            node._end_waiters.setdefault(task.task_id, []).append(self)
        #: the owner's set of waits (MainNode.abandon_waits), None without an owner
        self.owned: set[_EndWaiter] | None = getattr(owner, "end_waits", None)
        if self.owned is not None:
            self.owned.add(self)
        #: who is answered at the end's commit, and the id answered (see MainNode.wait_for_end)
        self.conn = owner if reply_to is not None else None
        self.reply_to = reply_to
        self.replied = False
        stored.add_done_callback(self.after_store)

    def abandon(self) -> None:
        """Nobody waits any more (the client hung up): let go of everything, answer nothing."""
        self.forget()
        self.out.cancel()

    def forget(self) -> None:
        self.timer.cancel()
        if self.owned is not None:
            self.owned.discard(self)
        waiters = self.node._end_waiters.get(self.task.task_id)
        if waiters is not None and self in waiters:
            waiters.remove(self)
            if not waiters:
                del self.node._end_waiters[self.task.task_id]

    def answer(self) -> None:
        self.forget()
        if not self.out.done():
            self.out.set_result(REPLIED if self.replied else {"task_id": self.task.task_id,
                                                              "task": self.task.to_record()})

    def ending(self, committed: asyncio.Future[None]) -> None:
        """The task ended, and the write ``committed`` carries its end: have the reply leave when it is committed.

        The reply is encoded now, while the commit is still ahead, and written by
        the store's hook the moment the commit's end is heard of, before the
        futures' callbacks (two loop passes later) would have written it. An end
        is final: the record does not change until then. After a failed commit
        the hook is dropped; the end is written again (MainNode.tick), and that
        commit's callbacks answer, as they did before this hook.
        """
        if self.conn is None or self.out.done():
            return
        task = self.task
        try:
            frame = encode_ack(self.reply_to, {"task_id": task.task_id, "task": task.to_record()},
                               utc_timestamp(self.node.clock()))
        except Exception:  # the usual way answers, and reports what failed
            return
        self.node.store.after_commit(committed, lambda: self._reply(frame))

    def _reply(self, frame: bytes) -> None:
        if self.out.done():  # its client has gone, or the wait ran out in the meantime
            return
        assert self.conn is not None
        self.conn.send_now(frame)
        self.replied = True

    def after_store(self, f: asyncio.Future[Any]) -> None:
        if self.out.done():
            return
        if f.cancelled():
            self.forget()
            self.out.cancel()
        elif f.exception() is not None:
            self.forget()
            self.out.set_exception(f.exception())  # type: ignore[arg-type]
        elif self.due:
            self.answer()

    def ran_out(self) -> None:
        self.due = True
        if self.stored.done():
            self.after_store(self.stored)


def _days(seconds: float) -> str:
    """``seconds`` as a person says it: "30 days", "12 hours", "90 s"."""
    if seconds >= 86400:
        return f"{seconds / 86400:g} day{'' if seconds == 86400 else 's'}"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hour{'' if seconds == 3600 else 's'}"
    return f"{seconds:g} s"


def _held_bytes(task: Task) -> int:
    """About how much of memory a finished task's payload and result take: their text.

    The payload's size is the one noted when it was stored (Task.payload_bytes), not measured again.
    """
    size = task.payload_bytes
    result = task.result
    if isinstance(result, dict):
        for value in result.values():
            if isinstance(value, str):
                size += len(value)
    return size + len(task.error or "")
