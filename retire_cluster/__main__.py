"""``python -m retire_cluster`` is the ``retire-cluster`` command."""

from __future__ import annotations

from .cli import main

main()
