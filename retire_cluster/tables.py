"""Plain-text tables, sizes, and views of device and task records for the terminal (standard library only)."""

from __future__ import annotations

import json
import time
import unicodedata
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "DEVICE_HEADERS",
    "HANDBACK_OUTCOMES",
    "HELD_STATUSES",
    "TASK_HEADERS",
    "attempt_text",
    "cut",
    "device_row",
    "display_width",
    "format_ago",
    "format_battery",
    "format_bytes",
    "format_duration",
    "format_load",
    "format_seconds",
    "format_table",
    "pad",
    "parse_timestamp",
    "status_summary",
    "task_detail",
    "task_row",
]


# -- display width: what a terminal shows, not what len() counts ------------------------------


def _char_width(ch: str) -> int:
    """Columns one character takes on a terminal: 2 for East Asian wide/fullwidth, 0 for
    combining marks and other zero-width characters, else 1."""
    if ch < "\u0300":  # ASCII and Latin-1: one column, as len() counts them
        return 1
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal ('日本' is 4, 'e\u0301' is 1)."""
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` columns (ljust by display width)."""
    return text + " " * max(0, width - display_width(text))


def cut(text: str, width: int, marker: str = "") -> str:
    """The longest start of ``text`` that fits in ``width`` columns, never splitting a wide
    character; with ``marker`` (such as '...'), a cut text ends with it, still within ``width``."""
    if display_width(text) <= width:
        return text
    room = max(0, width - display_width(marker))
    out, used = [], 0
    for ch in text:
        w = _char_width(ch)
        if used + w > room:
            break
        out.append(ch)
        used += w
    return "".join(out) + (marker if display_width(marker) <= width else "")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header.

    Columns are measured in display width, so wide (CJK) characters line up."""
    cells: List[List[str]] = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(pad(c, w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_bytes(value: Optional[Any]) -> str:
    """1536 -> '1.5 KiB'; None or garbage -> '-'."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover


# -- views of the wire records (devices, tasks) for the CLI ---------------------------------


def parse_timestamp(value: Optional[Any]) -> Optional[float]:
    """RFC 3339 UTC (``2024-01-15T10:30:00.000Z``, as the main node writes) to epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def format_ago(value: Optional[Any], now: Optional[float] = None) -> str:
    """A timestamp as '4s ago', '3m ago', '2h ago', '5d ago'; '-' when unknown."""
    epoch = parse_timestamp(value)
    if epoch is None:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _seconds(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def format_seconds(value: Any) -> str:
    """0.0312 -> '0.031 s', 754 -> '12.6 min'; '-' when not a number of seconds."""
    seconds = _seconds(value)
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def format_duration(start: Optional[Any], end: Optional[Any]) -> str:
    """Seconds between two timestamps, '-' when one is missing."""
    a, b = parse_timestamp(start), parse_timestamp(end)
    if a is None or b is None:
        return "-"
    return format_seconds(max(0.0, b - a))


def format_battery(metrics: Dict[str, Any]) -> str:
    """'87%', '87% charging', 'charging', or '-' (system_metrics.battery_percent / charging)."""
    pct, charging = metrics.get("battery_percent"), metrics.get("charging")
    parts = []
    if isinstance(pct, (int, float)) and not isinstance(pct, bool):
        parts.append(f"{pct:.0f}%")
    if charging is True:
        parts.append("charging")
    return " ".join(parts) or "-"


def format_load(metrics: Dict[str, Any]) -> str:
    """The 1-minute load average, else the CPU percent, else '-'."""
    load = metrics.get("load_average")
    if isinstance(load, (list, tuple)) and load and isinstance(load[0], (int, float)):
        return f"{load[0]:.2f}"
    cpu = metrics.get("cpu_usage")
    if isinstance(cpu, (int, float)) and not isinstance(cpu, bool):
        return f"{cpu:.0f}% cpu"
    return "-"


DEVICE_HEADERS = ("device", "status", "role", "platform", "cores", "memory", "load", "battery", "tasks",
                  "ok/failed", "avg time", "breaker", "last seen")


def device_row(d: Dict[str, Any], now: Optional[float] = None) -> List[str]:
    info, hw = d.get("device_info") or {}, d.get("hardware_specs") or {}
    metrics = d.get("system_metrics") or {}
    stats = d.get("statistics") or {}
    status = str(d.get("status", "?"))
    if status == "online" and not d.get("connected", True):
        status += " (away)"
    elif status == "online" and d.get("accepting") is False:
        status += " (paused)"
    return [
        str(d.get("device_id")), status, str(info.get("role") or "-"), str(info.get("platform") or "-"),
        str(hw.get("cpu_cores", "-")), format_bytes(hw.get("memory_total")), format_load(metrics),
        format_battery(metrics), f"{d.get('active_tasks', 0)}/{d.get('max_concurrent_tasks', 0)}",
        f"{stats.get('successes', 0)}/{stats.get('failures', 0)}",
        "-" if stats.get("average_time") is None else f"{stats['average_time']:.3f} s",
        str((d.get("circuit_breaker") or {}).get("state", "-")), format_ago(d.get("last_seen"), now),
    ]  # fmt: skip


def paused_reasons(devices: List[Dict[str, Any]]) -> List[str]:
    """Why each paused device takes no work (its owner's rule, a refusal): too long for a table column."""
    return [f"{d.get('device_id')} is paused: {d.get('reason')}" for d in devices
            if d.get("status") == "online" and d.get("accepting") is False and d.get("reason")]


TASK_HEADERS = ("task", "type", "status", "priority", "attempt", "device", "created")


def task_row(t: Dict[str, Any]) -> List[str]:
    status = str(t.get("status"))
    progress = t.get("progress")
    if status == "running" and isinstance(progress, (int, float)):
        status += f" {progress:.0f}%"
    return [str(t.get("task_id")), str(t.get("task_type")), status, str(t.get("priority", "-")),
            str(t.get("attempt", 0)), str(t.get("assigned_device") or "-"), str(t.get("created_at") or "-")]


#: Attempt outcomes where the task went back without being run (PROTOCOL.md, "task record"):
#: the worker handed it back or refused it, or never received it. They use no retry.
HANDBACK_OUTCOMES = frozenset({"handed_back", "refused", "not_received"})


def attempt_text(record: Dict[str, Any]) -> str:
    """The task record's ``attempt`` with what it means for ``max_retries``.

    ``attempt`` counts assignments (it matches the attempts table); hand-backs
    (a worker refused or gave the task back, or never received it) are
    assignments too but use no retry, so they are counted apart:
    '1 (at most 4)', or '5 (3 counted, at most 4; 2 hand-backs, which use no retry)'.
    """
    attempt = record.get("attempt", 0)
    attempts = record.get("attempts") or []
    handbacks = sum(1 for a in attempts if isinstance(a, dict) and a.get("outcome") in HANDBACK_OUTCOMES)
    retries = record.get("max_retries")
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        return str(attempt)
    limit = f"at most {retries + 1}" if isinstance(retries, int) and not isinstance(retries, bool) else ""
    if not handbacks:
        return f"{attempt} ({limit})" if limit else str(attempt)
    counted = max(0, attempt - handbacks)
    back = f"{handbacks} hand-back{'' if handbacks == 1 else 's'}, which use{'s' if handbacks == 1 else ''} no retry"
    return f"{attempt} ({counted} counted{', ' + limit if limit else ''}; {back})"


def _attempt_took(record: Dict[str, Any], attempt: Dict[str, Any]) -> str:
    """How long one attempt ran: the run time the device reported for the attempt that ended
    the task, else started..finished; never from the assignment (that would count the wait,
    or the time a restarted main node took to hear the result)."""
    if attempt.get("outcome") in HANDBACK_OUTCOMES:
        return "-"  # it never ran
    ended_task = (attempt.get("attempt") == record.get("attempt") and attempt.get("finished_at")
                  and record.get("status") == attempt.get("outcome"))
    if ended_task and _seconds(record.get("execution_time")) is not None:
        return format_seconds(record["execution_time"])
    if attempt.get("started_at"):
        return format_duration(attempt.get("started_at"), attempt.get("finished_at"))
    return "-"


#: The states in which a device holds the task (task_detail says when that device is not connected).
HELD_STATUSES = ("assigned", "running")


def task_detail(record: Dict[str, Any], device: Optional[Dict[str, Any]] = None) -> str:
    """Every field of a task record, then its attempts (device, times, outcome).

    ``device``: the record of the device that holds the task, when known: if
    it is not connected, the device line says so (the task looks stuck until
    the device comes back or the main node gives up on it).
    """
    result = record.get("result") or {}
    held_by = record.get("assigned_device") or "-"
    if device is not None and not device.get("connected") and record.get("status") in HELD_STATUSES:
        held_by += (f" (not connected, last seen {format_ago(device.get('last_seen'))}: the task goes back to "
                    "the queue unless the device returns within the main node's --offline-timeout)")
    fields: List[Any] = [
        ("task", record.get("task_id")), ("type", record.get("task_type")), ("status", record.get("status")),
        ("priority", record.get("priority")), ("timeout", f"{record.get('timeout')} s"),
        ("attempt", attempt_text(record)),
        ("device", held_by),
        ("requirements", json.dumps(record.get("requirements") or {}, ensure_ascii=False, sort_keys=True)),
        ("payload", json.dumps(record.get("payload"), ensure_ascii=False, sort_keys=True)),
        ("created", record.get("created_at") or "-"), ("assigned", record.get("assigned_at") or "-"),
        ("started", record.get("started_at") or "-"), ("finished", record.get("finished_at") or "-"),
    ]  # fmt: skip
    if record.get("waiting"):
        fields.insert(3, ("waiting", record["waiting"]))
    if _seconds(record.get("execution_time")) is not None:
        fields.append(("took", f"{format_seconds(record['execution_time'])} (run time the device reported)"))
    if record.get("progress") is not None and record.get("status") == "running":
        fields.append(("progress", f"{record['progress']}%"))
    if record.get("error"):
        fields.append(("error", record["error"]))
    if result.get("exit_code") is not None:
        fields.append(("exit code", result["exit_code"]))
    if result.get("output") is not None:
        fields.append(("output", result["output"]))
    if result.get("stdout"):
        fields.append(("stdout", str(result["stdout"]).rstrip()))
    if result.get("truncated"):
        fields.append(("truncated", "yes: the output was cut to fit the limit"))
    if result.get("stderr"):
        fields.append(("stderr", str(result["stderr"]).rstrip()))
    width = max(display_width(k) for k, _ in fields)
    lines = [f"{pad(key, width)}  {value}" for key, value in fields]
    attempts: List[Dict[str, Any]] = record.get("attempts") or []
    lines.append("")
    if attempts:
        rows = [[str(a.get("attempt")), str(a.get("device_id")), str(a.get("assigned_at") or "-"),
                 str(a.get("started_at") or "-"), str(a.get("finished_at") or "-"), _attempt_took(record, a),
                 str(a.get("outcome") or ("running" if not a.get("finished_at") else "-"))] for a in attempts]
        lines.append(format_table(["attempt", "device", "assigned", "started", "finished", "took", "outcome"],
                                  rows))
    else:
        lines.append("no attempts yet: no device has taken it")
    return "\n".join(lines)


def stuck_lines(status: Dict[str, Any]) -> List[str]:
    """One line per kind of queued task that no known device can run (cluster_status's ``stuck``)."""
    lines = []
    for item in status.get("stuck") or []:
        req = item.get("requirements") or {}
        what = str(item.get("task_type")) + (" " + json.dumps(req, ensure_ascii=False, sort_keys=True) if req else "")
        n = item.get("tasks")
        lines.append(f"stuck: {n} {what} task{'' if n == 1 else 's'}: {item.get('reason')}")
    return lines


def status_summary(status: Dict[str, Any]) -> str:
    """One line: devices, slots, queue, and tasks by state (from cluster_status)."""
    devices, slots = status.get("devices") or {}, status.get("slots") or {}
    tasks = status.get("tasks") or {}
    counts = ", ".join(f"{v} {k}" for k, v in tasks.items() if v) or "none"
    return (f"devices: {devices.get('online', 0)} online, {devices.get('offline', 0)} offline; "
            f"slots: {slots.get('busy', 0)}/{slots.get('total', 0)} busy; "
            f"queue: {status.get('queue_length', 0)}; tasks: {counts}")
