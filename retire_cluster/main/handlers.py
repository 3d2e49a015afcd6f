"""One method per request type: check what the node's state allows, change it, answer.

A handler returns the ``ack`` result (a dict), or an awaitable of it when the
answer has to wait for a commit or a read; it raises a
:class:`RemoteProtocolError` for an ``error`` reply. The node sends the reply.
Messages reach a handler already validated against their JSON Schema.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Union

from ..protocol.codec import dumps
from ..protocol.errors import Conflict, Forbidden, InvalidMessage, NotFound, NotRegistered, Overloaded
from ..protocol.messages import (
    ACTIVE_STATUSES,
    DeviceStatus,
    Message,
    TaskStatus,
    error_reply,
    parse_priority,
)
from ..protocol.messages import DEFAULT_TASK_TIMEOUT_S as DEFAULT_TIMEOUT_S
from .registry import Device
from .store import Store
from .tasks import Task

if TYPE_CHECKING:
    from .node import MainNode
    from .server import Connection

__all__ = ["Handlers"]

log = logging.getLogger("retire_cluster.main")

Result = Union[dict[str, Any], Awaitable[dict[str, Any]]]


class Handlers:
    """The request handlers of a :class:`MainNode`."""

    def __init__(self, node: MainNode) -> None:
        self.node = node
        self._table: dict[str, Callable[[Connection, Message], Result]] = {
            "register": self.register,
            "heartbeat": self.heartbeat,
            "task_result": self.task_result,
            "task_progress": self.task_progress,
            "task_submit": self.task_submit,
            "task_status": self.task_status,
            "task_cancel": self.task_cancel,
            "task_list": self.task_list,
            "list_devices": self.list_devices,
            "cluster_status": self.cluster_status,
            "subscribe": self.subscribe,
        }

    def handle(self, conn: Connection, msg: Message) -> Result:
        handler = self._table.get(msg.message_type)
        if handler is None:
            # Valid schema but not a request the main node takes (task_assign, task_update).
            raise InvalidMessage(
                f"{msg.message_type} is sent by the main node, not to it.", path="$.message_type"
            )
        if conn.device_id is not None and msg.sender_id != conn.device_id:
            raise Forbidden(
                f"This connection is registered as {conn.device_id!r}; "
                "open a new connection to speak for another device."
            )
        return handler(conn, msg)

    def _device(self, conn: Connection) -> Device:
        if conn.device_id is None:
            raise NotRegistered("Send register on this connection first.")
        device = self.node.registry.get(conn.device_id)
        assert device is not None
        return device

    # -- worker -----------------------------------------------------------

    def register(self, conn: Connection, msg: Message) -> Result:
        node, data, now = self.node, msg.data, self.node.clock()
        device = node.registry.get(msg.sender_id)
        if device is None:
            device = node.registry.add(Device(msg.sender_id, breaker=node.new_breaker()))
        if device.conn is not None and device.conn is not conn:
            old = device.conn
            log.info("device %s re-registered from %s; closing its old connection from %s",
                     device.device_id, conn.peer, old.peer)
            old.device_id = None
            # Said before closing: a worker that reconnected never reads it (it left that
            # connection first), but a second live worker with the same id learns why, and stops
            # instead of registering again and knocking this one off in turn.
            old.send(error_reply(
                None,
                "conflict",
                f"Another connection (from {conn.peer}) registered as device {device.device_id!r}; "
                "this one is closed. Unless that was this device reconnecting, give each worker its own "
                "--device-id.",
            ))
            old.close()
        conn.device_id = device.device_id
        device.conn = conn
        info = dict(data["device_info"])
        device.device_info = info
        device.hardware_specs = dict(data["hardware_specs"])
        device.capabilities = frozenset(data.get("capabilities", ()))
        device.task_types = frozenset(data.get("task_types", ("echo", "sleep")))
        cores = int(device.hardware_specs.get("cpu_cores") or 1)
        device.max_tasks = int(data.get("max_concurrent_tasks") or cores)
        device.accepting = bool(data.get("accepting", True))
        device.reason = data.get("reason")
        # The admin's setting wins over what the worker asks for.
        device.weight = float(node.config.device_weights.get(device.device_id, data.get("weight", 1.0)))
        device.status = DeviceStatus.ONLINE
        device.last_seen = now
        if not device.registered_at:
            device.registered_at = now
        self._reconcile(device, data.get("running_tasks", []), now)
        node.device_changed(device)
        log.info("device %s registered from %s", device.device_id, conn.peer)

        def committed() -> dict[str, Any]:
            conn.welcomed = True  # this reply goes out before anything pushed from now on
            node.schedule_soon()
            return {
                "device_id": device.device_id,
                "heartbeat_interval": node.config.heartbeat_interval_s,
                "offline_timeout": node.config.offline_timeout_s,
                "max_frame_bytes": node.config.max_frame_bytes,
            }

        return node.then(node.write([Store.upsert_device(device)]), committed)

    def _reconcile(self, device: Device, reported: list[dict[str, Any]], now: float) -> None:
        """Keep reported tasks the device still holds; take back the rest."""
        node = self.node
        claims = {(r["task_id"], int(r["attempt"])) for r in reported}
        for task_id in sorted(device.running):
            task = node.tasks.get(task_id)
            if task is None:
                device.running.discard(task_id)
            elif (task_id, task.attempt) not in claims:
                if task.status is TaskStatus.ASSIGNED:
                    # Never acknowledged, and not claimed: the device never got
                    # it (the connection or the main node went down first), so
                    # it does not count against max_retries.
                    node.requeue(task, "not_received", now, handback=True)
                else:
                    node.requeue(task, "worker_lost", now)
        for task_id, attempt in claims:
            task = node.lookup(task_id)
            if task is None or not task.held_by(device.device_id, attempt):
                # Stale work the device should drop.
                if device.conn is not None:
                    node.send_cancel_to(device.conn, device.device_id, task_id, attempt, "not_yours")

    def heartbeat(self, conn: Connection, msg: Message) -> Result:
        return self.beat(self._device(conn), msg.data)

    def beat(self, device: Device, data: dict[str, Any]) -> dict[str, Any]:
        """A heartbeat of ``device`` (valid against its schema): the device is seen, with these metrics."""
        node = self.node
        device.last_seen = node.clock()
        if device.status is not DeviceStatus.ONLINE:
            device.status = DeviceStatus.ONLINE
        metrics = data.get("system_metrics")
        if isinstance(metrics, dict):
            device.metrics = metrics
        if "accepting" in data:
            device.accepting = bool(data["accepting"])
            device.reason = data.get("reason")
        node.touch(device)
        node.device_changed(device)
        return {"active_tasks": len(device.running)}

    def task_progress(self, conn: Connection, msg: Message) -> Result:
        device = self._device(conn)
        data = msg.data
        task = self.node.lookup(data["task_id"])
        if task is None or not task.ever_held_by(device.device_id):
            raise Forbidden("This device does not hold that task.")
        if not task.held_by(device.device_id, int(data["attempt"])):
            return {"stale": True}
        if task.status is TaskStatus.ASSIGNED:
            self.mark_running(task)
        if "progress" in data:
            task.progress = float(data["progress"])
        self.node.publish(task)
        return {}

    def mark_running(self, task: Task) -> None:
        now = self.node.clock()
        task.move(TaskStatus.RUNNING)
        task.started_at = now
        current = task.current_attempt()
        if current is not None:
            current.started_at = now
        # Nothing acts on running rather than assigned (both are held by the
        # device, and recovery treats them alike), so this write waits for the
        # next commit (usually the result's, moments later), and is not made
        # at all when the result came in the same read.
        self.node.write_running(task)

    def task_result(self, conn: Connection, msg: Message) -> Result:
        device = self._device(conn)
        data = msg.data
        task = self.node.lookup(data["task_id"])
        if task is None:
            return self._result_for_old_task(device, data)
        return self._apply_result(device, task, data)

    async def _result_for_old_task(self, device: Device, data: dict[str, Any]) -> dict[str, Any]:
        task = await self.node.store.get_task(data["task_id"])
        if task is None:
            raise NotFound(f"No task {data['task_id']!r}.")
        result = self._apply_result(device, task, data)
        assert isinstance(result, dict)
        return result

    def _apply_result(self, device: Device, task: Task, data: dict[str, Any]) -> Result:
        node, now = self.node, self.node.clock()
        attempt = int(data["attempt"])
        if not task.held_by(device.device_id, attempt):
            if task.ever_held_by(device.device_id):
                # Stale attempt, or a duplicate of a recorded result: changes nothing.
                return {"task_id": task.task_id, "stale": True}
            raise Forbidden("This device does not hold that task; results are accepted only from it.")
        result = data.get("result") or {}
        status = data["status"]
        exec_s = data.get("execution_time")
        if status == "completed":
            fut = node.finish(task, TaskStatus.COMPLETED, now, result=result, execution_time_s=exec_s)
        elif status == "failed":
            error = result.get("error") or f"exit code {result.get('exit_code')}"
            fut = node.finish(task, TaskStatus.FAILED, now, result=result, error=error, execution_time_s=exec_s)
        elif status == "timeout":
            if task.retry_on_timeout and task.retries_left:
                node.requeue(task, "timeout", now)
                fut = node.write([])
            else:
                fut = node.finish(
                    task, TaskStatus.TIMEOUT, now, result=result,
                    error=f"timed out after {task.timeout_s:g} s on {device.device_id}",
                    execution_time_s=exec_s,
                )  # fmt: skip
        else:  # cancelled by the worker itself (owner policy, shutdown): hand it back
            node.requeue(task, "handed_back", now, handback=True)
            fut = node.write([])

        return node.then(fut, lambda: {"task_id": task.task_id, "status": task.status.value})

    def on_assign_reply(self, conn: Connection, msg: Message) -> None:
        """A worker answered a task_assign: accepted (running) or refused (handed back)."""
        ref = conn.pending_assigns.pop(str(msg.data.get("original_message_id")), None)
        if ref is None or conn.device_id is None:
            return
        task = self.node.lookup(ref[0])
        if task is None or not task.held_by(conn.device_id, ref[1]):
            return
        if msg.message_type == "ack":
            if task.status is TaskStatus.ASSIGNED:
                self.mark_running(task)
        else:
            log.info(
                "device %s refused task %s: %s", conn.device_id, task.task_id, msg.data.get("error")
            )
            # Do not offer it straight back: a device that says it lacks the
            # type loses it; any other refusal pauses the device until its
            # next heartbeat says it accepts work again.
            device = self._device(conn)
            if msg.data.get("code") == "forbidden":
                device.task_types = device.task_types - {task.task_type}
            else:
                device.accepting = False
                device.reason = f"refused a task: {msg.data.get('error')}"
            self.node.device_changed(device)
            self.node.requeue(task, "refused", self.node.clock(), handback=True)

    # -- client -----------------------------------------------------------

    def task_submit(self, conn: Connection, msg: Message) -> Result:
        node = self.node
        if "tasks" in msg.data:
            return self._submit_many(conn, msg.data["tasks"])
        spec = msg.data["task"]
        try:
            priority = parse_priority(spec.get("priority", "normal"))
        except ValueError as exc:
            raise InvalidMessage(str(exc), path="$.data.task.priority") from None
        key = spec.get("idempotency_key")
        wait_s = msg.data.get("wait")
        if key is not None:
            if key in node._idempotency:
                return self._existing(node._idempotency[key], wait_s, owner=conn)
            if key in node._old_keys or key in node._key_lookups:
                return self._submit_seen_key(spec, priority, key, wait_s, conn)
        return self._new_task(spec, priority, key, wait_s, conn, msg.message_id)

    def _submit_many(self, conn: Connection, specs: list[dict[str, Any]]) -> Result:
        """``task_submit`` with ``tasks``: each queued as one ``task`` would be; ``{"task_ids"}`` once all are committed.

        All or nothing before anything is queued: a bad priority anywhere, or
        more tasks than the main node may hold, refuses the whole request. A
        task whose idempotency key names a task already answers with that
        task's id (so does a key repeated within the request). One request
        takes one token of the rate limit, and its inserts go in one commit.
        """
        node = self.node
        priorities = []
        for n, spec in enumerate(specs):
            try:
                priorities.append(parse_priority(spec.get("priority", "normal")))
            except ValueError as exc:
                raise InvalidMessage(str(exc), path=f"$.data.tasks[{n}].priority") from None
        room = node.config.max_unfinished_tasks - len(node.tasks)
        if len(specs) > room:
            raise Overloaded(
                f"{len(specs)} tasks would take the main node past its limit of {node.config.max_unfinished_tasks:,} "
                f"unfinished tasks (max_unfinished_tasks; room for {max(room, 0):,} now); submit fewer, or again when "
                "some have finished."
            )
        node.refuse_when_full()
        if node.unfinished_bytes + node.config.max_frame_bytes > node.config.max_unfinished_bytes:
            # Each task's payload is counted as it is queued; a request's payloads are at most its frame.
            raise Overloaded(
                f"The unfinished tasks carry {node.unfinished_bytes / 2**20:.0f} MiB of payload, near the main "
                "node's limit (max_unfinished_bytes); submit these one by one, or again when some have finished."
            )
        answers: list[Any] = []
        for spec, priority in zip(specs, priorities):
            key = spec.get("idempotency_key")
            if key is not None and key in node._idempotency:
                answers.append(node._idempotency[key])
            elif key is not None and (key in node._old_keys or key in node._key_lookups):
                answers.append(self._submit_seen_key(spec, priority, key, None, conn))
            else:
                answers.append(self._new_task(spec, priority, key, None, conn))
        return self._all_submitted(answers)

    async def _all_submitted(self, answers: list[Any]) -> dict[str, Any]:
        """``{"task_ids"}`` in order, once each answer (an id, or an awaitable of a submission's result) is in."""
        pending = [a for a in answers if not isinstance(a, str)]
        results = iter(await asyncio.gather(*pending)) if pending else iter(())
        return {"task_ids": [a if isinstance(a, str) else next(results)["task_id"] for a in answers]}

    async def _existing(
        self, task_id: str, wait_s: Any, stored: Task | None = None, *, owner: Any = None
    ) -> dict[str, Any]:
        """The answer to a repeated submission: the task its key already names (``stored``: as read).

        ``owner``: the connection that waits (see MainNode.wait_for_end).
        """
        node = self.node
        await node.store.flush()  # its insert is committed
        result: dict[str, Any] = {"task_id": task_id, "existing": True}
        if wait_s is not None:
            held = node.lookup(task_id)
            if held is None:
                stored = stored or await node.store.get_task(task_id)
                result["task"] = stored.to_record() if stored is not None else None
            else:  # a fresh flush: an end already decided in memory is on disk before it is told
                ended = await node.wait_for_end(held, float(wait_s), node.store.write([]), owner)
                result["task"] = ended["task"]
        return result

    async def _submit_seen_key(
        self, spec: dict[str, Any], priority: int, key: str, wait_s: Any, owner: Any = None
    ) -> dict[str, Any]:
        """A key that may name a task no longer in memory: the store's unique index decides.

        One lookup per key at a time: a submission with the same key that
        comes meanwhile waits for it, then sees the task in memory.
        """
        node = self.node
        while key in node._key_lookups:
            await node._key_lookups[key]
        if key in node._idempotency:
            return await self._existing(node._idempotency[key], wait_s, owner=owner)
        lookup: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node._key_lookups[key] = lookup
        try:
            stored = await node.store.find_idempotent(key)
            # Not there: a new key after all (the filter's "maybe"), in memory before the lookup ends.
            new = None if stored is not None else self._new_task(spec, priority, key, wait_s, owner)
        finally:
            del node._key_lookups[key]
            lookup.set_result(None)
        if new is not None:
            return dict(await new)
        assert stored is not None
        return await self._existing(stored.task_id, wait_s, stored, owner=owner)

    def _new_task(
        self, spec: dict[str, Any], priority: int, key: str | None, wait_s: Any, owner: Any = None,
        request_id: str | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a new task; the future of the request's answer.

        ``request_id``: the id of the request, when ``owner`` is a TCP connection
        that the end waiter may answer itself (MainNode.wait_for_end).
        """
        node = self.node
        node.refuse_when_full()
        now = node.clock()
        task = Task(
            task_id=node.new_task_id(),
            task_type=spec["task_type"],
            payload=spec.get("payload", {}),
            priority=priority,
            timeout_s=float(spec.get("timeout", DEFAULT_TIMEOUT_S)),
            requirements=spec.get("requirements", {}),
            max_retries=int(spec.get("max_retries", node.config.default_max_retries)),
            retry_on_timeout=bool(spec.get("retry_on_timeout", False)),
            idempotency_key=key,
            created_at=now,
            seq=node.next_seq(),
        )
        if key is not None:
            node._idempotency[key] = task.task_id
            node._old_keys.add(key)
        version = node.bump(task)
        insert = Store.insert_task(task)  # also notes task.payload_bytes, which hold() counts
        # Queue it first: the scheduling pass then runs before the commit
        # starts, so if a device is free the assignment joins the insert's
        # transaction, and is sent to the device while that commit runs.
        node.hold(task)
        node.scheduler.push(task, now)
        node.schedule_after_read()
        task.insert_batch = node.store.next_batch
        # A client that waits for the end hears nothing before it, so the
        # insert may wait for the result's commit (MainNode.wait_hold_s at most).
        if wait_s is not None:
            node.hold_insert(task)
        fut = node.store.write([insert], within=None if wait_s is None else node.wait_hold_s)

        def not_stored(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                node.forget_uncommitted(task)

        def committed() -> dict[str, Any]:
            node.publish_committed(fut, task, version)
            return {"task_id": task.task_id}

        fut.add_done_callback(not_stored)
        if wait_s is None:
            return node.then(fut, committed)
        reply_to = request_id if getattr(owner, "send_now", None) is not None else None  # not an HttpPeer
        return node.wait_for_end(task, float(wait_s), node.then(fut, committed), owner, reply_to)

    async def task_status(self, conn: Connection, msg: Message) -> dict[str, Any]:
        if "task_ids" in msg.data:
            return await self._statuses(msg.data["task_ids"])
        task = await self.node.fetch(msg.data["task_id"])
        if task is None:
            raise NotFound(f"No task {msg.data['task_id']!r}; `retire-cluster tasks` lists them.")
        return {"task": self._status_record(task)}

    async def _statuses(self, task_ids: list[str]) -> dict[str, Any]:
        """``task_status`` with ``task_ids``: the records in order, null for those not known.

        As many as fit in one frame (``max_frame_bytes``), and at least one:
        a task's result may be nearly a frame itself. The client asks again
        for the rest.
        """
        room = self.node.config.max_frame_bytes - 1024  # the envelope
        records: list[dict[str, Any] | None] = []
        for task_id in task_ids:
            task = await self.node.fetch(task_id)
            record = None if task is None else self._status_record(task)
            size = 5 if record is None else len(dumps(record)) + 1
            if records and size > room:
                break
            room -= size
            records.append(record)
        return {"tasks": records}

    def _status_record(self, task: Task) -> dict[str, Any]:
        """The task's record, with why it waits while pending."""
        record = task.to_record()
        waiting = self.node.scheduler.explain(task, self.node.clock())
        if waiting is not None:
            record = {**record, "waiting": waiting}
        return record

    def task_cancel(self, conn: Connection, msg: Message) -> Result:
        node = self.node
        task = node.lookup(msg.data["task_id"])
        if task is None:
            return self._cancel_old(msg.data["task_id"])
        if task.terminal:
            raise Conflict(f"Task {task.task_id} already ended ({task.status.value}); nothing to cancel.")
        if task.status in ACTIVE_STATUSES:
            node.send_cancel(task, "cancelled")
        fut = node.finish(task, TaskStatus.CANCELLED, node.clock(), error="cancelled by request")

        return node.then(fut, lambda: {"task_id": task.task_id, "status": task.status.value})

    async def _cancel_old(self, task_id: str) -> dict[str, Any]:
        task = await self.node.store.get_task(task_id)
        if task is None:
            raise NotFound(f"No task {task_id!r}; `retire-cluster tasks` lists them.")
        live = self.node.lookup(task_id)
        if live is not None and not live.terminal:  # it came into memory while we read
            raise Conflict(f"Task {task_id} changed while cancelling; try again.")
        raise Conflict(f"Task {task_id} already ended ({task.status.value}); nothing to cancel.")

    async def task_list(self, conn: Connection, msg: Message) -> dict[str, Any]:
        data = msg.data
        tasks = await self.node.store.list_tasks(
            status=data.get("status"),
            device_id=data.get("device_id"),
            task_type=data.get("task_type"),
            limit=int(data.get("limit", 100)),
        )
        records = []
        for stored in tasks:
            live = self.node.lookup(stored.task_id)
            records.append((live or stored).to_record())
        return {"tasks": records}

    def list_devices(self, conn: Connection, msg: Message) -> Result:
        status = msg.data.get("status")
        devices = sorted(self.node.registry, key=lambda d: d.device_id)
        return {
            "devices": [d.to_record() for d in devices if status is None or d.status.value == status]
        }

    async def cluster_status(self, conn: Connection, msg: Message) -> dict[str, Any]:
        node = self.node
        counts = await node.store.count_tasks()
        devices = node.registry.counts()
        slots = sum(d.max_tasks for d in node.registry if d.online)
        busy = sum(len(d.running) for d in node.registry if d.online)
        return {
            "devices": devices,
            "tasks": counts,
            "queue_length": counts.get("pending", 0),
            "slots": {"total": slots, "busy": busy},
            "uptime": round(node.clock() - node.started_at, 3),
            "stuck": node.scheduler.stuck(node.clock()),
        }

    def subscribe(self, conn: Connection, msg: Message) -> Result:
        task_ids = msg.data.get("task_ids")
        self.node.subscribe(conn, task_ids)
        return {"subscribed": "all" if task_ids is None else len(task_ids)}

    # -- replies to what the main node pushed ------------------------------

    def on_reply(self, conn: Connection, msg: Message) -> None:
        if conn.pending_assigns:
            self.on_assign_reply(conn, msg)
