"""The scheduler and its strategies alone: no sockets, time is an argument."""

from __future__ import annotations

from collections import Counter

import pytest

from retire_cluster.main.health import CircuitBreaker
from retire_cluster.main.registry import Device, device_matches
from retire_cluster.main.scheduler import EXPLAIN_TTL_S, Scheduler
from retire_cluster.main.tasks import Task
from retire_cluster.protocol.messages import DeviceStatus, TaskStatus

NOW = 1000.0


class FakeConn:
    closed = False


def device(name: str, cores: int = 2, mem_gb: float = 4, slots: int = 1, types=("echo",), role="worker",
           caps=("computational",), cpu=0.0, platform="linux", weight=1.0) -> Device:
    return Device(name, device_info={"role": role, "platform": platform, "architecture": "x86_64"},
                  hardware_specs={"cpu_cores": cores, "memory_total": int(mem_gb * 2**30)},
                  capabilities=frozenset(caps), task_types=frozenset(types), max_tasks=slots,
                  status=DeviceStatus.ONLINE, conn=FakeConn(), metrics={"cpu_usage": cpu}, weight=weight)


def task(n: int, priority: int = 5, task_type: str = "echo", **req) -> Task:
    return Task(f"t{n}", task_type, {}, priority, 60.0, req, 3, 0.0, n)


def scheduler(*devices: Device, strategy: str = "least_loaded") -> Scheduler:
    s = Scheduler(strategy)
    for d in devices:
        s.update_device(d, NOW)
    return s


def finish(s: Scheduler, t: Task, d: Device) -> None:
    t.status = TaskStatus.COMPLETED
    d.running.discard(t.task_id)
    s.update_device(d, NOW)


def test_priority_then_fifo_across_classes() -> None:
    s = scheduler(device("d", slots=5))
    s.extend([task(1, 1), task(2, 5), task(3, 20, min_cpu_cores=1), task(4, 5), task(5, 10, role="worker")])
    plan = s.pick(NOW)
    assert [t.task_id for t, _ in plan] == ["t3", "t5", "t2", "t4", "t1"]


def test_slots_limit_the_plan_reserve_slots_and_the_rest_stays_queued() -> None:
    a, b = device("a", slots=2), device("b", slots=1)
    s = scheduler(a, b)
    s.extend(task(n) for n in range(5))
    plan = s.pick(NOW)
    assert len(plan) == 3 and len(s) == 2
    assert sorted(d.device_id for _, d in plan) == ["a", "a", "b"]
    assert len(a.running) == 2 and len(b.running) == 1
    assert s.pick(NOW) == []
    finish(s, *plan[0])
    assert len(s.pick(NOW)) == 1


def test_blocked_class_does_not_block_others() -> None:
    s = scheduler(device("small"))
    s.push(task(1, 20, min_cpu_cores=64))
    s.push(task(2, 1))
    plan = s.pick(NOW)
    assert [t.task_id for t, _ in plan] == ["t2"]
    assert len(s) == 1
    assert s.stuck(NOW) == [{"task_type": "echo", "requirements": {"min_cpu_cores": 64}, "tasks": 1,
                          "reason": "the one device that runs 'echo' does not meet min_cpu_cores=64; "
                                    "`retire-cluster devices` shows what each has."}]


def test_device_that_appears_later_is_used_for_an_existing_class() -> None:
    s = scheduler()
    s.push(task(1, min_cpu_cores=8))
    assert s.pick(NOW) == []
    big = device("big", cores=8)
    s.update_device(big, NOW)
    assert [(t.task_id, d.device_id) for t, d in s.pick(NOW)] == [("t1", "big")]


def test_unavailable_devices_are_skipped() -> None:
    gone, paused, ok = device("gone"), device("paused"), device("ok")
    gone.conn = None
    paused.accepting = False
    s = scheduler(gone, paused, ok)
    s.push(task(1))
    assert [d.device_id for _, d in s.pick(NOW)] == ["ok"]


def test_cancelled_pending_tasks_are_skipped() -> None:
    s = scheduler(device("d", slots=2))
    first, second = task(1), task(2)
    s.extend([first, second])
    first.status = TaskStatus.CANCELLED
    assert [t.task_id for t, _ in s.pick(NOW)] == ["t2"]
    assert len(s) == 0


def test_least_loaded_prefers_free_slots_then_low_cpu() -> None:
    busy, idle, roomy = device("busy", cpu=90.0), device("idle", cpu=5.0), device("roomy", slots=3, cpu=50.0)
    s = scheduler(busy, idle, roomy)
    s.extend(task(n) for n in range(4))
    order = [d.device_id for _, d in s.pick(NOW)]
    # roomy has the most free slots until it is down to one, like the others; then cpu decides
    assert order == ["roomy", "roomy", "idle", "roomy"]


def test_least_connections_counts_running_tasks() -> None:
    a, b = device("a", slots=4), device("b", slots=4)
    a.running.update({"x", "y"})
    s = scheduler(a, b, strategy="least_connections")
    s.extend(task(n) for n in range(3))
    assert [d.device_id for _, d in s.pick(NOW)] == ["b", "b", "a"]


def test_round_robin_rotates() -> None:
    devs = [device(n, slots=10) for n in "abc"]
    s = scheduler(*devs, strategy="round_robin")
    s.extend(task(n) for n in range(7))
    assert [d.device_id for _, d in s.pick(NOW)] == list("abcabca")


def test_weighted_round_robin_is_proportional_and_smooth() -> None:
    a, b, c = device("a", slots=100, weight=5), device("b", slots=100, weight=1), device("c", slots=100, weight=1)
    s = scheduler(a, b, c, strategy="weighted_round_robin")
    s.extend(task(n) for n in range(70))
    order = [d.device_id for _, d in s.pick(NOW)]
    assert Counter(order) == {"a": 50, "b": 10, "c": 10}
    first = "".join(order[:7])
    assert Counter(first) == {"a": 5, "b": 1, "c": 1}
    assert "aaaaa" not in first  # interleaved, not a burst


def test_response_time_prefers_the_fast_device_but_spreads_load() -> None:
    fast, slow = device("fast", slots=10), device("slow", slots=10)
    fast.stats.ewma_s["echo"] = 0.1
    slow.stats.ewma_s["echo"] = 1.0
    s = scheduler(fast, slow, strategy="response_time")
    s.extend(task(n) for n in range(12))
    order = [d.device_id for _, d in s.pick(NOW)]
    assert order[0] == "fast"
    assert order.count("fast") == 10 and order.count("slow") == 2


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        Scheduler("random")


def test_open_breaker_keeps_work_away_until_half_open_trial() -> None:
    flaky = device("flaky", slots=5)
    flaky.breaker = CircuitBreaker(failures=2, reset_s=30)
    s = scheduler(flaky)
    assert not flaky.breaker.on_failure(NOW)
    assert flaky.breaker.on_failure(NOW)  # second failure opens it
    s.update_device(flaky, NOW)
    s.extend(task(n) for n in range(3))
    assert s.pick(NOW + 29) == []
    s.update_device(flaky, NOW + 30)
    plan = s.pick(NOW + 30)
    assert len(plan) == 1 and flaky.breaker.state == "half_open"  # exactly one trial
    assert flaky.breaker.on_failure(NOW + 31)  # the trial failed: open again
    s.update_device(flaky, NOW + 31)
    assert s.pick(NOW + 40) == []
    s.update_device(flaky, NOW + 61)
    (trial, _), = s.pick(NOW + 61)
    flaky.breaker.on_success()
    finish(s, trial, flaky)
    assert flaky.breaker.state == "closed" and len(s.pick(NOW + 62)) == 1


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


def test_stale_device_entries_do_not_grow_without_bound() -> None:
    d = device("d", slots=1)
    s = scheduler(d)
    s.push(task(1))
    for _ in range(10_000):  # e.g. a heartbeat per second for hours
        s.update_device(d, NOW)
    cls = next(iter(s._classes.values()))
    assert len(cls.devices) <= 2 * len(cls.eligible) + 65


def test_no_devices_means_no_plan_and_nothing_lost() -> None:
    s = scheduler()
    s.extend(task(n) for n in range(3))
    assert s.pick(NOW) == []
    assert len(s) == 3


def test_a_class_that_runs_empty_keeps_its_device_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks arriving one at a time must not re-match every device each time (O(devices) per task)."""
    from retire_cluster.main import scheduler as scheduler_module

    devices = [device(f"d{i}") for i in range(50)]
    s = scheduler(*devices)
    calls = Counter()
    real = scheduler_module.device_matches

    def counted(*args, **kwargs):
        calls["matches"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "device_matches", counted)
    for n in range(20):
        s.push(task(n))
        ((t, d),) = s.pick(NOW)
        finish(s, t, d)
    # The class was matched against the 50 devices once; after that only the
    # device that changed is re-checked (when it takes the task and when it is done).
    assert calls["matches"] == 50 + 2 * 20
    assert s.stuck(NOW) == []  # an empty class is not reported as stuck


def test_empty_classes_kept_are_bounded_and_evicted_oldest_first() -> None:
    from retire_cluster.main.scheduler import MAX_EMPTY_CLASSES

    d = device("d", slots=1, types=("echo", "other"))
    s = scheduler(d)
    for n in range(MAX_EMPTY_CLASSES + 5):
        s.push(task(n, min_memory_gb=n / 100))  # a class of its own each
        ((t, _),) = s.pick(NOW)
        finish(s, t, d)
        s.pick(NOW)  # the class is seen empty
    assert len(s._classes) == MAX_EMPTY_CLASSES
    # an evicted class comes back on its next task, and it still runs
    s.push(task(1000, min_memory_gb=0.0))
    ((t, got),) = s.pick(NOW)
    assert t.task_id == "t1000" and got is d


def test_a_pass_looks_only_at_classes_with_queued_tasks() -> None:
    d = device("d", slots=1)
    s = scheduler(d)
    for n in range(30):  # thirty classes, each emptied
        s.push(task(n, min_memory_gb=n / 100))
        ((t, _),) = s.pick(NOW)
        finish(s, t, d)
        s.pick(NOW)
    looked: list = []
    real_head = s._head
    s._head = lambda cls: looked.append(cls.key) or real_head(cls)  # type: ignore[method-assign]
    s.push(task(99))
    assert [t.task_id for t, _ in s.pick(NOW)] == ["t99"]
    assert len(looked) <= 2  # the one class with work (and its next head), not the thirty kept empty


# -- why a pending task waits -----------------------------------------------------


def test_explain_says_why_no_known_device_can_run_a_task() -> None:
    assert scheduler().explain(queued(scheduler(), task(1)), NOW) is None  # not queued in that scheduler
    empty = scheduler()
    assert "no device has joined yet" in empty.explain(queued(empty, task(1)), NOW)

    s = scheduler(device("pi", types=("echo", "sleep")), device("nas", types=("echo",), mem_gb=7.5))
    assert s.explain(queued(s, task(1, task_type="frobnicate")), NOW) == (
        "no device runs 'frobnicate' tasks (they run echo, sleep); start a worker that offers it.")
    typo = scheduler(device("pi", types=("echo", "sleep")))
    assert typo.explain(queued(typo, task(5, task_type="ecoh")), NOW) == (  # told the type it is close to
        "no device runs 'ecoh' tasks (they run echo, sleep); did you mean 'echo'? "
        "Otherwise start a worker that offers it.")
    assert "`retire-cluster worker --allow command`" in s.explain(queued(s, task(2, task_type="command")), NOW)
    assert s.explain(queued(s, task(3, min_memory_gb=64.0, platform="linux")), NOW) == (
        "none of the 2 devices that run 'echo' meets min_memory_gb=64; "
        "`retire-cluster devices` shows what each has.")
    both = task(4, min_memory_gb=6.0, capabilities=["gpu"])
    s.update_device(device("gpu-box", caps=("gpu",), mem_gb=2), NOW)
    assert s.explain(queued(s, both), NOW) == (
        "no single device that runs 'echo' meets all of the requirements together "
        "(capabilities=gpu, min_memory_gb=6).")
    assert [(c["task_type"], c["tasks"]) for c in s.stuck(NOW)] == [
        ("frobnicate", 1), ("command", 1), ("echo", 1), ("echo", 1)]


def test_explain_counts_why_each_matching_device_is_not_free() -> None:
    busy, paused, gone, away, resting = (device(n) for n in ("busy", "paused", "gone", "away", "resting"))
    busy.running.add("other")
    paused.accepting, paused.reason = False, "battery 15% below 20%"
    gone.status = DeviceStatus.OFFLINE
    away.conn = None
    resting.breaker = CircuitBreaker(failures=1, reset_s=60.0)
    resting.breaker.on_failure(NOW)
    s = scheduler(busy, paused, gone, away, resting)
    t = queued(s, task(1))
    assert s.pick(NOW) == []
    assert s.explain(t, NOW) == (
        "5 devices can run it and none is free: 1 busy, 1 offline, "
        "1 paused by its owner's policy (battery 15% below 20%), 1 reconnecting, 1 resting after failures (circuit breaker open).")
    assert s.stuck(NOW) == []  # devices can run it: it waits, it is not stuck
    busy.running.clear()
    s.update_device(busy, NOW)
    assert s.explain(t, NOW + 0.5).startswith("5 devices can run it")  # reused for EXPLAIN_TTL_S
    later = NOW + EXPLAIN_TTL_S
    assert s.explain(t, later) == "a device that can run it is free; it goes out at the next scheduling pass."
    assert [d.device_id for _, d in s.pick(later)] == ["busy"]
    t.status = TaskStatus.ASSIGNED
    assert s.explain(t, later) is None  # no longer pending


def test_an_explanation_is_worked_out_once_per_class_and_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    from retire_cluster.main import scheduler as scheduler_module

    s = scheduler(*(device(f"d{i}") for i in range(10)))
    tasks = [queued(s, task(n, min_cpu_cores=4)) for n in range(100)]
    calls = Counter()
    real = scheduler_module.device_matches
    monkeypatch.setattr(scheduler_module, "device_matches", lambda *a: calls.update(["m"]) or real(*a))
    assert len({s.explain(t, NOW) for t in tasks}) == 1
    assert s.stuck(NOW)[0]["tasks"] == 100
    assert calls["m"] == 10  # one look at each device for the one requirement, not one per task
    s.update_device(device("big", cores=8), NOW)  # now a device matches: the kind of answer changed
    assert s.explain(tasks[0], NOW).startswith("a device that can run it is free")


def queued(s: Scheduler, t: Task) -> Task:
    s.push(t, NOW)
    return t
