"""Process-level helpers shared by the main node and the worker: event loop, logging.

Python 3.9 syntax, standard library only (uvloop when importable).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import logging.handlers
import os
import queue
import sys
from pathlib import Path
from typing import Any, Coroutine, Optional, TypeVar

__all__ = ["LockHeld", "hold_lock", "run", "setup_logging", "tune_gc", "uvloop_available"]

T = TypeVar("T")


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is what it wrote there (None if unreadable)."""

    def __init__(self, path: Path, pid: Optional[int]) -> None:
        super().__init__(f"{path} is held by {'process ' + str(pid) if pid else 'another process'}")
        self.path, self.pid = path, pid


def hold_lock(path: Path) -> Optional[int]:
    """Lock ``path`` for this process (it is created); returns the descriptor to keep open.

    A POSIX record lock: the kernel drops it when the process ends, ``kill -9``
    included, so a crash never leaves a stale lock. Returns None where fcntl
    is missing (Windows): nothing is locked there.

    Raises:
        LockHeld: another process holds it.
    """
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise LockHeld(path, int(holder) if holder.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], *, fast_loop: bool = True) -> T:
    """Run ``main`` on a fresh event loop: uvloop when importable (and
    ``fast_loop``), asyncio's otherwise."""
    if not fast_loop:
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    uvloop.install()  # pragma: no cover - Python < 3.11 workers
    return asyncio.run(main)  # pragma: no cover


#: Container allocations between two collections of the youngest GC
#: generation. The main node allocates dozens of short-lived containers per
#: message (dicts, futures, closures): at CPython's default of 700 the cyclic
#: collector ran every few messages, and raising it cut the main node's CPU
#: per no-op task by 6-16% in benchmarks/tasks.py.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a long-running server process, once its startup state is built:
    freeze what exists now (the collector never scans it again) and collect
    the young generation less often. Reference counting still frees all
    non-cyclic garbage at once."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


_listener: Optional[logging.handlers.QueueListener] = None


#: Libraries whose debug output is about their own internals, kept at INFO or above.
_NOISY_LIBRARIES = ("aiosqlite", "asyncio")


def setup_logging(level: str = "info", log_file: Optional[Path] = None) -> None:
    """Log to stderr, and to a rotating file (10 MiB x 5) when ``log_file`` is set.

    The file is written by a QueueListener thread so a slow disk never stalls
    the event loop.
    """
    global _listener
    root = logging.getLogger()
    chosen = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(chosen)
    # --log-level debug is for our own loggers: aiosqlite would log every SQL statement.
    for noisy in _NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(chosen, logging.INFO))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    root.addHandler(stderr)
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
        rotating.setFormatter(fmt)
        q: "queue.SimpleQueue[logging.LogRecord]" = queue.SimpleQueue()
        root.addHandler(logging.handlers.QueueHandler(q))
        if _listener is not None:
            _listener.stop()
        _listener = logging.handlers.QueueListener(q, rotating)
        _listener.start()


def stop_logging() -> None:
    """Flush the file log (call before exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
