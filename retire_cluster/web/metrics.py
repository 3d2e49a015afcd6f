"""``/metrics``: the main node in Prometheus exposition format (prometheus_client).

Each node has its own :class:`CollectorRegistry` (never the process-global
one), so two nodes in one process (tests) do not mix their numbers.

Two kinds of series:

- counted from events (the node's listener hook): tasks submitted, completed
  and failed, task duration and queue-wait histograms. They start at zero
  when the main node starts, as Prometheus counters do.
- read at scrape time from the node's state: devices by state, tasks by
  state (one ``COUNT ... GROUP BY`` on the store), heartbeat lag per online
  device, open connections (TCP and event streams).

Series (all prefixed ``retire_cluster_``)::

    devices{state}                      gauge
    tasks{state}                        gauge
    tasks_submitted_total               counter   (since this node started)
    tasks_completed_total               counter
    tasks_failed_total                  counter   (failed; timeouts are in tasks_finished_total)
    tasks_finished_total{status}        counter   (every terminal status)
    task_duration_seconds               histogram (execution time of completed tasks)
    task_queue_wait_seconds             histogram (submission or requeue to assignment)
    heartbeat_lag_seconds{device_id}    gauge     (now minus last heartbeat, online devices)
    open_connections{kind}              gauge     (tcp, stream)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..protocol.messages import TERMINAL_STATUSES, TaskStatus

if TYPE_CHECKING:
    from ..main.node import MainNode
    from ..main.tasks import Task
    from .app import WebApp

__all__ = ["DURATION_BUCKETS_S", "QUEUE_WAIT_BUCKETS_S", "Metrics"]

PREFIX = "retire_cluster_"
DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
QUEUE_WAIT_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 3600)
#: (status, attempt) remembered per task to count transitions once: publish()
#: may repeat a state, and the newest state may arrive twice (a callback of an
#: earlier commit publishes the task as it is by then)
REMEMBERED = 100_000


class _StateCollector(Collector):
    """The series read from the node's state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.metrics.node
        devices = GaugeMetricFamily(PREFIX + "devices", "Devices by state.", labels=["state"])
        for state, n in node.registry.counts().items():
            devices.add_metric([state], n)
        yield devices
        tasks = GaugeMetricFamily(PREFIX + "tasks", "Tasks by state (the store's count).", labels=["state"])
        for state, n in self.metrics.task_counts.items():
            tasks.add_metric([state], n)
        yield tasks
        lag = GaugeMetricFamily(PREFIX + "heartbeat_lag_seconds",
                                "Seconds since the last heartbeat of each online device.",
                                labels=["device_id"])  # fmt: skip
        now = node.clock()
        for device in sorted(node.registry, key=lambda d: d.device_id):
            if device.online:
                lag.add_metric([device.device_id], max(0.0, now - device.last_seen))
        yield lag
        conns = GaugeMetricFamily(PREFIX + "open_connections",
                                  "Open connections: TCP (workers, clients) and HTTP event streams.",
                                  labels=["kind"])  # fmt: skip
        conns.add_metric(["tcp"], len(node.server.connections))
        conns.add_metric(["stream"], self.metrics.web.open_streams)
        yield conns


class Metrics:
    """The Prometheus side of one node: feed it task events, render it on scrape."""

    def __init__(self, node: MainNode, web_app: WebApp) -> None:
        self.node = node
        self.web = web_app
        self.registry = CollectorRegistry(auto_describe=True)
        self.task_counts: dict[str, int] = {s.value: 0 for s in TaskStatus}
        r = self.registry
        self.submitted = Counter(PREFIX + "tasks_submitted", "Tasks submitted.", registry=r)
        self.completed = Counter(PREFIX + "tasks_completed", "Tasks that completed.", registry=r)
        self.failed = Counter(PREFIX + "tasks_failed", "Tasks that ended failed.", registry=r)
        self.finished = Counter(PREFIX + "tasks_finished", "Tasks that ended, by status.", ["status"],
                                registry=r)  # fmt: skip
        for status in TERMINAL_STATUSES:
            self.finished.labels(status.value)
        self.duration = Histogram(PREFIX + "task_duration_seconds", "Execution time of completed tasks.",
                                  buckets=DURATION_BUCKETS_S, registry=r)  # fmt: skip
        self.queue_wait = Histogram(PREFIX + "task_queue_wait_seconds",
                                    "Time from submission (or requeue) to assignment.",
                                    buckets=QUEUE_WAIT_BUCKETS_S, registry=r)  # fmt: skip
        r.register(_StateCollector(self))
        self._last: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def on_task(self, task: Task) -> None:
        """Count what changed since this task was last seen (called for every publish).

        A task's first publish may already show it assigned (the scheduler can
        place it in the same group commit as its insert), so a submission is
        "first seen, and created since this node started" (not recovered).
        """
        status, attempt = task.status.value, task.attempt
        before = self._last.pop(task.task_id, None)
        # Terminal ones are remembered too: a publish may repeat the final state.
        self._last[task.task_id] = (status, attempt)
        if len(self._last) > REMEMBERED:
            self._last.popitem(last=False)
        if before == (status, attempt):
            return  # progress only, or the same state again
        if before is None and task.created_at >= self.node.started_at:
            self.submitted.inc()
        if attempt > (before[1] if before is not None else 0):
            self._observe_wait(task)
        if task.terminal:
            self.finished.labels(status).inc()
            if status == "completed":
                self.completed.inc()
                self._observe_duration(task)
            elif status == "failed":
                self.failed.inc()

    def _observe_wait(self, task: Task) -> None:
        """A new attempt was assigned: queued since the end of the previous one, else the submission."""
        current = task.current_attempt()
        if current is None:
            return
        since = task.created_at
        if len(task.attempts) >= 2 and task.attempts[-2].finished_at is not None:
            since = task.attempts[-2].finished_at
        self.queue_wait.observe(max(0.0, current.assigned_at - since))

    def _observe_duration(self, task: Task) -> None:
        seconds: Any = task.execution_time_s
        if seconds is None and task.started_at is not None and task.finished_at is not None:
            seconds = task.finished_at - task.started_at
        if isinstance(seconds, (int, float)) and seconds >= 0:
            self.duration.observe(float(seconds))

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text and its content type (negotiated from ``Accept``)."""
        self.task_counts = await self.node.store.count_tasks()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
