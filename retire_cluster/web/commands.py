"""The dashboard's command line, run on the main node (``POST /api/v1/command``).

One line in, ``{"command", "text", "json"}`` out: ``text`` is what the page
prints (ASCII tables, progress bars), ``json`` the same data for programs.
Every command goes through :meth:`WebApp.call`, i.e. the same validation and
handlers as a TCP client, so an unknown task is ``not_found`` (404) here too.
A line the parser does not understand is ``invalid_message`` (400) with the
usage of the command.

Commands the page runs by itself (they change only the browser): ``clear``,
``theme NAME``, ``history``, ``logout``; and ``watch`` is live there (SSE),
while here it answers one snapshot plus ``"action": {"watch": ...}``.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..protocol.codec import loads
from ..protocol.errors import InvalidMessage
from ..protocol.messages import REQUIREMENT_KEYS, TaskStatus
from .render import (
    device_grid,
    devices_table,
    progress_bar,
    status_text,
    task_progress,
    task_text,
    tasks_table,
)

if TYPE_CHECKING:
    from aiohttp import web

    from .app import WebApp

__all__ = ["COMMANDS", "Commands", "help_text", "parse_value"]

#: name -> (usage, what it does); the page's `help` and tab completion use it too
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("help", "this list"),
    "status": ("status", "devices, slots, queue and tasks by state"),
    "devices": ("devices [online|offline]", "the devices: state, load, battery, slots"),
    "grid": ("grid", "one box per device: state, battery, load"),
    "tasks": ("tasks [STATUS] [--limit N] [--device ID] [--type TYPE]", "tasks, newest first"),
    "task": ("task ID", "one task: progress, result, attempts"),
    "submit": ("submit TYPE [key=value ...] [--priority P] [--timeout S] [--max-retries N] "
               "[--requires key=value] [--watch]", "submit a task; key=value pairs are its payload"),
    "cancel": ("cancel ID", "cancel a task that has not ended"),
    "watch": ("watch [ID]", "live task updates (one task until it ends, or all)"),
    "logs": ("logs", "the main node's log, live"),
    "clear": ("clear", "clear the screen (page only)"),
    "theme": ("theme matrix|amber|blue", "switch colours (page only)"),
    "history": ("history", "the commands you typed (page only)"),
    "logout": ("logout", "forget the token (page only)"),
}
PAGE_ONLY = frozenset({"clear", "theme", "history", "logout"})


def parse_value(text: str) -> Any:
    """``3`` -> 3, ``true`` -> True, ``[1,2]`` -> a list, ``"a b"`` -> 'a b', else the text itself.

    Strict JSON, as on the wire: ``NaN`` and ``Infinity`` stay text.
    """
    try:
        return loads(text)
    except ValueError:
        return text


#: The width `help` fits in: a terminal's classic 80 columns (the page's output is about as wide).
HELP_COLUMNS = 80
HELP_FOOTER = "Tab completes commands and device/task ids; up/down walks the history."


def _fill(words: list[str], width: int, indent: str = "") -> list[str]:
    """Words into lines of at most ``width`` characters (a longer single word stays whole)."""
    lines: list[str] = []
    line = ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def help_text(columns: int = HELP_COLUMNS) -> str:
    """The command list in ``columns`` columns: usage on the left, what it does on the right; a
    usage too long for the left column gets its own lines (continued under an indent)."""
    columns = max(40, columns)
    left = min(max(len(usage) for usage, _ in COMMANDS.values()), columns // 3)
    indent = " " * (left + 2)
    lines: list[str] = []
    for usage, what in COMMANDS.values():
        said = _fill(what.split(), columns - len(indent)) or [""]
        if len(usage) <= left:
            lines.append(f"{usage.ljust(left)}  {said[0]}".rstrip())
        else:
            # Keep each [option VALUE] together: break only between them.
            lines += _fill(re.findall(r"\[[^\]]*\]|\S+", usage), columns, "    ")
            lines.append(indent + said[0])
        lines += [indent + more for more in said[1:]]
    return "\n".join([*lines, "", *_fill(HELP_FOOTER.split(), columns)])


def _usage(name: str, problem: str) -> InvalidMessage:
    return InvalidMessage(f"{problem}; usage: {COMMANDS[name][0]}", path="$.command")


def _stray(name: str, args: list[str], allowed: int = 0) -> None:
    """Refuse words beyond the ``allowed`` first ones, naming the first stray one."""
    if len(args) > allowed:
        extra = args[allowed]
        what = "option" if extra.startswith("--") else "word"
        raise _usage(name, f"unexpected {what} {extra!r} after `{' '.join([name, *args[:allowed]])}`")


def _options(name: str, args: list[str], takes_value: set[str], flags: frozenset[str] = frozenset(),
             repeatable: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    """Split ``--opt value`` / ``--opt=value`` / ``--flag`` from positional words.

    An option given twice is refused unless it is ``repeatable`` (the last one would win silently).
    """
    words: list[str] = []
    opts: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if key in opts and key not in repeatable:
                raise _usage(name, f"--{key} is given twice")
            if key in flags:
                if eq:
                    raise _usage(name, f"--{key} takes no value (got {arg!r})")
                opts[key] = True
            elif key in takes_value:
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise _usage(name, f"--{key} needs a value")
                    value = args[i]
                opts.setdefault(key, []).append(value)
            else:
                raise _usage(name, f"unknown option --{key}")
        else:
            words.append(arg)
        i += 1
    return words, opts


class Commands:
    """Runs command lines against one web app's node."""

    def __init__(self, web_app: WebApp) -> None:
        self.web = web_app

    async def run(self, line: str, request: web.Request | None = None) -> dict[str, Any]:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise InvalidMessage(f"cannot split the command line: {exc}.", path="$.command") from None
        if not words:
            return {"command": line, "text": "", "json": None}
        name, args = words[0].lower(), words[1:]
        if name not in COMMANDS:
            raise InvalidMessage(f"unknown command {words[0]!r}; `help` lists them.", path="$.command")
        if name in PAGE_ONLY:
            raise InvalidMessage(f"`{name}` changes only the page; type it there.", path="$.command")
        self._request = request
        text, data, action = await getattr(self, f"cmd_{name}")(args)
        out: dict[str, Any] = {"command": line, "text": text, "json": data}
        if action is not None:
            out["action"] = action
        return out

    async def _call(self, message_type: str, data: dict[str, Any]) -> Any:
        return await self.web.call(message_type, data, self._request)

    # -- the commands -----------------------------------------------------

    async def cmd_help(self, args: list[str]) -> tuple[str, Any, Any]:
        _stray("help", args)
        return help_text(), {"commands": {k: {"usage": u, "help": h} for k, (u, h) in COMMANDS.items()}}, None

    async def cmd_status(self, args: list[str]) -> tuple[str, Any, Any]:
        _stray("status", args)
        status = await self._call("cluster_status", {})
        status["version"] = __version__
        return status_text(status, __version__), status, None

    async def cmd_devices(self, args: list[str]) -> tuple[str, Any, Any]:
        if args and args[0] not in ("online", "offline"):
            raise _usage("devices", f"{args[0]!r} is not a filter: the only ones are online and offline")
        _stray("devices", args, 1)
        devices = (await self._call("list_devices", {"status": args[0]} if args else {}))["devices"]
        return devices_table(devices, self.web.node.clock()), {"devices": devices}, None

    async def cmd_grid(self, args: list[str]) -> tuple[str, Any, Any]:
        _stray("grid", args)
        devices = (await self._call("list_devices", {}))["devices"]
        return device_grid(devices), {"devices": devices}, None

    async def cmd_tasks(self, args: list[str]) -> tuple[str, Any, Any]:
        words, opts = _options("tasks", args, {"limit", "device", "type"})
        data: dict[str, Any] = {"limit": 20}
        if words and words[0] not in {s.value for s in TaskStatus}:
            raise _usage("tasks", f"{words[0]!r} is not a task state: STATUS is one of "
                                  f"{', '.join(s.value for s in TaskStatus)}")  # fmt: skip
        _stray("tasks", words, 1)
        if words:
            data["status"] = words[0]
        if "limit" in opts:
            try:
                data["limit"] = int(opts["limit"][-1])
            except ValueError:
                raise _usage("tasks", "--limit needs a number") from None
        if "device" in opts:
            data["device_id"] = opts["device"][-1]
        if "type" in opts:
            data["task_type"] = opts["type"][-1]
        tasks = (await self._call("task_list", data))["tasks"]
        return tasks_table(tasks), {"tasks": tasks}, None

    async def cmd_task(self, args: list[str]) -> tuple[str, Any, Any]:
        if not args:
            raise _usage("task", "give one task id")
        _stray("task", args, 1)
        task = (await self._call("task_status", {"task_id": args[0]}))["task"]
        holder = self.web.node.registry.get(task.get("assigned_device") or "")  # as the CLI's `task` shows it
        return task_text(task, holder.to_record() if holder is not None else None), {"task": task}, None

    async def cmd_cancel(self, args: list[str]) -> tuple[str, Any, Any]:
        if not args:
            raise _usage("cancel", "give one task id")
        _stray("cancel", args, 1)
        result = await self._call("task_cancel", {"task_id": args[0]})
        return f"{task_progress({'status': 'cancelled'})}  {result['task_id']}", result, None

    async def cmd_submit(self, args: list[str]) -> tuple[str, Any, Any]:
        words, opts = _options("submit", args, {"priority", "timeout", "max-retries", "requires"},
                               frozenset({"watch"}), repeatable=frozenset({"requires"}))
        if not words:
            raise _usage("submit", "give the task type")
        spec: dict[str, Any] = {"task_type": words[0], "payload": self._payload(words[1:])}
        if "priority" in opts:
            spec["priority"] = parse_value(opts["priority"][-1])  # a name or a number; the schema says which
        for key, name, kinds in (("timeout", "timeout", (int, float)), ("max-retries", "max_retries", (int,))):
            if key in opts:
                spec[name] = parse_value(opts[key][-1])
                if type(spec[name]) not in kinds:
                    raise _usage("submit", f"--{key} needs {'a whole' if kinds == (int,) else 'a'} number")
        if "requires" in opts:
            spec["requirements"] = self._requirements(opts["requires"])
        try:
            result = await self._call("task_submit", {"task": spec})
        except InvalidMessage as exc:
            raise InvalidMessage(exc.message.replace("$.data.task", "task", 1), path=exc.path) from None
        task_id = result["task_id"]
        text = f"submitted {task_id}  {progress_bar(0.0)} pending"
        if result.get("existing"):
            text = f"already submitted as {task_id}"
        action = {"watch": task_id} if opts.get("watch") else None
        return text, {"task_id": task_id, "task": spec}, action

    @staticmethod
    def _payload(words: list[str]) -> dict[str, Any]:
        if len(words) == 1 and words[0].lstrip().startswith("{"):
            payload = parse_value(words[0])
            if not isinstance(payload, dict):
                raise _usage("submit", "the payload is not a JSON object")
            return payload
        payload = {}
        for word in words:
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise _usage("submit", f"{word!r} is not key=value (or give one JSON object)")
            payload[key] = parse_value(value)
        return payload

    @staticmethod
    def _requirements(items: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or key not in REQUIREMENT_KEYS:
                raise _usage("submit", f"--requires {item!r}: use key=value with a key from "
                                       f"{', '.join(sorted(REQUIREMENT_KEYS))}")  # fmt: skip
            out[key] = [c for c in value.split(",") if c] if key == "capabilities" else parse_value(value)
        return out

    async def cmd_watch(self, args: list[str]) -> tuple[str, Any, Any]:
        _stray("watch", args, 1)
        if args:
            task = (await self._call("task_status", {"task_id": args[0]}))["task"]
            text = f"{task_progress(task)}  {task['status']}  {task['task_id']}"
            return text, {"task": task}, {"watch": task["task_id"]}
        tasks = (await self._call("task_list", {"limit": 10}))["tasks"]
        return tasks_table(tasks), {"tasks": tasks}, {"watch": None}

    async def cmd_logs(self, args: list[str]) -> tuple[str, Any, Any]:
        _stray("logs", args)
        return "the log streams live on the page (GET /stream/logs)", {}, {"logs": True}

