"""The only SQL in the project: SQLite in WAL mode through aiosqlite.

Theory of operation: the node keeps the live state in memory and the store
keeps it durable. Writes are queued with :meth:`Store.write`, which returns a
future; the next loop pass hands everything queued so far to aiosqlite's
thread as a single transaction (while one is under way, the queue waits for
it) and its end resolves those futures, so a burst of N submissions costs
one commit, not N (group commit). Callers send their acknowledgements only
after the future resolves: nothing is acknowledged before it is on disk.

Reads that must see earlier writes call :meth:`Store.flush` first. SQL uses
placeholders only. The schema carries a version (``PRAGMA user_version``) and
is brought up to date by :data:`MIGRATIONS` on open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Union

import aiosqlite

from ..protocol.codec import dumps
from ..protocol.errors import RemoteProtocolError
from ..protocol.messages import TERMINAL_STATUSES, DeviceStatus, TaskStatus
from ..runtime import LockHeld, hold_lock
from .health import DeviceStats
from .registry import Device
from .tasks import Attempt, Task

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "DatabaseInUse", "Store", "StoreUnavailable"]

log = logging.getLogger("retire_cluster.store")

Op = tuple[str, Sequence[Any]]

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        device_info TEXT NOT NULL,
        hardware_specs TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        task_types TEXT NOT NULL,
        max_tasks INTEGER NOT NULL,
        status TEXT NOT NULL,
        registered_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        task_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        priority INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        requirements TEXT NOT NULL,
        max_retries INTEGER NOT NULL,
        retry_on_timeout INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        handbacks INTEGER NOT NULL DEFAULT 0,
        assigned_device TEXT,
        result TEXT,
        error TEXT,
        execution_time_s REAL,
        created_at REAL NOT NULL,
        assigned_at REAL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX tasks_status ON tasks(status);
    CREATE INDEX tasks_device ON tasks(assigned_device);
    CREATE INDEX tasks_type ON tasks(task_type);
    CREATE INDEX tasks_seq ON tasks(seq);
    CREATE UNIQUE INDEX tasks_idempotency ON tasks(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE task_attempts (
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        attempt INTEGER NOT NULL,
        device_id TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        outcome TEXT,
        PRIMARY KEY (task_id, attempt)
    );
    """,
    # 2: per-device weight and statistics (strategies, circuit breaker)
    """
    ALTER TABLE devices ADD COLUMN weight REAL NOT NULL DEFAULT 1.0;
    ALTER TABLE devices ADD COLUMN stats TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: fewer pages written per commit. A task's commit wrote 8 b-tree pages (the table, the
    # autoindex of task_id, 4 indexes, the attempts table and its autoindex) and now writes 4:
    # the table is keyed by seq (the rowid, so no seq index), the attempts table has no rowid
    # (its key is its only b-tree), and the assigned_device and task_type indexes are gone
    # (listing filtered by them walks the table newest first). benchmarks/README.md has the numbers.
    # seq is renumbered in its own order (ROW_NUMBER), so a duplicate could not stop the copy.
    # Store._migrate turns foreign keys off around it.
    """
    DROP INDEX tasks_status;
    DROP INDEX tasks_device;
    DROP INDEX tasks_type;
    DROP INDEX tasks_seq;
    DROP INDEX tasks_idempotency;
    ALTER TABLE task_attempts RENAME TO task_attempts_v2;
    ALTER TABLE tasks RENAME TO tasks_v2;
    CREATE TABLE tasks (
        task_id TEXT NOT NULL UNIQUE,
        seq INTEGER PRIMARY KEY,
        task_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        priority INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        requirements TEXT NOT NULL,
        max_retries INTEGER NOT NULL,
        retry_on_timeout INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        handbacks INTEGER NOT NULL DEFAULT 0,
        assigned_device TEXT,
        result TEXT,
        error TEXT,
        execution_time_s REAL,
        created_at REAL NOT NULL,
        assigned_at REAL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX tasks_status ON tasks(status);
    CREATE UNIQUE INDEX tasks_idempotency ON tasks(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE task_attempts (
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        attempt INTEGER NOT NULL,
        device_id TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        outcome TEXT,
        PRIMARY KEY (task_id, attempt)
    ) WITHOUT ROWID;
    INSERT INTO tasks (task_id, seq, task_type, payload, priority, timeout_s, requirements, max_retries,
        retry_on_timeout, idempotency_key, status, attempt, handbacks, assigned_device, result, error,
        execution_time_s, created_at, assigned_at, started_at, finished_at)
    SELECT task_id, ROW_NUMBER() OVER (ORDER BY seq, rowid), task_type, payload, priority, timeout_s,
        requirements, max_retries, retry_on_timeout, idempotency_key, status, attempt, handbacks,
        assigned_device, result, error, execution_time_s, created_at, assigned_at, started_at, finished_at
    FROM tasks_v2;
    INSERT INTO task_attempts (task_id, attempt, device_id, assigned_at, started_at, finished_at, outcome)
    SELECT task_id, attempt, device_id, assigned_at, started_at, finished_at, outcome FROM task_attempts_v2;
    DROP TABLE task_attempts_v2;
    DROP TABLE tasks_v2;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_TASK_COLUMNS = (
    "task_id, seq, task_type, payload, priority, timeout_s, requirements, max_retries, "
    "retry_on_timeout, idempotency_key, status, attempt, handbacks, assigned_device, result, "
    "error, execution_time_s, created_at, assigned_at, started_at, finished_at"
)
_INSERT_TASK = f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({', '.join('?' * 21)})"
_UPDATE_TASK = (
    "UPDATE tasks SET status=?, attempt=?, handbacks=?, assigned_device=?, result=?, error=?, "
    "execution_time_s=?, assigned_at=?, started_at=?, finished_at=? WHERE task_id=?"
)
_UPSERT_ATTEMPT = (
    "INSERT INTO task_attempts (task_id, attempt, device_id, assigned_at, started_at, "
    "finished_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id, attempt) DO UPDATE "
    "SET started_at=excluded.started_at, finished_at=excluded.finished_at, outcome=excluded.outcome"
)
_UPSERT_DEVICE = (
    "INSERT INTO devices (device_id, device_info, hardware_specs, capabilities, task_types, "
    "max_tasks, status, registered_at, last_seen, metrics, weight, stats) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(device_id) DO UPDATE SET device_info=excluded.device_info, "
    "hardware_specs=excluded.hardware_specs, capabilities=excluded.capabilities, "
    "task_types=excluded.task_types, max_tasks=excluded.max_tasks, status=excluded.status, "
    "registered_at=excluded.registered_at, last_seen=excluded.last_seen, metrics=excluded.metrics, "
    "weight=excluded.weight, stats=excluded.stats"
)
_TOUCH_DEVICE = "UPDATE devices SET status=?, last_seen=?, metrics=?, stats=? WHERE device_id=?"
_DELETE_DEVICE = "DELETE FROM devices WHERE device_id=?"
#: A finished task forgotten (MainNode.forget_finished): its attempts first (they refer to it).
_FINISHED = f"status IN ({', '.join(sorted(repr(s.value) for s in TERMINAL_STATUSES))})"
_FORGET_ATTEMPTS = f"DELETE FROM task_attempts WHERE task_id=? AND EXISTS (SELECT 1 FROM tasks WHERE task_id=? AND {_FINISHED})"
_FORGET_TASK = f"DELETE FROM tasks WHERE task_id=? AND {_FINISHED}"


#: A lazy write (a state nothing acts on, such as assigned -> running) joins
#: the next commit, or gets its own after this long.
LAZY_COMMIT_S = 0.05

#: Run each batch as one function in aiosqlite's thread (tests turn it off to cover the other path).
FAST_COMMIT = True


#: Where an _UPDATE_TASK's values (all but its trailing task_id) sit in an _INSERT_TASK row.
_UPDATE_IN_INSERT = (10, 11, 12, 13, 14, 15, 16, 18, 19, 20)


def _grouped(ops: Sequence[Op]) -> list[tuple[str, list[Sequence[Any]]]]:
    """One transaction's statements: by kind in dependency order, each row written once.

    Every statement carries a whole snapshot of what it writes, so inside one
    transaction only the last write of a row matters: later updates of a task
    replace earlier ones (and fold into its insert when that is in the same
    batch), later attempt and device writes replace earlier ones, and a device
    upsert makes the heartbeat touches queued before it moot. A task goes
    pending -> assigned -> running -> completed in three or four snapshots and
    costs one or two row writes. Kinds this does not know keep their order,
    after the known ones.
    """
    inserts: dict[Any, list[Any]] = {}
    updates: dict[Any, Sequence[Any]] = {}
    attempts: dict[tuple[Any, Any], Sequence[Any]] = {}
    upserts: dict[Any, Sequence[Any]] = {}
    touches: dict[Any, Sequence[Any]] = {}
    deletes: dict[Any, Sequence[Any]] = {}
    others: list[tuple[str, list[Sequence[Any]]]] = []
    for sql, params in ops:
        if sql == _UPDATE_TASK:
            row = inserts.get(params[-1])
            if row is None:
                updates[params[-1]] = params
            else:
                for value, index in zip(params, _UPDATE_IN_INSERT):
                    row[index] = value
        elif sql == _UPSERT_ATTEMPT:
            attempts[(params[0], params[1])] = params
        elif sql == _INSERT_TASK and params[0] not in inserts:
            inserts[params[0]] = list(params)
        elif sql == _TOUCH_DEVICE:
            touches[params[-1]] = params
        elif sql == _UPSERT_DEVICE:
            upserts[params[0]] = params
            touches.pop(params[0], None)
            deletes.pop(params[0], None)  # it came back: forgotten, then registered again
        elif sql == _DELETE_DEVICE:
            deletes[params[0]] = params
            upserts.pop(params[0], None)
            touches.pop(params[0], None)
        elif others and others[-1][0] == sql:
            others[-1][1].append(params)
        else:
            others.append((sql, [params]))
    groups: list[tuple[str, list[Sequence[Any]]]] = []
    for sql, rows in ((_INSERT_TASK, inserts), (_UPDATE_TASK, updates), (_UPSERT_ATTEMPT, attempts),
                      (_UPSERT_DEVICE, upserts), (_TOUCH_DEVICE, touches), (_DELETE_DEVICE, deletes)):  # fmt: skip
        if rows:
            groups.append((sql, list(rows.values())))
    return groups + others


def _apply_batch(db: aiosqlite.Connection, groups: list[tuple[str, list[Sequence[Any]]]]) -> None:
    """Runs in aiosqlite's thread: the whole batch as one transaction."""
    conn = db._conn  # the sqlite3 connection, used only from its own thread here
    try:
        for sql, rows in groups:
            if len(rows) == 1:
                conn.execute(sql, rows[0])
            else:
                conn.executemany(sql, rows)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


#: Errors that come from one write's values (a constraint, a value SQLite cannot bind), not from
#: the disk: when a group commit fails with one of them, each write is tried again on its own.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                sqlite3.DataError, TypeError, ValueError, OverflowError)

Outcome = Union[None, BaseException, "list[BaseException | None]"]


def _apply_each(db: aiosqlite.Connection, ops: Sequence[Op], spans: list[tuple[int, int]]) -> list[BaseException | None]:
    """Runs in aiosqlite's thread after a group commit failed on a data error: each write alone, in order."""
    out: list[BaseException | None] = []
    for start, end in spans:
        try:
            if end > start:
                _apply_batch(db, _grouped(ops[start:end]))
            out.append(None)
        except BaseException as exc:  # noqa: B036 - reported to that write's waiter
            out.append(exc)
    return out


class DatabaseInUse(Exception):
    """Another process (another main node) has the database open."""


class StoreUnavailable(RemoteProtocolError):
    """A commit failed on the disk (full, read-only, I/O error): what it carried was not stored.

    Every waiter of that commit hears this instead of the raw SQLite error, so
    the reply (code ``internal``) says what happened and what to do, not only
    a log reference. A RemoteProtocolError only so that the reply carries this
    sentence; ``cause`` is the original error.
    """

    code = "internal"

    def __init__(self, cause: BaseException) -> None:
        reason = str(cause) or type(cause).__name__
        super().__init__(
            f"The main node could not write its database ({reason}), so this was not stored. "
            "Free space on (or fix) the disk of its data dir, then send it again."
        )
        self.cause = cause


def _unavailable(exc: BaseException) -> BaseException:
    """A disk error as :class:`StoreUnavailable`; a data error (one write's values) or anything else as it is."""
    if isinstance(exc, (sqlite3.Error, OSError)) and not isinstance(exc, _DATA_ERRORS):
        return StoreUnavailable(exc)
    return exc


def _j(value: Any) -> str | None:
    """Compact JSON text for a column (orjson when importable: several times faster)."""
    return None if value is None else dumps(value).decode("utf-8")


def _unj(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Store:
    """SQLite persistence of tasks, attempts and devices.

    Args:
        path: the database file (created with its directory).
        synchronous: ``full`` (default; survives power loss) or ``normal``
            (survives a crash of the process, not of the machine).
    """

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        self._queue: list[Op] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._spans: list[tuple[int, int]] = []  # each waiter's writes: a slice of _queue
        self._urgent = False  # a write that wants its own commit is queued
        self._start_handle: asyncio.Handle | None = None
        #: a connection's read is being handled (MainNode.begin_read): a commit asked for meanwhile is
        #: started when the read ends (start_now), not by a callback queued for the next loop pass
        self.in_read = False
        self._kick_due = False
        self._in_flight = False  # a batch is in the SQLite thread
        self._lazy_timer: asyncio.TimerHandle | None = None  # the deadline of lazy and held writes
        self._lazy_due_at = 0.0
        #: write future -> what runs the moment its commit is known to have succeeded (after_commit)
        self._hooks: dict[asyncio.Future[None], list[Callable[[], None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        #: Batches handed to the SQLite thread so far: a write made now joins batch number ``next_batch``.
        self.next_batch = 0
        self.commits = 0
        self._lock_fd: int | None = None

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        """Open (creating or migrating) the database and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = hold_lock(self.path.with_name(self.path.name + ".lock"))
        except LockHeld as exc:  # two main nodes would each take the other's tasks for their own
            raise DatabaseInUse(
                f"another main node{f' (pid {exc.pid})' if exc.pid else ''} is using {self.path}; "
                "stop it first, or give this one another --data-dir."
            ) from None
        try:
            # Legacy transaction mode: writes open a transaction, commit() ends it.
            db = await aiosqlite.connect(str(self.path), isolation_level="DEFERRED")
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute(f"PRAGMA synchronous={'FULL' if self.synchronous == 'full' else 'NORMAL'}")
                await db.execute("PRAGMA foreign_keys=ON")
                await db.execute("PRAGMA busy_timeout=5000")
                await self._migrate(db)
            except BaseException:
                await db.close()
                raise
        except BaseException:
            self._unlock()
            raise
        self._db = db
        self._loop = asyncio.get_running_loop()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the lock

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer retire-cluster (schema {version}); upgrade first."
            )
        if version == SCHEMA_VERSION:
            return
        # A migration may rebuild a table that another references (SQLite's way to change a
        # table): foreign keys are off meanwhile (it cannot change inside a transaction), and
        # each migration must leave none broken before it commits.
        await db.execute("PRAGMA foreign_keys=OFF")
        if version:
            log.info("migrating the database from schema %d to %d (once)", version, SCHEMA_VERSION)
        try:
            for number in range(version, SCHEMA_VERSION):
                await db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            await db.execute(statement)
                    broken = list(await db.execute_fetchall("PRAGMA foreign_key_check"))
                    if broken:
                        raise RuntimeError(f"schema migration {number + 1} would leave {len(broken)} rows "
                                           f"whose reference is missing (first: {tuple(broken[0])})")
                    await db.execute(f"PRAGMA user_version={number + 1}")
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                if version:  # a new database's steps are not news
                    log.info("database schema migrated to version %d", number + 1)
            if not version:
                log.info("created the database %s (schema %d)", self.path, SCHEMA_VERSION)
        finally:
            await db.execute("PRAGMA foreign_keys=ON")

    async def close(self) -> None:
        """Commit what is queued, wait for any commit under way, and close the database."""
        if self._db is None:
            return
        if self._closed is not None:  # a second close() waits for the first one
            await asyncio.shield(self._closed)
            return
        assert self._loop is not None
        self._closing, self._closed = True, self._loop.create_future()
        try:
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            try:
                await self._enqueue([], urgent=True)  # committed after everything queued before it
            except Exception:
                pass  # the failed commit was logged and its waiters told
            db, self._db = self._db, None
            await db.close()
        finally:
            self._unlock()
            self._closed.set_result(None)

    @property
    def is_open(self) -> bool:
        return self._db is not None and not self._closing

    # -- writing ----------------------------------------------------------

    def write(self, ops: Sequence[Op], *, lazy: bool = False, within: float | None = None) -> asyncio.Future[None]:
        """Queue statements for the next group commit; the future resolves after it.

        A ``lazy`` write does not start a commit of its own: it rides along
        with the next one, or is committed after :data:`LAZY_COMMIT_S`. It
        keeps a commit off the critical path of what comes next (a worker's
        result right after its "accepted" ack). ``within`` is the same with a
        deadline of that many seconds (a held submission: its task's result
        may come in time to share the commit).
        """
        if self._db is None or self._closing:
            raise RuntimeError("store is closed")
        if lazy and within is None:
            within = LAZY_COMMIT_S
        fut = self._enqueue(ops, urgent=within is None)
        if within is not None and not self._urgent:
            self._commit_within(within)
        return fut

    def _commit_within(self, seconds: float) -> None:
        """Start a commit at most ``seconds`` from now (an earlier deadline stands)."""
        assert self._loop is not None
        due = self._loop.time() + seconds
        if self._lazy_timer is not None:
            if self._lazy_due_at <= due:
                return
            self._lazy_timer.cancel()
        self._lazy_due_at = due
        self._lazy_timer = self._loop.call_at(due, self._lazy_due)

    def _enqueue(self, ops: Sequence[Op], *, urgent: bool) -> asyncio.Future[None]:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        start = len(self._queue)
        self._queue.extend(ops)
        self._waiters.append(fut)
        self._spans.append((start, len(self._queue)))
        if urgent:
            self._urgent = True
            self._kick()
        return fut

    def after_commit(self, fut: asyncio.Future[None], hook: Callable[[], None]) -> bool:
        """Run ``hook`` in the loop pass that learns ``fut``'s write was committed, before its callbacks run.

        ``fut`` is a future of :meth:`write` not resolved yet (otherwise False, and nothing is kept).
        The hook runs only if that write was committed; after a failed commit it is dropped, and
        the future's callbacks say what happened, as they always do. A reply that only waits for
        the commit leaves in the very pass that hears of it, not two passes later (MainNode.finish).
        """
        if fut.done():
            return False
        self._hooks.setdefault(fut, []).append(hook)
        return True

    def hurry(self) -> None:
        """Commit what is queued at the next loop pass instead of at its deadline."""
        if self._waiters:
            self._urgent = True
            self._kick()

    def _kick(self) -> None:
        """Start a commit at the next loop pass, unless one is under way (its end starts the next).

        Waiting one pass lets what the same burst of events queues next (a
        submission's assignment, say) join this commit.
        """
        if self.in_read:
            self._kick_due = True
        elif self._start_handle is None and not self._in_flight:
            assert self._loop is not None
            self._start_handle = self._loop.call_soon(self._start)

    def start_now(self) -> None:
        """Start the commit asked for during the read that ended, or arranged for the next loop pass, now.

        See MainNode.after_read. One under way is left to end first (its end starts the next).
        """
        due, self._kick_due = self._kick_due, False
        handle = self._start_handle
        if handle is not None:
            handle.cancel()
        if due or handle is not None:
            self._start()

    def _lazy_due(self) -> None:
        self._lazy_timer = None
        self._urgent = True
        self._kick()

    async def flush(self) -> None:
        """Wait until everything queued so far, and any commit under way, is committed."""
        await self.write([])

    def _start(self) -> None:
        """Hand everything queued so far to the SQLite thread as one transaction."""
        self._start_handle = None
        if self._in_flight or not self._waiters or self._db is None:
            return
        ops, waiters, spans = self._queue, self._waiters, self._spans
        self._queue, self._waiters, self._spans, self._urgent = [], [], [], False
        self.next_batch += 1
        if self._lazy_timer is not None:  # what it was armed for is in this commit
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self._in_flight = True
        if not ops:  # flush(): everything before it is committed already
            self._finish(waiters, None, 0)
            return
        db, loop, groups = self._db, self._loop, _grouped(ops)
        assert loop is not None
        tx = getattr(db, "_tx", None)  # aiosqlite's queue of work for its thread (there since 0.17)
        if FAST_COMMIT and tx is not None:
            # One hand-off each way: the batch runs as one function in
            # aiosqlite's thread, which then wakes the loop with the outcome.
            def job() -> None:
                outcome: Outcome = None
                try:
                    _apply_batch(db, groups)
                except _DATA_ERRORS as exc:  # one bad write must not fail the others
                    outcome = _apply_each(db, ops, spans) if len(spans) > 1 else exc
                except BaseException as exc:  # noqa: B036 - every waiter must hear it
                    outcome = exc
                loop.call_soon_threadsafe(self._finish, waiters, outcome, len(ops))

            tx.put_nowait((None, job))
            return
        task = loop.create_task(self._commit_slow_each(db, ops, groups, spans))
        task.add_done_callback(
            lambda t: self._finish(waiters, asyncio.CancelledError() if t.cancelled() else t.exception()
                                   or t.result(), len(ops))  # fmt: skip
        )

    def _finish(self, waiters: list[asyncio.Future[None]], outcome: Outcome, count: int) -> None:
        """A commit ended: resolve its waiters, then start the next one if anything is queued.

        ``outcome`` is None (committed), an exception every waiter hears (a
        disk error), or one outcome per waiter (after a data error each write
        was committed, or refused, on its own).
        """
        self._in_flight = False
        if outcome is None:
            if count:
                self.commits += 1
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        elif isinstance(outcome, list):
            failed = [exc for exc in outcome if exc is not None]
            log.error("a group commit failed on %s; its %d writes were tried one by one and %d of them failed",
                      failed[0] if failed else "a data error", len(outcome), len(failed))
            self.commits += 1
            for fut, exc in zip(waiters, outcome):
                if not fut.done():
                    if exc is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(_unavailable(exc))
        else:  # a disk error: every waiter must hear it
            log.error("commit of %d statements failed", count, exc_info=outcome)
            outcome = _unavailable(outcome)
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(outcome)
        if self._hooks:
            self._run_hooks(waiters, outcome is None)
        if self._urgent:
            self._kick()

    def _run_hooks(self, waiters: list[asyncio.Future[None]], committed: bool) -> None:
        """The hooks of a batch's writes (after_commit): run in the order of the writes when the batch was
        committed whole; dropped when it was not (committed one by one, or not at all: the callbacks answer)."""
        hooks = self._hooks
        for fut in waiters:
            due = hooks.pop(fut, ())
            for hook in due if committed else ():
                try:
                    hook()
                except Exception:  # one hook's bug must not keep the others, or the commit's callbacks, from running
                    log.exception("a hook run after a commit failed")

    async def _commit_slow_each(self, db: aiosqlite.Connection, ops: Sequence[Op],
                                groups: list[tuple[str, list[Sequence[Any]]]],
                                spans: list[tuple[int, int]]) -> Outcome:
        """:meth:`_commit_slow`, then each write alone after a data error (as the one-hop job does)."""
        try:
            await self._commit_slow(db, groups)
        except _DATA_ERRORS:
            if len(spans) == 1:
                raise
            out: list[BaseException | None] = []
            for start, end in spans:
                try:
                    if end > start:
                        await self._commit_slow(db, _grouped(ops[start:end]))
                    out.append(None)
                except Exception as one:
                    out.append(one)
            return out
        return None

    @staticmethod
    async def _commit_slow(db: aiosqlite.Connection, groups: list[tuple[str, list[Sequence[Any]]]]) -> None:
        """The same transaction through aiosqlite's public calls (one hand-off per statement).

        Used when aiosqlite does not expose its work queue, and by the tests
        of this path. Statements are grouped by kind as in :func:`_grouped`;
        sqlite3's legacy transaction mode opens the transaction at the first
        write and commit() ends it.
        """
        try:
            for sql, rows in groups:
                if len(rows) == 1:
                    await db.execute(sql, rows[0])
                else:
                    await db.executemany(sql, rows)
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    # -- statements (built here so SQL stays in this module) --------------

    @staticmethod
    def insert_task(task: Task) -> Op:
        """The insert of a new task; notes the size of its payload as stored on ``task.payload_bytes``."""
        payload = _j(task.payload)
        task.payload_bytes = len(payload) if payload else 0
        return (
            _INSERT_TASK,
            (
                task.task_id, task.seq, task.task_type, payload, task.priority,
                task.timeout_s, _j(task.requirements), task.max_retries,
                int(task.retry_on_timeout), task.idempotency_key, task.status.value,
                task.attempt, task.handbacks, task.assigned_device, _j(task.result), task.error,
                task.execution_time_s, task.created_at, task.assigned_at, task.started_at,
                task.finished_at,
            ),
        )  # fmt: skip

    @staticmethod
    def update_task(task: Task) -> list[Op]:
        """The task row, plus its current attempt row when it has one."""
        ops: list[Op] = [
            (
                _UPDATE_TASK,
                (
                    task.status.value, task.attempt, task.handbacks, task.assigned_device,
                    _j(task.result), task.error, task.execution_time_s, task.assigned_at,
                    task.started_at, task.finished_at, task.task_id,
                ),
            )  # fmt: skip
        ]
        if task.attempts:
            a = task.attempts[-1]
            ops.append(
                (
                    _UPSERT_ATTEMPT,
                    (task.task_id, a.attempt, a.device_id, a.assigned_at, a.started_at,
                     a.finished_at, a.outcome),
                )  # fmt: skip
            )
        return ops

    @staticmethod
    def upsert_device(device: Device) -> Op:
        return (
            _UPSERT_DEVICE,
            (
                device.device_id, _j(device.device_info), _j(device.hardware_specs),
                _j(sorted(device.capabilities)), _j(sorted(device.task_types)), device.max_tasks,
                device.status.value, device.registered_at, device.last_seen, _j(device.metrics),
                device.weight, _j(device.stats.to_json()),
            ),
        )  # fmt: skip

    @staticmethod
    def delete_device(device_id: str) -> Op:
        return (_DELETE_DEVICE, (device_id,))

    @staticmethod
    def forget_tasks(task_ids: Sequence[str]) -> list[Op]:
        """Delete these finished tasks and their attempts (a task not finished is left alone)."""
        return [(_FORGET_ATTEMPTS, (task_id, task_id)) for task_id in task_ids] + [
            (_FORGET_TASK, (task_id,)) for task_id in task_ids]

    @staticmethod
    def touch_device(device: Device) -> Op:
        return (
            _TOUCH_DEVICE,
            (device.status.value, device.last_seen, _j(device.metrics), _j(device.stats.to_json()),
             device.device_id),
        )  # fmt: skip

    # -- reading ----------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is closed")
        return self._db

    async def load_unfinished_tasks(self) -> list[Task]:
        """Every task not in a terminal state, with its attempts (for recovery)."""
        terminal = tuple(s.value for s in TERMINAL_STATUSES)
        marks = ", ".join("?" * len(terminal))
        rows = await self._conn().execute_fetchall(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status NOT IN ({marks}) ORDER BY seq", terminal
        )
        tasks = [_task_from_row(r) for r in rows]
        if tasks:
            by_id = {t.task_id: t for t in tasks}
            attempt_rows = await self._conn().execute_fetchall(
                "SELECT a.task_id, a.attempt, a.device_id, a.assigned_at, a.started_at, "
                "a.finished_at, a.outcome FROM task_attempts a JOIN tasks t USING (task_id) "
                f"WHERE t.status NOT IN ({marks}) ORDER BY a.task_id, a.attempt",
                terminal,
            )
            for row in attempt_rows:
                by_id[row[0]].attempts.append(Attempt(*row[1:]))
        return tasks

    async def max_seq(self) -> int:
        rows = await self._conn().execute_fetchall("SELECT COALESCE(MAX(seq), 0) FROM tasks")
        return int(list(rows)[0][0])

    async def get_task(self, task_id: str) -> Task | None:
        await self.flush()
        rows = list(
            await self._conn().execute_fetchall(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id=?", (task_id,)
            )
        )
        if not rows:
            return None
        task = _task_from_row(rows[0])
        attempt_rows = await self._conn().execute_fetchall(
            "SELECT attempt, device_id, assigned_at, started_at, finished_at, outcome "
            "FROM task_attempts WHERE task_id=? ORDER BY attempt",
            (task_id,),
        )
        task.attempts = [Attempt(*r) for r in attempt_rows]
        return task

    async def find_idempotent(self, key: str) -> Task | None:
        await self.flush()
        rows = list(
            await self._conn().execute_fetchall(
                "SELECT task_id FROM tasks WHERE idempotency_key=?", (key,)
            )
        )
        return await self.get_task(rows[0][0]) if rows else None

    async def idempotency_keys(self, chunk: int = 10_000) -> AsyncIterator[str]:
        """Every idempotency key in the store, read ``chunk`` rows at a time (never all in memory)."""
        async with self._conn().execute(
            "SELECT idempotency_key FROM tasks WHERE idempotency_key IS NOT NULL"
        ) as cursor:
            while rows := await cursor.fetchmany(chunk):
                for row in rows:
                    yield str(row[0])

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        device_id: str | None = None,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks newest first, filtered.

        Read on a connection of its own in a worker thread, not in the commit
        thread: a filter that no index serves (device, type) walks the table,
        and that walk must not hold up the commits meanwhile. WAL lets that
        reader and the writer go on side by side.
        """
        self._conn()  # raises when the store is closed, as the other reads do
        await self.flush()  # what was written before is committed, so this reader sees it
        where, args = [], []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if device_id is not None:
            where.append("assigned_device=?")
            args.append(device_id)
        if task_type is not None:
            where.append("task_type=?")
            args.append(task_type)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks {clause} ORDER BY seq DESC LIMIT ?"
        rows = await asyncio.to_thread(self._read_apart, sql, (*args, int(limit)))
        return [_task_from_row(r) for r in rows]

    async def oldest_tasks(self, after_seq: int, limit: int) -> list[tuple[int, str, str, float, float | None]]:
        """``(seq, task_id, status, created_at, finished_at)`` of up to ``limit`` tasks after ``after_seq``, oldest first.

        Read apart, as :meth:`list_tasks`: the walk of MainNode.forget_finished holds no commit up.
        """
        self._conn()
        sql = "SELECT seq, task_id, status, created_at, finished_at FROM tasks WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = await asyncio.to_thread(self._read_apart, sql, (int(after_seq), int(limit)))
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3]), None if r[4] is None else float(r[4])) for r in rows]

    def _read_apart(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """Runs in a worker thread: ``sql`` on a read-only connection of its own, closed after."""
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    async def count_tasks(self) -> dict[str, int]:
        await self.flush()
        out = {s.value: 0 for s in TaskStatus}
        for status, n in await self._conn().execute_fetchall(
            "SELECT status, COUNT(*) FROM tasks GROUP BY status"
        ):
            out[status] = int(n)
        return out

    async def load_devices(self) -> list[Device]:
        rows = await self._conn().execute_fetchall(
            "SELECT device_id, device_info, hardware_specs, capabilities, task_types, max_tasks, "
            "status, registered_at, last_seen, metrics, weight, stats FROM devices"
        )
        return [
            Device(
                device_id=r[0],
                device_info=_unj(r[1]) or {},
                hardware_specs=_unj(r[2]) or {},
                capabilities=frozenset(_unj(r[3]) or ()),
                task_types=frozenset(_unj(r[4]) or ()),
                max_tasks=int(r[5]),
                status=DeviceStatus(r[6]),
                registered_at=float(r[7]),
                last_seen=float(r[8]),
                metrics=_unj(r[9]) or {},
                weight=float(r[10]),
                stats=DeviceStats.from_json(_unj(r[11])),
            )
            for r in rows
        ]

    async def integrity_check(self) -> str:
        rows = list(await self._conn().execute_fetchall("PRAGMA integrity_check"))
        return str(rows[0][0])


def _task_from_row(r: Sequence[Any]) -> Task:
    return Task(
        task_id=r[0],
        seq=int(r[1]),
        task_type=r[2],
        payload=_unj(r[3]) or {},
        payload_bytes=len(r[3]) if r[3] else 0,
        priority=int(r[4]),
        timeout_s=float(r[5]),
        requirements=_unj(r[6]) or {},
        max_retries=int(r[7]),
        retry_on_timeout=bool(r[8]),
        idempotency_key=r[9],
        status=TaskStatus(r[10]),
        attempt=int(r[11]),
        handbacks=int(r[12]),
        assigned_device=r[13],
        result=_unj(r[14]),
        error=r[15],
        execution_time_s=r[16],
        created_at=float(r[17]),
        assigned_at=r[18],
        started_at=r[19],
        finished_at=r[20],
    )
