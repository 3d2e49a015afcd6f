"""Task.to_record: the wire form of a task, with its times as RFC 3339 UTC strings."""

from __future__ import annotations

from retire_cluster.main import tasks as tasks_module
from retire_cluster.main.tasks import Attempt, Task
from retire_cluster.protocol.messages import utc_timestamp


def make_task(t0: float) -> Task:
    task = Task(task_id="t1", task_type="echo", payload={"x": 1}, priority=5, timeout_s=60.0,
                requirements={}, max_retries=3, created_at=t0, seq=1)
    task.attempt, task.assigned_device = 1, "dev-1"
    task.assigned_at, task.started_at, task.finished_at = t0 + 0.0004, t0 + 0.0015, t0 + 2.0
    task.attempts.append(Attempt(1, "dev-1", task.assigned_at, task.started_at, task.finished_at, "completed"))
    return task


def test_record_times_are_the_formatted_times_each_time() -> None:
    t0 = 1_800_000_000.25
    task = make_task(t0)
    for _ in range(2):  # the second record reuses the formatted strings
        record = task.to_record()
        assert record["created_at"] == utc_timestamp(t0) == "2027-01-15T08:00:00.250Z"
        assert record["assigned_at"] == utc_timestamp(t0 + 0.0004)
        assert record["finished_at"] == utc_timestamp(t0 + 2.0) == "2027-01-15T08:00:02.250Z"
        assert record["attempts"][0]["started_at"] == record["started_at"] == utc_timestamp(t0 + 0.0015)
    assert task.to_record()["attempts"][0]["outcome"] == "completed"


def test_formatted_times_kept_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(tasks_module, "_MAX_STAMPS", 8)
    monkeypatch.setattr(tasks_module, "_STAMPS", {})
    for i in range(50):
        record = make_task(1_800_000_000.0 + i).to_record()
        assert record["created_at"] == utc_timestamp(1_800_000_000.0 + i)
        assert len(tasks_module._STAMPS) <= 8
