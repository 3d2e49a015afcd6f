"""A live view of the cluster: the newest tasks from pushed updates, devices re-read periodically.

``retire-cluster watch`` draws it; :func:`watch` drives it and calls ``draw(view)``
after each refresh and, when ``redraw_on_change``, after task changes (at most
ten times a second). Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, List

from ..tables import (
    DEVICE_HEADERS,
    TASK_HEADERS,
    device_row,
    format_table,
    status_summary,
    stuck_lines,
    task_row,
)
from .aio import AsyncClient
from .common import within

__all__ = ["View", "render", "watch"]

_REDRAW_EVERY_S = 0.1


class View:
    """What a frame shows: the newest ``limit`` tasks, the devices, the cluster status."""

    def __init__(self, main: str, limit: int) -> None:
        self.main = main
        self.limit = limit
        self.tasks: Dict[str, Dict[str, Any]] = {}
        self.devices: List[Dict[str, Any]] = []
        self.status: Dict[str, Any] = {}
        self.connected = True

    def update(self, record: Dict[str, Any]) -> None:
        self.tasks[str(record.get("task_id"))] = record
        if len(self.tasks) > self.limit:
            for task in self.newest()[self.limit :]:
                self.tasks.pop(str(task.get("task_id")), None)

    def newest(self) -> List[Dict[str, Any]]:
        return sorted(self.tasks.values(), key=lambda t: str(t.get("created_at") or ""), reverse=True)

    def to_json(self) -> Dict[str, Any]:
        return {"status": self.status, "devices": self.devices, "tasks": self.newest()}


def render(view: View, now: float) -> str:
    """The text of one frame."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    lines = [f"retire-cluster {view.main}  {stamp}" + ("" if view.connected else "  (reconnecting...)"),
             status_summary(view.status), *stuck_lines(view.status), ""]
    if view.devices:
        lines.append(format_table(DEVICE_HEADERS, [device_row(d, now) for d in view.devices]))
    else:
        lines.append("no devices yet")
    lines.append("")
    tasks = view.newest()
    lines.append(format_table(TASK_HEADERS, [task_row(t) for t in tasks]) if tasks else "no tasks yet")
    return "\n".join(lines)


async def watch(client: AsyncClient, view: View, draw: Callable[[View], None], *, interval_s: float = 2.0,
                once: bool = False, redraw_on_change: bool = True) -> None:
    """Fill ``view`` and call ``draw`` until cancelled (or once, with ``once``)."""
    stream = client.updates()  # before subscribing, so no update falls in between
    try:
        await client.subscribe()
        for record in reversed(await client.tasks(limit=view.limit)):
            view.update(record)
        loop = asyncio.get_running_loop()
        while True:
            view.devices, view.status = await asyncio.gather(client.devices(), client.cluster_status())
            view.connected = client.connected
            draw(view)
            if once:
                return
            refresh_at = loop.time() + interval_s
            while loop.time() < refresh_at:
                try:
                    view.update(await within(stream.get(), refresh_at - loop.time()))
                except asyncio.TimeoutError:
                    break
                if redraw_on_change:
                    settle_at = min(loop.time() + _REDRAW_EVERY_S, refresh_at)
                    while loop.time() < settle_at:  # take the rest of a burst before drawing
                        try:
                            view.update(await within(stream.get(), settle_at - loop.time()))
                        except asyncio.TimeoutError:
                            break
                    view.connected = client.connected
                    draw(view)
    finally:
        stream.close()
