"""The main node: server, registry, scheduler, monitor and store, wired by MainNode."""

from __future__ import annotations

from .config import ConfigError, MainConfig
from .node import MainNode, load_or_create_token

__all__ = ["ConfigError", "MainConfig", "MainNode", "load_or_create_token"]
