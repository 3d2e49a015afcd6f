"""The scheduler alone: no sockets, no clock."""

from __future__ import annotations

from retire_cluster.main.registry import Device, device_matches
from retire_cluster.main.scheduler import Scheduler
from retire_cluster.main.tasks import Task
from retire_cluster.protocol.messages import DeviceStatus, TaskStatus


class FakeConn:
    closed = False


def device(name: str, cores: int = 2, mem_gb: float = 4, slots: int = 1, types=("echo",), role="worker",
           caps=("computational",), cpu=0.0, platform="linux") -> Device:
    return Device(name, device_info={"role": role, "platform": platform, "architecture": "x86_64"},
                  hardware_specs={"cpu_cores": cores, "memory_total": int(mem_gb * 2**30)},
                  capabilities=frozenset(caps), task_types=frozenset(types), max_tasks=slots,
                  status=DeviceStatus.ONLINE, conn=FakeConn(), metrics={"cpu_usage": cpu})


def task(n: int, priority: int = 5, task_type: str = "echo", **req) -> Task:
    return Task(f"t{n}", task_type, {}, priority, 60.0, req, 3, 0.0, n)


def test_priority_then_fifo_across_classes() -> None:
    s = Scheduler()
    tasks = [task(1, 1), task(2, 5), task(3, 20, min_cpu_cores=1), task(4, 5), task(5, 10, role="worker")]
    s.extend(tasks)
    plan = s.pick([device("d", slots=5)])
    assert [t.task_id for t, _ in plan] == ["t3", "t5", "t2", "t4", "t1"]


def test_slots_limit_the_plan_and_the_rest_stays_queued() -> None:
    s = Scheduler()
    s.extend(task(n) for n in range(5))
    plan = s.pick([device("a", slots=2), device("b", slots=1)])
    assert len(plan) == 3 and len(s) == 2
    assert sorted(d.device_id for _, d in plan) == ["a", "a", "b"]


def test_blocked_class_does_not_block_others() -> None:
    s = Scheduler()
    s.push(task(1, 20, min_cpu_cores=64))
    s.push(task(2, 1))
    plan = s.pick([device("small")])
    assert [t.task_id for t, _ in plan] == ["t2"]
    assert len(s) == 1
    assert s.blocked_classes([device("small")]) == [("echo", {"min_cpu_cores": 64})]


def test_cancelled_pending_tasks_are_skipped() -> None:
    s = Scheduler()
    first, second = task(1), task(2)
    s.extend([first, second])
    first.status = TaskStatus.CANCELLED
    assert [t.task_id for t, _ in s.pick([device("d", slots=2)])] == ["t2"]
    assert len(s) == 0


def test_least_loaded_prefers_free_slots_then_low_cpu() -> None:
    s = Scheduler()
    s.extend([task(1), task(2), task(3)])
    busy = device("busy", slots=1, cpu=90.0)
    idle = device("idle", slots=1, cpu=5.0)
    roomy = device("roomy", slots=3, cpu=50.0)
    plan = s.pick([busy, idle, roomy])
    assert [d.device_id for _, d in plan][0] == "roomy"
    plan_ids = [d.device_id for _, d in plan]
    assert plan_ids.count("roomy") >= 1 and "busy" not in plan_ids[:2]


def test_device_matches_every_requirement() -> None:
    d = device("d", cores=4, mem_gb=8, types=("echo", "python_eval"), role="compute", caps=("gpu", "computational"))
    assert device_matches(d, "echo", {})
    assert not device_matches(d, "command", {})
    assert device_matches(d, "echo", {"min_cpu_cores": 4, "min_memory_gb": 8})
    assert not device_matches(d, "echo", {"min_cpu_cores": 5})
    assert not device_matches(d, "echo", {"min_memory_gb": 8.5})
    assert device_matches(d, "echo", {"role": "compute", "platform": "linux", "architecture": "x86_64"})
    assert not device_matches(d, "echo", {"platform": "android"})
    assert device_matches(d, "echo", {"capabilities": ["gpu"]})
    assert not device_matches(d, "echo", {"capabilities": ["gpu", "camera"]})


def test_no_devices_means_no_plan_and_nothing_lost() -> None:
    s = Scheduler()
    s.extend(task(n) for n in range(3))
    assert s.pick([]) == []
    assert len(s) == 3
