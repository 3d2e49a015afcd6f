"""``/api/v1``: the JSON API. Each route is a wire request run through the node's handlers.

Query parameters are checked like requirement keys on the wire: an unknown
one is refused (``invalid_message``), so a typo never silently lists
everything; so is one given twice (``?status=pending&status=running``), since
each takes one value and silently using the first would answer another
question. (Only the event streams' ``task_id`` / ``device_id`` repeat.) Validation errors name the query parameter (``?status``) or the
JSON path in the request body (``$.payload``) instead of the wire path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..protocol.codec import NestingTooDeep, loads
from ..protocol.errors import InvalidJSON, InvalidMessage, NotFound, RemoteProtocolError
from .app import json_response

if TYPE_CHECKING:
    from .app import WebApp

__all__ = ["Api", "check_query", "query_int", "read_json", "refuse_repeated"]

API = "/api/v1"
MAX_LIST = 10_000  # task_list's own limit


def check_query(request: web.Request, allowed: set[str]) -> None:
    """Refuse a query parameter not in ``allowed``, or given more than once."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidMessage(f"unknown query parameter {unknown[0]!r}; known: {known}.", path=f"?{unknown[0]}")
    refuse_repeated(request)


def refuse_repeated(request: web.Request, repeatable: frozenset[str] = frozenset()) -> None:
    """Refuse a query parameter given more than once (``?status=a&status=b``) unless ``repeatable``."""
    if len(request.query) == len(set(request.query)):
        return
    for name in sorted(set(request.query) - repeatable):
        count = len(request.query.getall(name))
        if count > 1:
            raise InvalidMessage(f"query parameter {name!r} is given {count} times; it takes one value, "
                                 "so give it once.", path=f"?{name}")  # fmt: skip


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = loads(text)  # strict JSON: not "1_0", "0x10" or "1e2"
    except ValueError:
        value = None
    if type(value) is not int or not low <= value <= high:
        raise InvalidMessage(f"{name} must be an integer from {low} to {high}.", path=f"?{name}")
    return value


async def read_json(request: web.Request, max_depth: int) -> Any:
    """The request body as JSON (strict: no duplicate keys, NaN or deep nesting)."""
    raw = await request.read()
    try:
        return loads(raw, max_depth)
    except NestingTooDeep as exc:
        raise InvalidJSON(f"The request body is not accepted: {exc}.") from None
    except ValueError as exc:
        raise InvalidJSON(f"The request body is not valid JSON ({exc}).") from None


def rebase(exc: RemoteProtocolError, wire_prefix: str, http_prefix: str) -> RemoteProtocolError:
    """The same error with wire paths (``$.data.task.x``) turned into HTTP ones (``$.x``)."""
    if not isinstance(exc, InvalidMessage) or exc.path is None or not exc.path.startswith(wire_prefix):
        return exc
    path = http_prefix + exc.path[len(wire_prefix):]
    return InvalidMessage(exc.message.replace(exc.path, path, 1), path=path)


class Api:
    """The handlers of the ``/api/v1`` routes."""

    def __init__(self, web_app: WebApp) -> None:
        self.web = web_app
        self.node = web_app.node

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{API}/health", self.health)
        router.add_get(f"{API}/cluster/status", self.cluster_status)
        router.add_get(f"{API}/devices", self.devices)
        router.add_get(f"{API}/devices/{{device_id}}", self.device)
        router.add_get(f"{API}/tasks", self.tasks)
        router.add_post(f"{API}/tasks", self.submit)
        router.add_get(f"{API}/tasks/{{task_id}}", self.task)
        router.add_delete(f"{API}/tasks/{{task_id}}", self.cancel)
        router.add_post(f"{API}/command", self.command)

    async def _query(self, message_type: str, data: dict[str, Any], request: web.Request) -> Any:
        try:
            return await self.web.call(message_type, data, request)
        except InvalidMessage as exc:
            raise rebase(exc, "$.data.", "?") from None

    async def health(self, request: web.Request) -> web.Response:
        """No auth: is the node up and its database answering."""
        node = self.node
        try:
            await node.store.max_seq()
            database = "ok"
        except Exception as exc:  # the point is to report it, not to fail
            database = f"error: {exc.__class__.__name__}"
        body = {
            "status": "ok" if database == "ok" else "degraded",
            "version": __version__,
            "uptime": round(node.clock() - node.started_at, 3),
            "database": database,
            "auth": node.token is not None,
            "tls": node.tls_fingerprint is not None,
        }
        return json_response(body, 200 if database == "ok" else 503)

    async def cluster_status(self, request: web.Request) -> web.Response:
        check_query(request, set())
        result = await self.web.call("cluster_status", {}, request)
        result["version"] = __version__
        return json_response(result)

    async def _device_list(self, request: web.Request) -> list[dict[str, Any]]:
        check_query(request, {"status", "role", "platform"})
        data = {"status": request.query["status"]} if "status" in request.query else {}
        devices: list[dict[str, Any]] = (await self._query("list_devices", data, request))["devices"]
        for key in ("role", "platform"):
            want = request.query.get(key)
            if want is not None:
                devices = [d for d in devices if (d.get("device_info") or {}).get(key) == want]
        return devices

    async def devices(self, request: web.Request) -> web.Response:
        return json_response({"devices": await self._device_list(request)})

    async def device(self, request: web.Request) -> web.Response:
        """One device with its recent heartbeats, statistics and newest tasks."""
        check_query(request, set())
        device_id = request.match_info["device_id"]
        device = self.node.registry.get(device_id)
        if device is None:
            raise NotFound(f"No device {device_id!r}; GET {API}/devices lists them.")
        recent = await self.web.call("task_list", {"device_id": device_id, "limit": 10}, request)
        record = device.to_record()
        return json_response({
            "device": record,
            "statistics": record["statistics"],
            "heartbeats": list(self.web.heartbeats.get(device_id, ())),
            "recent_tasks": recent["tasks"],
        })  # fmt: skip

    async def tasks(self, request: web.Request) -> web.Response:
        """Newest first; ``status``, ``device_id``, ``task_type``, ``limit`` (100) and ``offset``."""
        check_query(request, {"status", "device_id", "task_type", "limit", "offset"})
        limit = query_int(request, "limit", 100, 1, 1000)
        offset = query_int(request, "offset", 0, 0, MAX_LIST - limit)
        data: dict[str, Any] = {k: request.query[k] for k in ("status", "device_id", "task_type")
                                if k in request.query}  # fmt: skip
        data["limit"] = offset + limit
        tasks = (await self._query("task_list", data, request))["tasks"][offset:]
        more = len(tasks) == limit and offset + limit < MAX_LIST
        return json_response({"tasks": tasks, "limit": limit, "offset": offset,
                              "next_offset": offset + limit if more else None})  # fmt: skip

    async def submit(self, request: web.Request) -> web.Response:
        """The body is the task (``task_type``, ``payload``, ...), as ``task_submit.data.task``.

        ``?wait=SECONDS`` answers when the task has ended (or the wait ran
        out), with its record under ``task``, as ``task_submit`` with ``wait``.
        A list of tasks (at most 1,000) is ``task_submit`` with ``tasks``: one
        answer, ``{"task_ids": [...]}`` in the same order, counted once against
        the rate limit.
        """
        check_query(request, {"wait"})
        data: dict[str, Any] = {}
        if "wait" in request.query:
            try:
                wait = loads(request.query["wait"])  # a JSON number: never NaN or infinity
            except ValueError:
                wait = None
            if type(wait) not in (int, float):
                raise InvalidMessage("wait must be a number of seconds (more than 0, at most 3600).", path="?wait")
            data["wait"] = wait
        body = await read_json(request, self.node.config.max_json_depth)
        if isinstance(body, list):
            return await self._submit_many(data, body, request)
        if not isinstance(body, dict):
            raise InvalidMessage("The request body must be a JSON object (the task) or a list of them.", path="$")
        if "wait" in body:  # as in task_submit's data, one level up: say where it goes here
            raise InvalidMessage(f"wait is not part of the task; ask for it in the query: POST {API}/tasks?wait=SECONDS.",
                                 path="$.wait")
        data["task"] = body
        try:
            result = await self.web.call("task_submit", data, request)
        except InvalidMessage as exc:
            if exc.path == "$.data.wait":
                raise InvalidMessage(exc.message.replace("$.data.wait", "?wait", 1), path="?wait") from None
            raise rebase(exc, "$.data.task", "$") from None
        location = f"{API}/tasks/{result['task_id']}"
        return json_response(result, 200 if result.get("existing") else 201, {"Location": location})

    async def _submit_many(self, data: dict[str, Any], tasks: list[Any], request: web.Request) -> web.Response:
        if "wait" in data:
            raise InvalidMessage("wait is for one task; submit a list without it and follow the tasks "
                                 f"(GET {API}/tasks/{{task_id}}).", path="?wait")
        try:
            result = await self.web.call("task_submit", {"tasks": tasks}, request)
        except InvalidMessage as exc:
            raise rebase(exc, "$.data.tasks", "$") from None
        return json_response(result, 201)

    async def task(self, request: web.Request) -> web.Response:
        check_query(request, set())
        return json_response(await self._by_id("task_status", request))

    async def cancel(self, request: web.Request) -> web.Response:
        check_query(request, set())
        return json_response(await self._by_id("task_cancel", request))

    async def _by_id(self, message_type: str, request: web.Request) -> Any:
        """A request about the task named in the URL (a refused id is named as the URL's {task_id})."""
        try:
            return await self.web.call(message_type, {"task_id": request.match_info["task_id"]}, request)
        except InvalidMessage as exc:
            raise rebase(exc, "$.data.task_id", "{task_id}") from None

    async def command(self, request: web.Request) -> web.Response:
        """Run one dashboard command line: ``{"command": "devices"}`` -> its text and JSON."""
        from .commands import Commands

        check_query(request, set())
        body = await read_json(request, self.node.config.max_json_depth)
        line = body.get("command") if isinstance(body, dict) else None
        if not isinstance(line, str) or len(line) > 4096:
            raise InvalidMessage('The body must be {"command": "LINE"} (at most 4096 characters).',
                                 path="$.command")  # fmt: skip
        result = await Commands(self.web).run(line, request)
        return json_response(result)
