"""``/api/v1/openapi.json``: the OpenAPI 3.1 document of every HTTP route.

Written by hand, route by route (tests/test_web_openapi.py checks it against
the routes the application really serves, both ways). The task and device
shapes are not copied: they come from the wire JSON Schemas in ``schemas/``
(OpenAPI 3.1 speaks JSON Schema 2020-12), so the two cannot drift apart.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..protocol.errors import ERROR_CODES
from ..protocol.validation import load_schemas
from .app import json_response

if TYPE_CHECKING:
    from .app import WebApp

__all__ = ["OpenApi", "build_document"]


def _components() -> dict[str, Any]:
    """The wire schemas' shared definitions, with references rewritten for OpenAPI."""
    schemas = load_schemas()
    defs = {name: _rewrite(schema) for name, schema in schemas["common"]["$defs"].items() if name != "envelope"}
    task_spec = _rewrite(schemas["task_submit"]["properties"]["data"]["properties"]["task"])
    defs["TaskSpec"] = task_spec
    defs["Error"] = {
        "type": "object",
        "required": ["code", "error"],
        "properties": {
            "code": {"enum": sorted(ERROR_CODES)},
            "error": {"type": "string", "description": "A sentence a person can act on."},
            "path": {"type": "string", "description": "Where the request is wrong: ?param or $.json.path."},
        },
    }
    return defs


def _rewrite(schema: Any) -> Any:
    """Copy ``schema``, pointing ``common.json#/$defs/X`` and ``#/$defs/X`` at components."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and "#/$defs/" in value:
                out[key] = "#/components/schemas/" + value.split("#/$defs/", 1)[1]
            else:
                out[key] = _rewrite(value)
        return out
    if isinstance(schema, list):
        return [_rewrite(v) for v in schema]
    return copy.copy(schema)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(media: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _param(name: str, where: str, description: str, schema: dict[str, Any] | None = None,
           required: bool = False) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "in": where, "required": required or where == "path", "description": description,
            "schema": schema or {"type": "string"}}


#: A query parameter that may be given more than once (?task_id=a&task_id=b).
_MANY = {"type": "array", "items": {"type": "string"}}

FORMAT = _param("format", "query", "pipe (default), csv, tsv or json.",
                {"enum": ["pipe", "csv", "tsv", "json"]})


def _op(summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, public: bool = False, errors: tuple[int, ...] = (400,)) -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {"summary": summary, "responses": dict(responses)}
    for code in errors:
        op["responses"][str(code)] = {"$ref": f"#/components/responses/E{code}"}
    op["responses"]["429"] = {"$ref": "#/components/responses/E429"}  # every route is rate-limited
    op["responses"]["500"] = {"$ref": "#/components/responses/E500"}
    if not public:
        op["responses"]["401"] = {"$ref": "#/components/responses/E401"}
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _sse(what: str, events: str, filter_param: dict[str, Any] | None) -> dict[str, Any]:
    params = [_param("Last-Event-ID", "header", "Resume after this event id (also ?last_event_id=).")]
    if filter_param is not None:
        params.append(filter_param)
    return {"get": _op(
        f"Server-Sent Events: {what}. Events: {events}; `reset` when the events after Last-Event-ID "
        "are gone (reload the state); a `: keep-alive` comment on an idle stream.",
        {"200": _text("text/event-stream", "An endless event stream.")},
        params=params, errors=(400, 429),
    )}  # fmt: skip


def _paths() -> dict[str, Any]:
    status = _param("status", "query", "Only tasks in this state.", _ref("task_status"))
    tasks_list = {"type": "object", "properties": {
        "tasks": {"type": "array", "items": _ref("task_record")}, "limit": {"type": "integer"},
        "offset": {"type": "integer"}, "next_offset": {"type": ["integer", "null"]}}}  # fmt: skip
    device_obj = {"type": "object", "description": "A device record, as list_devices returns it."}
    return {
        "/api/v1/health": {"get": _op(
            "Liveness: status, version, uptime, whether the database answers. No token needed.",
            {"200": _json({"type": "object"}), "503": _json({"type": "object"}, "The database fails.")},
            public=True, errors=())},
        "/api/v1/cluster/status": {"get": _op(
            "Devices and tasks by state, queue length, slots, uptime, and what is stuck (tasks no device can run).", {"200": _json({"type": "object"})})},
        "/api/v1/devices": {"get": _op(
            "Devices, filtered.", {"200": _json({"type": "object", "properties": {
                "devices": {"type": "array", "items": device_obj}}})},
            params=[_param("status", "query", "online or offline.", {"enum": ["online", "offline"]}),
                    _param("role", "query", "device_info.role equals."),
                    _param("platform", "query", "device_info.platform equals.")])},
        "/api/v1/devices/{device_id}": {"get": _op(
            "One device with its recent heartbeats, statistics and newest tasks.",
            {"200": _json({"type": "object", "properties": {
                "device": device_obj, "statistics": {"type": "object"},
                "heartbeats": {"type": "array", "items": {"type": "object"}},
                "recent_tasks": {"type": "array", "items": _ref("task_record")}}})},
            params=[_param("device_id", "path", "The device id.")], errors=(400, 404))},
        "/api/v1/tasks": {
            "get": _op("Tasks, newest first, filtered and paginated.", {"200": _json(tasks_list)}, params=[
                status, _param("device_id", "query", "Only tasks assigned to this device."),
                _param("task_type", "query", "Only this task type."),
                _param("limit", "query", "1-1000, default 100.", {"type": "integer"}),
                _param("offset", "query", "Skip this many (next_offset of the previous page); offset + limit "
                       "is at most 10000.", {"type": "integer", "minimum": 0, "maximum": 9999})]),
            "post": _op("Submit a task, or a list of up to 1,000 (validated exactly as task_submit on TCP).", {
                "201": _json({"type": "object", "properties": {"task_id": {"type": "string"},
                                                               "task": _ref("task_record"),
                                                               "task_ids": {"type": "array",
                                                                            "items": {"type": "string"}}}},
                             "Submitted (with ?wait, the record once it ended or the wait ran out; for a "
                             "list, task_ids in the same order)."),
                "200": _json({"type": "object"}, "Already submitted with this idempotency_key.")},
                params=[_param("wait", "query", "Answer when the task has ended, waiting at most this many "
                               "seconds (more than 0, at most 3600); the answer then carries its record.",
                               {"type": "number", "exclusiveMinimum": 0, "maximum": 3600})],
                body={"oneOf": [_ref("TaskSpec"), {"type": "array", "minItems": 1, "maxItems": 1000,
                                                     "items": _ref("TaskSpec")}]},
                errors=(400, 413, 429)),
        },
        "/api/v1/tasks/{task_id}": {
            "get": _op("One task: status, attempts, result, and while pending why it waits.",
                       {"200": _json({"type": "object", "properties": {"task": _ref("task_record")}})},
                       params=[_param("task_id", "path", "The task id.")], errors=(400, 404)),
            "delete": _op("Cancel a task that has not ended.", {"200": _json({"type": "object"})},
                          params=[_param("task_id", "path", "The task id.")], errors=(400, 404, 409)),
        },
        "/api/v1/command": {"post": _op(
            "Run one dashboard command line; returns its text and JSON.",
            {"200": _json({"type": "object", "properties": {
                "command": {"type": "string"}, "text": {"type": "string"}, "json": {}}})},
            body={"type": "object", "required": ["command"], "properties": {"command": {"type": "string"}}},
            errors=(400, 404, 409, 413))},
        "/api/v1/openapi.json": {"get": _op("This document.", {"200": _json({"type": "object"})}, errors=())},
        "/text/devices": {"get": _op("Devices, one line each.", {"200": _text("text/plain", "Pipe-separated.")},
                                     params=[FORMAT, _param("status", "query", "online or offline.")])},
        "/text/tasks": {"get": _op("Tasks, one line each, newest first.",
                                   {"200": _text("text/plain", "Pipe-separated.")},
                                   params=[FORMAT, status, _param("device_id", "query", "Assigned device."),
                                           _param("task_type", "query", "Task type."),
                                           _param("limit", "query", "1-10000, default 100.",
                                                  {"type": "integer", "minimum": 1, "maximum": 10000})])},
        "/text/status": {"get": _op("key=value lines (or ?format=json).",
                                    {"200": _text("text/plain", "key=value lines.")},
                                    params=[_param("format", "query", "text or json.")])},
        "/metrics": {"get": _op("Prometheus exposition.", {"200": _text("text/plain", "Metrics.")}, errors=())},
        "/text/metrics": {"get": _op("The same as /metrics.", {"200": _text("text/plain", "Metrics.")},
                                     errors=())},
        "/stream/devices": _sse("device changes", "`snapshot` (all devices, first), `device`, `forget` "
                                "({device_id}: offline for forget_offline_after_s, no longer listed)",
                                _param("device_id", "query", "Only these devices (repeatable).", _MANY)),
        "/stream/tasks": _sse("task changes, as TCP subscribers get them", "`task` (the whole record)",
                              _param("task_id", "query", "Only these tasks (repeatable).", _MANY)),
        "/stream/logs": _sse("the main node's log", "`log` (time, level, logger, message)",
                             _param("level", "query", "debug, info, warning, error or critical and above.")),
        "/": {"get": _op("The dashboard page. No token needed: it asks for it.",
                         {"200": _text("text/html", "The page.")}, public=True, errors=())},
        "/static/{filename}": {"get": _op(
            "The page's script and style sheet. No token needed.",
            {"200": _text("application/javascript", "dashboard.js (text/css for dashboard.css).")},
            params=[_param("filename", "path", "dashboard.js or dashboard.css.")], public=True, errors=(404,))},
    }


def build_document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document (``server_url``: the address clients should use)."""
    responses = {
        f"E{code}": _json(_ref("Error"), text)
        for code, text in (
            (400, "Invalid request: invalid_json or invalid_message (with path), such as an unknown query "
                  "parameter or one given twice."),
            (401, "unauthorized: send Authorization: Bearer TOKEN."),
            (404, "not_found."),
            (409, "conflict: the task already ended."),
            (413, "frame_too_large: the body is larger than max_frame_bytes."),
            (429, "overloaded: more requests from this address than client_rate_per_s / client_burst "
                  "allow, too many open event streams, or (POST /api/v1/tasks) the main node holds "
                  "max_unfinished_tasks or max_unfinished_bytes; Retry-After says when to retry."),
            (500, "internal: the main node's log has the details (the reference is in the sentence)."),
        )
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "retire-cluster main node", "version": __version__,
                 "description": "JSON, text, metrics and event-stream API of the main node. Errors carry "
                                "the wire protocol's codes (see protocol/PROTOCOL.md). A query parameter "
                                "takes one value: given twice (?status=pending&status=running) it is "
                                "refused with 400 invalid_message naming it, as is an unknown one; only "
                                "the parameters marked repeatable (an array: task_id and device_id on "
                                "/stream/...) may be given more than once."},  # fmt: skip
        "paths": _paths(),
        "components": {
            "schemas": _components(),
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The cluster token (`retire-cluster token`)."}},
        },
        "security": [{"bearer": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


class OpenApi:
    def __init__(self, web_app: WebApp) -> None:
        self.web = web_app
        self._doc: dict[str, Any] | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/openapi.json", self.document)

    async def document(self, request: web.Request) -> web.Response:
        if self._doc is None:
            self._doc = build_document()
        return json_response(self._doc)
