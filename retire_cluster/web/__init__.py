"""The main node's HTTP side: JSON API, text and metrics endpoints, SSE streams, dashboard page.

Everything runs in the main node's own event loop (aiohttp, no threads, no
second process); :class:`~retire_cluster.main.node.MainNode` starts and stops
a :class:`WebApp` when ``MainConfig.http_enabled``.

Modules::

    app.py       WebApp: the aiohttp application, auth, errors, start/stop
    api.py       /api/v1: the JSON API (calls the same handlers as TCP)
    text.py      /text: pipe, CSV, TSV and key=value views
    metrics.py   /metrics: Prometheus exposition (one registry per node)
    events.py    /stream: event ring buffers, Last-Event-ID resume, log handler
    commands.py  the dashboard command line (POST /api/v1/command)
    render.py    ASCII tables and progress bars
    openapi.py   the OpenAPI document of the routes
    static/      the dashboard page (no CDN: everything is in the package)

This package imports aiohttp and prometheus_client only where they are used,
so ``from retire_cluster.web import HTTPBindError`` works without them (the
CLI needs that on workers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["HTTPBindError", "WebApp"]


class HTTPBindError(OSError):
    """The HTTP port could not be opened; the message says which and what to do."""


def __getattr__(name: str) -> Any:
    # WebApp pulls in aiohttp: load it on first use only.
    if name == "WebApp":
        from .app import WebApp

        return WebApp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
