"""Results waiting for the main node's acknowledgement, kept on disk.

A result is kept here from the moment its task ends until the main node
acknowledged it. While connected it is sent at once and kept in memory (an
fsync per task would dominate on an SD card); if the connection is lost
first, or the result finished while disconnected, it is written to disk. A worker that lost its connection, or was
restarted, reports these tasks as still held at ``register`` and sends them
again, so no finished work is lost and nothing has to run twice.

One small JSON file per result, written to a temporary name, flushed and
renamed into place, so a crash leaves either the whole file or none.
Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

__all__ = ["Outbox"]

log = logging.getLogger("retire_cluster.worker")

Key = Tuple[str, int]


class Outbox:
    """Results by (task_id, attempt), mirrored in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._items: Dict[Key, Dict[str, Any]] = {}
        self._volatile: "set[Key]" = set()
        self._load()

    def _path(self, key: Key) -> Path:
        import hashlib  # here, not at the top: a connected worker never needs it (its OpenSSL bindings cost RSS)

        digest = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                key = (str(data["task_id"]), int(data["attempt"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable result file %s", path)
                continue
            self._items[key] = data
        if self._items:
            log.info("%d result(s) from an earlier run wait to be delivered", len(self._items))

    def put(self, key: Key, data: Dict[str, Any], *, durable: bool = True) -> None:
        """Keep ``data`` (the task_result content) until :meth:`remove`.

        ``durable=False`` keeps it in memory only (it is about to be sent on a
        live connection); :meth:`spill` writes such entries to disk when the
        connection is lost before they were acknowledged.
        """
        self._items[key] = data
        if durable:
            self._write(key, data)
        else:
            self._volatile.add(key)

    def spill(self) -> None:
        """Write every entry kept only in memory to disk."""
        for key in sorted(self._volatile):
            data = self._items.get(key)
            if data is not None:
                self._write(key, data)
        self._volatile.clear()

    def _write(self, key: Key, data: Dict[str, Any]) -> None:
        self._volatile.discard(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def remove(self, key: Key) -> None:
        if key in self._volatile:
            self._volatile.discard(key)
            self._items.pop(key, None)
            return
        if self._items.pop(key, None) is not None:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass

    def get(self, key: Key) -> Any:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
