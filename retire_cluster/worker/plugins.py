"""Plug-in task types: found through the ``retire_cluster.task_types`` entry point group.

A plug-in is a distribution that declares, for example::

    [project.entry-points."retire_cluster.task_types"]
    wordcount = "retire_cluster_wordcount:WordCount"

The entry point loads to a class (instantiated with no arguments) or an
object with a ``name`` (the task type, a str) and::

    async def run(self, payload: dict, context: TaskContext) -> str | dict

(or a plain ``def run``, which runs in a thread of its own; see below).

A str is the output; a dict may carry ``output``, ``exit_code`` (non-zero
means failed, as for ``command``), ``stderr`` and ``metrics``; an exception
means failed with its message (SystemExit too, and a CancelledError it raises
while the task was not cancelled: neither stops the worker). ``context`` gives ``progress(percent,
message)``, ``timeout_s`` and ``scratch_dir`` (removed after the task).

Installed plug-ins are enabled: installing one on a device is its owner's
decision. They run inside the worker process: trusted code. An ``async def
run`` runs on the worker's event loop and must not block; the task timeout
cancels it. A plain ``def run`` runs in a thread of its own (it may block;
``context.progress`` may be called from it); at the timeout or a cancel its
task ends at once, but the thread cannot be stopped, so it keeps a task slot
until it returns. A
plug-in whose import fails is logged in one line (the traceback with
--log-level debug) and skipped, and one whose name is
taken by a built-in type (or an earlier plug-in) is refused: neither can
stop the worker.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from ..protocol.codec import dumps

__all__ = ["ENTRY_POINT_GROUP", "PluginResult", "TaskContext", "entry_points", "load_plugins", "plugin_result"]

log = logging.getLogger("retire_cluster.worker")

ENTRY_POINT_GROUP = "retire_cluster.task_types"


@dataclass(frozen=True)
class TaskContext:
    """What a plug-in's ``run`` gets besides the payload.

    Attributes:
        progress: ``progress(percent, message)`` sends a ``task_progress`` to the main node.
        timeout_s: the task's timeout; ``run`` is cancelled when it passes.
        scratch_dir: a private directory for this task, removed afterwards.
    """

    progress: Callable[[float, str], None]
    timeout_s: float
    scratch_dir: Path


@dataclass
class PluginResult:
    """A plug-in's return value, checked: what goes into the task's result."""

    output: Optional[str]
    exit_code: int = 0
    stderr: Optional[str] = None
    metrics: Optional[Dict[str, Any]] = None


def entry_points(group: str = ENTRY_POINT_GROUP) -> List[importlib.metadata.EntryPoint]:
    """The entry points of ``group``, one per name (the first found wins, as 3.10+ does).

    Python 3.9 returns a dict of groups; 3.10+ has ``.select(group=...)``.
    """
    found = importlib.metadata.entry_points()
    if hasattr(found, "select"):
        candidates: Iterable[importlib.metadata.EntryPoint] = found.select(group=group)
    else:  # pragma: no cover - Python 3.9
        candidates = found.get(group, ())  # type: ignore[attr-defined,unused-ignore]
    unique: Dict[str, importlib.metadata.EntryPoint] = {}
    for ep in candidates:
        unique.setdefault(ep.name, ep)
    return list(unique.values())


def _instantiate(loaded: Any) -> Any:
    return loaded() if isinstance(loaded, type) else loaded


def _distribution(ep: importlib.metadata.EntryPoint) -> Optional[str]:
    """The name of the installed package that declares ``ep`` (None before Python 3.10)."""
    dist = getattr(ep, "dist", None)
    try:
        name = dist.metadata["Name"] if dist is not None else None
    except Exception:  # metadata unreadable: the sentence does without the name
        return None
    return str(name) if name else None


def _load_failure(ep: importlib.metadata.EntryPoint, exc: BaseException) -> str:
    """The one sentence logged for a plug-in that could not be loaded: what, why, what to do."""
    text = str(exc).strip()
    why = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    dist = _distribution(ep)
    remedy = f"fix it or run `pip uninstall {dist}`" if dist else "fix or uninstall the package that provides it"
    return (f"plug-in task type {ep.name!r} ({ep.value}) could not be loaded ({why}); "
            f"skipped (the other task types still run); {remedy}.")


def load_plugins(reserved: Iterable[str],
                 eps: Optional[Iterable[importlib.metadata.EntryPoint]] = None) -> Dict[str, Any]:
    """Load the installed plug-ins; returns {task type: plug-in object}.

    Anything wrong with one plug-in (import error, no name or run, a name in
    ``reserved`` or already taken) is logged and that plug-in skipped.

    Args:
        reserved: the built-in task type names, which plug-ins cannot replace.
        eps: entry points to load; None means :func:`entry_points`.
    """
    taken = set(reserved)
    plugins: Dict[str, Any] = {}
    for ep in entry_points() if eps is None else eps:
        try:
            plugin = _instantiate(ep.load())
        except (Exception, SystemExit) as exc:  # a broken plug-in must not stop the worker
            # One sentence for the owner (a traceback per plug-in buried the worker's own
            # start-up lines); the traceback is there with --log-level debug.
            log.error("%s", _load_failure(ep, exc))
            log.debug("why plug-in %r could not be loaded", ep.name, exc_info=True)
            continue
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            log.error("plug-in %r (%s) has no `name` string; skipped", ep.name, ep.value)
            continue
        if not callable(getattr(plugin, "run", None)):
            log.error("plug-in %r (%s) has no `run` method; skipped", name, ep.value)
            continue
        if name in taken:
            what = "a built-in task type" if name in reserved else "taken by another plug-in"
            log.error("plug-in %r (%s) refused: that name is %s", name, ep.value, what)
            continue
        taken.add(name)
        plugins[name] = plugin
        log.info("plug-in task type %r loaded from %s", name, ep.value)
    return plugins


def plugin_result(value: Any, name: str) -> PluginResult:
    """Check what ``run`` returned.

    Raises:
        ValueError: with a sentence for the task's error; the plug-in broke its contract.
    """
    if isinstance(value, str):
        return PluginResult(value)
    if not isinstance(value, dict):
        raise ValueError(f"plug-in {name!r} returned {type(value).__name__}; expected a str or a dict")
    output = value.get("output")
    if output is not None and not isinstance(output, str):
        try:
            output = dumps(output).decode("utf-8")
        except (TypeError, ValueError):
            raise ValueError(f"plug-in {name!r} returned an output that is neither text nor JSON") from None
    exit_code = value.get("exit_code", 0)
    if not isinstance(exit_code, int) or isinstance(exit_code, bool):
        raise ValueError(f"plug-in {name!r} returned exit_code {exit_code!r}; expected an integer")
    stderr = value.get("stderr")
    if stderr is not None and not isinstance(stderr, str):
        raise ValueError(f"plug-in {name!r} returned a stderr that is not text")
    metrics = value.get("metrics")
    if metrics is not None:
        try:
            if not isinstance(metrics, dict):
                raise TypeError
            dumps(metrics)
        except (TypeError, ValueError):
            raise ValueError(f"plug-in {name!r} returned metrics that are not a JSON object") from None
    return PluginResult(output, exit_code, stderr, metrics)
