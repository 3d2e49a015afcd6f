"""``/text``: flat views for shell scripts, spreadsheets and AI tools.

``/text/devices`` and ``/text/tasks`` print one header line and one line per
record, fields separated by ``|`` (the default), or as ``?format=csv``,
``tsv`` or ``json`` (a list of the same flat rows). ``/text/status`` prints
``key=value`` lines. In the pipe and TSV forms a separator or line break
inside a value becomes a space, so every line splits cleanly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..protocol.codec import dumps
from ..protocol.errors import InvalidMessage
from .api import check_query, query_int, rebase

if TYPE_CHECKING:
    from .app import WebApp

__all__ = ["DEVICE_FIELDS", "FORMATS", "TASK_FIELDS", "TextApi", "render_rows"]

FORMATS = {
    "pipe": "text/plain",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "json": "application/json",
}

DEVICE_FIELDS = ("device_id", "status", "connected", "role", "platform", "architecture", "cpu_cores",
                 "memory_gb", "cpu_usage", "memory_usage", "battery_percent", "charging", "active_tasks",
                 "max_tasks", "last_seen")  # fmt: skip
TASK_FIELDS = ("task_id", "task_type", "status", "priority", "attempt", "assigned_device", "progress",
               "created_at", "finished_at", "execution_time")  # fmt: skip


def device_fields(d: dict[str, Any]) -> dict[str, Any]:
    info, hw, m = d.get("device_info") or {}, d.get("hardware_specs") or {}, d.get("system_metrics") or {}
    memory = hw.get("memory_total")
    return {
        "device_id": d.get("device_id"), "status": d.get("status"), "connected": d.get("connected"),
        "role": info.get("role"), "platform": info.get("platform"), "architecture": info.get("architecture"),
        "cpu_cores": hw.get("cpu_cores"),
        "memory_gb": round(memory / 2**30, 2) if isinstance(memory, (int, float)) else None,
        "cpu_usage": m.get("cpu_usage"), "memory_usage": m.get("memory_usage"),
        "battery_percent": m.get("battery_percent"), "charging": m.get("charging"),
        "active_tasks": d.get("active_tasks"), "max_tasks": d.get("max_concurrent_tasks"),
        "last_seen": d.get("last_seen"),
    }  # fmt: skip


def task_fields(t: dict[str, Any]) -> dict[str, Any]:
    return {name: t.get(name) for name in TASK_FIELDS}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


#: A text cell starting with one of these is a formula to a spreadsheet opening the CSV or TSV.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A CSV/TSV cell: a string a spreadsheet would run as a formula (a device id or task type
    chosen by a token holder: "=HYPERLINK(...)") gets a leading ', as OWASP advises; numbers stay."""
    text = _text(value)
    return "'" + text if isinstance(value, str) and text.startswith(_FORMULA_STARTS) else text


def render_rows(fmt: str, fields: Sequence[str], rows: list[dict[str, Any]]) -> bytes:
    """The rows in one of :data:`FORMATS`."""
    if fmt == "json":
        return dumps(rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(fields)
        writer.writerows([[_cell(row[f]) for f in fields] for row in rows])
        return out.getvalue().encode()
    sep = "|" if fmt == "pipe" else "\t"
    text = _text if fmt == "pipe" else _cell

    def clean(value: Any) -> str:
        return text(value).replace(sep, " ").replace("\r", " ").replace("\n", " ")

    lines = [sep.join(fields)] + [sep.join(clean(row[f]) for f in fields) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "pipe")
    if fmt not in FORMATS:
        raise InvalidMessage(f"format must be one of {', '.join(FORMATS)}.", path="?format")
    return fmt


def _response(fmt: str, body: bytes) -> web.Response:
    return web.Response(body=body, content_type=FORMATS[fmt], charset=None if fmt == "json" else "utf-8")


class TextApi:
    """The handlers of the ``/text`` routes."""

    def __init__(self, web_app: WebApp) -> None:
        self.web = web_app

    async def _query(self, message_type: str, data: dict[str, Any], request: web.Request) -> Any:
        try:
            return await self.web.call(message_type, data, request)
        except InvalidMessage as exc:
            raise rebase(exc, "$.data.", "?") from None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/text/devices", self.devices)
        router.add_get("/text/status", self.status)
        router.add_get("/text/tasks", self.tasks)

    async def devices(self, request: web.Request) -> web.Response:
        check_query(request, {"format", "status"})
        fmt = _format(request)
        data = {"status": request.query["status"]} if "status" in request.query else {}
        devices = (await self._query("list_devices", data, request))["devices"]
        return _response(fmt, render_rows(fmt, DEVICE_FIELDS, [device_fields(d) for d in devices]))

    async def tasks(self, request: web.Request) -> web.Response:
        check_query(request, {"format", "status", "device_id", "task_type", "limit"})
        fmt = _format(request)
        data: dict[str, Any] = {k: request.query[k] for k in ("status", "device_id", "task_type")
                                if k in request.query}  # fmt: skip
        data["limit"] = query_int(request, "limit", 100, 1, 10_000)
        tasks = (await self._query("task_list", data, request))["tasks"]
        return _response(fmt, render_rows(fmt, TASK_FIELDS, [task_fields(t) for t in tasks]))

    async def status(self, request: web.Request) -> web.Response:
        """``key=value`` lines (or ``?format=json``): devices, slots, queue, tasks by state."""
        check_query(request, {"format"})
        fmt = request.query.get("format", "text")
        if fmt not in ("text", "json"):
            raise InvalidMessage("format must be text or json.", path="?format")
        status = await self.web.call("cluster_status", {}, request)
        pairs: dict[str, Any] = {"version": __version__, "uptime_s": status.get("uptime")}
        for state, n in (status.get("devices") or {}).items():
            pairs[f"devices_{state}"] = n
        slots = status.get("slots") or {}
        pairs["slots_total"], pairs["slots_busy"] = slots.get("total"), slots.get("busy")
        pairs["queue_length"] = status.get("queue_length")
        for state, n in (status.get("tasks") or {}).items():
            pairs[f"tasks_{state}"] = n
        if fmt == "json":
            return _response("json", dumps(pairs))
        return _response("pipe", "".join(f"{k}={_text(v)}\n" for k, v in pairs.items()).encode())
