"""Python clients of the main node."""

from __future__ import annotations

from .sync import Client, ClientError

__all__ = ["Client", "ClientError"]
