"""The store: schema version and WAL, exact round trips, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from retire_cluster.main import store as store_module
from retire_cluster.main.registry import Device
from retire_cluster.main.store import SCHEMA_VERSION, Store
from retire_cluster.main.tasks import Attempt, Task
from retire_cluster.protocol.messages import DeviceStatus, TaskStatus


def make_task(n: int, **kw) -> Task:
    fields = dict(task_id=f"t{n}", task_type="echo", payload={"message": f"m{n}"}, priority=5,
                  timeout_s=60.0, requirements={}, max_retries=3, created_at=1000.0 + n, seq=n)
    fields.update(kw)
    return Task(**fields)


@pytest.fixture(params=["one-hop", "per-statement"])
async def store(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Both commit paths: the whole batch in aiosqlite's thread, and one executemany per kind."""
    monkeypatch.setattr(store_module, "FAST_COMMIT", request.param == "one-hop")
    s = Store(tmp_path / "db" / "cluster.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_new_database_is_wal_with_schema_version(store: Store) -> None:
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_status", "tasks_idempotency"} <= indexes
    assert not {"tasks_device", "tasks_type", "tasks_seq"} & indexes  # migration 3 dropped them


async def test_a_listing_is_read_apart_from_the_commit_thread(tmp_path: Path) -> None:
    """A filter no index serves walks the table; before, it did so in the commit thread, holding every
    commit up meanwhile. Here the commit thread is held up on purpose while a listing runs."""
    import threading

    s = Store(tmp_path / "cluster.db")
    await s.open()
    release = threading.Event()
    try:
        await s.write([Store.insert_task(make_task(n)) for n in range(1, 4)])
        s._conn()._tx.put_nowait((None, lambda: release.wait(30)))  # aiosqlite's thread is busy now
        listed = await asyncio.wait_for(s.list_tasks(task_type="echo"), 20)  # a hang guard, not a timing
        assert [t.task_id for t in listed] == ["t3", "t2", "t1"] and not release.is_set()
    finally:
        release.set()
        await s.close()


def _wal_frames(path: Path) -> int:
    """Frames (pages) in the WAL file: its 32-byte header, then (24-byte header + page) each."""
    wal = path.with_name(path.name + "-wal")
    page_size = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    return (wal.stat().st_size - 32) // (24 + page_size) if wal.exists() and wal.stat().st_size else 0


async def test_a_tasks_commit_writes_four_pages(store: Store) -> None:
    """A finished task's row and its attempt in one commit: 4 b-tree pages (8 before schema 3).

    The table (keyed by seq), the task_id index, the status index and the
    attempts table (no rowid: its key is its only b-tree); the WAL gets one
    frame per page. Before schema 3 the seq, assigned_device and task_type
    indexes and the attempts' rowid and autoindex made it 8.
    """
    for n in range(1, 4):  # the first commits also write the pages that were empty
        await store.write([Store.insert_task(make_task(n))])
    task = make_task(4, status=TaskStatus.COMPLETED, attempt=1, assigned_device="d", assigned_at=5.0,
                     finished_at=6.0, result={"output": "ok"})
    task.attempts.append(Attempt(1, "d", 5.0, 5.5, 6.0, "completed"))
    before = _wal_frames(store.path)
    await store.write([Store.insert_task(task), *Store.update_task(task)])
    assert _wal_frames(store.path) - before == 4


def _v2_database(path: Path) -> None:
    """A database as schema 2 left it, with two tasks that share a seq (nothing stopped that then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    for script in store_module.MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    cols = ("task_id, seq, task_type, payload, priority, timeout_s, requirements, max_retries, idempotency_key, "
            "status, attempt, assigned_device, result, created_at, assigned_at, finished_at")
    rows = [("a", 1, "echo", '{"message":"1"}', 5, 60.0, "{}", 3, None, "completed", 1, "d1", '{"output":"1"}',
             1.0, 1.5, 2.0),
            ("b", 2, "sleep", '{"seconds":1}', 5, 60.0, "{}", 3, "key-b", "running", 1, "d2", None, 2.0, 2.5, None),
            ("c", 2, "echo", '{"message":"3"}', 9, 60.0, "{}", 3, None, "pending", 0, None, None, 3.0, None, None)]
    db.executemany(f"INSERT INTO tasks ({cols}) VALUES ({', '.join('?' * 16)})", rows)
    db.executemany("INSERT INTO task_attempts (task_id, attempt, device_id, assigned_at, started_at, finished_at, "
                   "outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [("a", 1, "d1", 1.5, 1.6, 2.0, "completed"), ("b", 1, "d2", 2.5, 2.6, None, None)])
    db.commit()
    db.close()


async def test_a_new_database_says_so_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, a first start logged "database schema migrated to version 1", 2 and 3: news of nothing."""
    s = Store(tmp_path / "cluster.db")
    with caplog.at_level("INFO", logger="retire_cluster.store"):
        await s.open()
    await s.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"created the database {tmp_path / 'cluster.db'} (schema {SCHEMA_VERSION})"]


async def test_a_schema_2_database_is_migrated_with_every_task_and_attempt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "db" / "cluster.db"
    _v2_database(path)
    s = Store(path)
    with caplog.at_level("INFO", logger="retire_cluster.store"):
        await s.open()
    assert [r.getMessage() for r in caplog.records] == [
        "migrating the database from schema 2 to 3 (once)", "database schema migrated to version 3"]
    try:
        assert [t.task_id for t in await s.list_tasks()] == ["c", "b", "a"]  # newest first, as before
        assert await s.max_seq() == 3  # the shared seq was renumbered in order
        assert [t.task_id for t in await s.list_tasks(device_id="d2")] == ["b"]
        assert [t.task_id for t in await s.list_tasks(task_type="echo")] == ["c", "a"]
        unfinished = await s.load_unfinished_tasks()
        assert [(t.task_id, [a.device_id for a in t.attempts]) for t in unfinished] == [("b", ["d2"]), ("c", [])]
        a = await s.get_task("a")
        assert a is not None and a.result == {"output": "1"} and a.attempts[0].outcome == "completed"
        found = await s.find_idempotent("key-b")
        assert found is not None and found.task_id == "b"
        await s.write([Store.insert_task(make_task(4, task_id="d", seq=4))])  # the store goes on
        with pytest.raises(Exception):  # foreign keys are on again: no attempt of a task that is not there
            await s.write([(store_module._UPSERT_ATTEMPT, ("nope", 1, "d1", 1.0, None, None, None))])
    finally:
        await s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"devices", "tasks", "task_attempts"}
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_reopen_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "cluster.db"
    for _ in range(2):
        s = Store(path)
        await s.open()
        await s.write([Store.insert_task(make_task(len(await s.list_tasks())))])
        await s.flush()
        await s.close()
    s = Store(path)
    await s.open()
    assert len(await s.list_tasks()) == 2
    await s.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    s = Store(path)
    with pytest.raises(RuntimeError, match="newer retire-cluster"):
        await s.open()
    assert not s.is_open


async def test_odd_strings_round_trip_exactly(store: Store) -> None:
    odd = "quote ' double \" back \\ emoji 🛰️ rtl \u202e long " + "x" * 100_000
    task = make_task(1, task_id="id 'with' \"quotes\" 🙂", payload={"message": odd, "nested": [odd, {"k": odd}]},
                     requirements={"role": "o'role"})
    await store.write([Store.insert_task(task)])
    back = await store.get_task(task.task_id)
    assert back is not None
    assert back.payload == task.payload and back.requirements == task.requirements
    device = Device("dev ' 🙂", device_info={"hostname": odd}, capabilities=frozenset({"a'b"}),
                    task_types=frozenset({"echo"}), status=DeviceStatus.ONLINE)
    await store.write([Store.upsert_device(device)])
    loaded = {d.device_id: d for d in await store.load_devices()}
    assert loaded["dev ' 🙂"].device_info["hostname"] == odd
    assert loaded["dev ' 🙂"].capabilities == frozenset({"a'b"})


async def test_updates_and_attempts_persist(store: Store) -> None:
    task = make_task(1)
    await store.write([Store.insert_task(task)])
    task.status, task.attempt, task.assigned_device, task.assigned_at = TaskStatus.ASSIGNED, 1, "d", 5.0
    task.attempts.append(Attempt(1, "d", 5.0))
    await store.write(Store.update_task(task))
    unfinished = await store.load_unfinished_tasks()
    assert [(t.task_id, t.status, t.attempts[0].device_id) for t in unfinished] == [("t1", TaskStatus.ASSIGNED, "d")]
    task.status, task.result, task.finished_at = TaskStatus.COMPLETED, {"output": "ok"}, 9.0
    task.attempts[0].outcome = "completed"
    await store.write(Store.update_task(task))
    assert await store.load_unfinished_tasks() == []
    assert (await store.get_task("t1")).result == {"output": "ok"}
    assert (await store.count_tasks())["completed"] == 1


async def test_each_row_is_written_once_per_commit(store: Store) -> None:
    """pending -> assigned -> running -> completed queued together: one insert and one attempt row."""
    task = make_task(1)
    ops = [Store.insert_task(task)]
    task.status, task.attempt, task.assigned_device, task.assigned_at = TaskStatus.ASSIGNED, 1, "d", 5.0
    task.attempts.append(Attempt(1, "d", 5.0))
    ops += Store.update_task(task)
    task.status, task.started_at = TaskStatus.RUNNING, 6.0
    task.attempts[0].started_at = 6.0
    ops += Store.update_task(task)
    task.status, task.result, task.finished_at = TaskStatus.COMPLETED, {"output": "ok"}, 7.0
    task.attempts[0].finished_at, task.attempts[0].outcome = 7.0, "completed"
    ops += Store.update_task(task)
    groups = store_module._grouped(ops)
    assert [len(rows) for _sql, rows in groups] == [1, 1]
    futures = [store.write([op]) for op in ops]  # all queued before the writer runs: one commit
    await asyncio.gather(*futures)
    back = await store.get_task("t1")
    assert back is not None and back.status is TaskStatus.COMPLETED and back.result == {"output": "ok"}
    assert (back.started_at, back.finished_at, back.assigned_device) == (6.0, 7.0, "d")
    assert [(a.started_at, a.finished_at, a.outcome) for a in back.attempts] == [(6.0, 7.0, "completed")]


async def test_device_upsert_wins_over_touches_queued_before_it(store: Store) -> None:
    device = Device("d1", status=DeviceStatus.ONLINE, last_seen=1.0)
    ops = [Store.touch_device(device)]
    device.status, device.last_seen = DeviceStatus.OFFLINE, 2.0
    ops.append(Store.upsert_device(device))
    await store.write(ops)
    (back,) = await store.load_devices()
    assert (back.status, back.last_seen) == (DeviceStatus.OFFLINE, 2.0)
    device.status, device.last_seen = DeviceStatus.ONLINE, 3.0
    await store.write([Store.upsert_device(device), Store.touch_device(Device("d1", last_seen=4.0))])
    (back,) = await store.load_devices()
    assert back.last_seen == 4.0  # a touch after the upsert still lands


async def test_duplicate_insert_in_one_batch_still_fails(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await store.write([Store.insert_task(make_task(1)), Store.insert_task(make_task(1))])
    assert await store.list_tasks() == []


async def test_group_commit_batches_concurrent_writes(store: Store) -> None:
    before = store.commits
    futures = [store.write([Store.insert_task(make_task(n))]) for n in range(200)]
    await asyncio.gather(*futures)
    assert store.commits - before < 200
    assert len(await store.list_tasks(limit=1000)) == 200


async def test_failed_commit_reaches_every_waiter_and_store_goes_on(store: Store) -> None:
    await store.write([Store.insert_task(make_task(1))])
    dup = store.write([Store.insert_task(make_task(1))])  # same primary key
    with pytest.raises(sqlite3.IntegrityError):
        await dup
    await store.write([Store.insert_task(make_task(2))])
    assert {t.task_id for t in await store.list_tasks()} == {"t1", "t2"}


async def test_list_filters_newest_first(store: Store) -> None:
    ops = [Store.insert_task(make_task(n, task_type="echo" if n % 2 else "sleep")) for n in range(1, 7)]
    await store.write(ops)
    assert [t.task_id for t in await store.list_tasks(task_type="echo")] == ["t5", "t3", "t1"]
    assert [t.task_id for t in await store.list_tasks(limit=2)] == ["t6", "t5"]
    assert await store.integrity_check() == "ok"


def test_installed_aiosqlite_offers_the_one_hop_commit() -> None:
    """If a new aiosqlite drops Connection._execute, commits fall back to more hops: notice it here."""
    import aiosqlite

    assert callable(getattr(aiosqlite.Connection, "_execute", None))


async def test_one_bad_write_fails_alone_and_the_rest_of_its_group_commit_lands(store: Store) -> None:
    """A NaN timeout once reached the store: its NOT NULL failure rolled back every write in the commit."""
    first = store.write([Store.insert_task(make_task(1))])
    bad = store.write([Store.insert_task(make_task(2, timeout_s=None))])  # NOT NULL constraint
    after = store.write([Store.insert_task(make_task(3)), Store.insert_task(make_task(4))])
    also_bad = store.write([Store.insert_task(make_task(1))])  # the same id again
    outcomes = await asyncio.gather(first, bad, after, also_bad, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], sqlite3.IntegrityError) and isinstance(outcomes[3], sqlite3.IntegrityError)
    assert sorted(t.task_id for t in await store.list_tasks()) == ["t1", "t3", "t4"]
    # The next commit is a group commit again, and a lone bad write still fails (on its own).
    await store.write([Store.insert_task(make_task(5))])
    with pytest.raises(sqlite3.IntegrityError):
        await store.write([Store.insert_task(make_task(6, timeout_s=None))])
    assert len(await store.list_tasks()) == 4


async def test_hooks_after_a_commit_run_in_write_order_before_any_callback(store: Store,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Store.after_commit: in the pass that hears of the commit, its futures settled, a failing hook alone."""
    seen: list[str] = []
    first = store.write([Store.insert_task(make_task(1))])
    second = store.write([Store.insert_task(make_task(2))])
    first.add_done_callback(lambda f: seen.append("callback"))  # a loop pass after the commit's end

    def failing() -> None:
        raise RuntimeError("a bug in a hook")

    assert store.after_commit(second, lambda: seen.append(f"second done={second.done()}"))
    assert store.after_commit(first, lambda: seen.append(f"first done={first.done()}"))
    assert store.after_commit(first, failing)
    assert store.after_commit(first, lambda: seen.append("first again"))
    await asyncio.gather(first, second)
    assert seen[:3] == ["first done=True", "first again", "second done=True"]
    assert "callback" in seen[3:]
    assert "a hook run after a commit failed" in caplog.text
    assert not store.after_commit(first, lambda: seen.append("too late"))  # committed already: not kept
    await store.write([])
    assert "too late" not in seen and not store._hooks


async def test_hooks_of_writes_that_were_not_committed_are_dropped(store: Store) -> None:
    await store.write([Store.insert_task(make_task(1))])
    seen: list[str] = []
    good = store.write([Store.insert_task(make_task(2))])
    dup = store.write([Store.insert_task(make_task(1))])  # fails: the batch is committed write by write
    store.after_commit(good, lambda: seen.append("good"))
    store.after_commit(dup, lambda: seen.append("dup"))
    outcomes = await asyncio.gather(good, dup, return_exceptions=True)
    assert outcomes[0] is None and isinstance(outcomes[1], sqlite3.IntegrityError)
    assert seen == [] and not store._hooks  # not a whole commit: the futures' callbacks answer
