"""ASCII tables, progress bars and the device grid, as the dashboard prints them.

Pure functions from wire records to text: the page shows what
``POST /api/v1/command`` returns, and curl users get the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tables import (
    cut,
    display_width,
    format_ago,
    format_battery,
    format_bytes,
    format_load,
    pad,
    paused_reasons,
)

__all__ = [
    "box_table",
    "device_grid",
    "devices_table",
    "key_values",
    "progress_bar",
    "status_text",
    "task_progress",
    "task_text",
    "tasks_table",
]


def box_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table drawn with ``+``, ``-`` and ``|``; cells are left-aligned (by display width,
    so wide CJK characters line up)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(headers))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(row: list[str]) -> str:
        return "|" + "|".join(f" {pad(c, w)} " for c, w in zip(row, widths)) + "|"

    out = [rule, line(cells[0]), rule]
    out += [line(row) for row in cells[1:]]
    out.append(rule)
    return "\n".join(out)


def _cell(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text.replace("\n", " ")


def progress_bar(fraction: float | None, width: int = 20) -> str:
    """``[########------------]  40%``; ``[????]`` when unknown."""
    if fraction is None:
        return "[" + "?" * width + "]    ?"
    fraction = max(0.0, min(1.0, float(fraction)))
    filled = int(fraction * width + 0.5)  # half up, as the page (Math.round) does
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:3.0f}%"


def task_progress(task: dict[str, Any], width: int = 20) -> str:
    """The bar of one task: full when it ended, its reported progress while running."""
    status = task.get("status")
    if status == "completed":
        return progress_bar(1.0, width)
    if status in ("failed", "cancelled", "timeout"):
        return "[" + "x" * width + "] " + str(status)
    if status == "running":
        progress = task.get("progress")
        return progress_bar(float(progress) / 100 if isinstance(progress, (int, float)) else None, width)
    return progress_bar(0.0, width)


def _cpu_fraction(metrics: dict[str, Any]) -> float | None:
    cpu = metrics.get("cpu_usage")
    if isinstance(cpu, (int, float)) and not isinstance(cpu, bool):
        return float(cpu) / 100
    return None


def _battery_fraction(metrics: dict[str, Any]) -> float | None:
    pct = metrics.get("battery_percent")
    if isinstance(pct, (int, float)) and not isinstance(pct, bool):
        return float(pct) / 100
    return None


def devices_table(devices: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """The ``devices`` command: one row per device with load and slot bars."""
    if not devices:
        return "no devices yet: run the `retire-cluster worker ...` line the main node printed"
    rows = []
    for d in devices:
        info, hw = d.get("device_info") or {}, d.get("hardware_specs") or {}
        metrics = d.get("system_metrics") or {}
        status = str(d.get("status"))
        if status == "online" and not d.get("connected", True):
            status += " (away)"
        elif status == "online" and d.get("accepting") is False:
            status += " (paused)"
        slots = int(d.get("max_concurrent_tasks") or 0)
        busy = int(d.get("active_tasks") or 0)
        rows.append([
            d.get("device_id"), status, info.get("role") or "-", info.get("platform") or "-",
            hw.get("cpu_cores", "-"), format_bytes(hw.get("memory_total")),
            progress_bar(_cpu_fraction(metrics), 10) + " " + format_load(metrics),
            format_battery(metrics), progress_bar(busy / slots if slots else 0.0, 10) + f" {busy}/{slots}",
            format_ago(d.get("last_seen"), now),
        ])  # fmt: skip
    table = box_table(["device", "status", "role", "platform", "cores", "memory", "cpu", "battery", "slots",
                       "last seen"], rows)
    return "\n".join([table, *paused_reasons(list(devices))])


def tasks_table(tasks: Sequence[dict[str, Any]]) -> str:
    """The ``tasks`` command: newest first, with a progress bar each."""
    if not tasks:
        return "no tasks"
    rows = [
        [t.get("task_id"), t.get("task_type"), t.get("status"), t.get("priority"), t.get("attempt"),
         t.get("assigned_device") or "-", task_progress(t, 12), t.get("created_at") or "-"]
        for t in tasks
    ]  # fmt: skip
    return box_table(["task", "type", "status", "priority", "attempt", "device", "progress", "created"], rows)


def key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max((display_width(k) for k, _ in pairs), default=0)
    return "\n".join(f"{pad(k, width)}  {v}" for k, v in pairs)


def status_text(status: dict[str, Any], version: str) -> str:
    """The ``status`` command: devices, slots (with a bar), queue, tasks by state."""
    devices, slots, tasks = status.get("devices") or {}, status.get("slots") or {}, status.get("tasks") or {}
    total, busy = int(slots.get("total") or 0), int(slots.get("busy") or 0)
    pairs: list[tuple[str, Any]] = [
        ("version", version),
        ("uptime", f"{float(status.get('uptime') or 0):.0f} s"),
        ("devices", f"{devices.get('online', 0)} online, {devices.get('offline', 0)} offline"),
        ("slots", f"{progress_bar(busy / total if total else 0.0)} {busy}/{total} busy"),
        ("queue", status.get("queue_length", 0)),
    ]
    pairs += [(f"tasks {k}", v) for k, v in tasks.items()]
    from ..tables import stuck_lines

    return "\n".join([key_values(pairs), *stuck_lines(status)])


def task_text(task: dict[str, Any], device: dict[str, Any] | None = None) -> str:
    """The head of the ``task ID`` command: its bar, then every field (see tables.task_detail).

    ``device``: the record of the device that holds it, to say so when it is not connected.
    """
    from ..tables import task_detail

    return f"{task_progress(task)}  {task.get('status')}\n\n{task_detail(task, device)}"


def device_grid(devices: Sequence[dict[str, Any]], columns: int = 4) -> str:
    """Small boxes, one per device: state, battery and load at a glance."""
    if not devices:
        return "no devices yet"
    cells = []
    for d in devices:
        metrics = d.get("system_metrics") or {}
        state = str(d.get("status"))
        if state == "online" and d.get("accepting") is False:
            state = "paused"
        cells.append([
            cut(str(d.get("device_id")), 22),
            f"state {state}",
            f"bat {progress_bar(_battery_fraction(metrics), 8)}",
            f"cpu {progress_bar(_cpu_fraction(metrics), 8)}",
            f"tasks {d.get('active_tasks', 0)}/{d.get('max_concurrent_tasks', 0)}",
        ])
    width = max(display_width(line) for cell in cells for line in cell)
    out = []
    for start in range(0, len(cells), columns):
        group = cells[start : start + columns]
        out.append(" ".join("+" + "-" * (width + 2) + "+" for _ in group))
        for i in range(len(group[0])):
            out.append(" ".join(f"| {pad(cell[i], width)} |" for cell in group))
        out.append(" ".join("+" + "-" * (width + 2) + "+" for _ in group))
    return "\n".join(out)

