"""Many tasks at once: read a JSON Lines file, submit with bounded concurrency, wait for all.

Used by ``retire-cluster submit-batch``; usable from Python too:

    specs, bad = read_batch(open("tasks.jsonl"))
    async with AsyncClient(main, token) as client:
        outcome = await submit_batch(client, specs, concurrency=64)
        records = await wait_batch(client, [t for t in outcome.values() if isinstance(t, str)])

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ..protocol.errors import FrameTooLarge, ProtocolError
from .aio import AsyncClient
from .common import MANY_PER_REQUEST, fresh_key

__all__ = ["BATCH_FIELDS", "brief_record", "parse_batch_line", "read_batch", "submit_batch", "summarise",
           "wait_batch"]

#: What a line may hold.
BATCH_FIELDS = ("task_type", "payload", "priority", "timeout", "requirements", "max_retries",
                "retry_on_timeout", "idempotency_key")

Spec = Tuple[int, Dict[str, Any]]
#: Requests of many tasks in flight at once (each waits for its commit; two or more keep the main node busy).
REQUESTS_IN_FLIGHT = 4


def parse_batch_line(text: str) -> Dict[str, Any]:
    """One line into a task object (``task_submit.data.task``).

    Raises:
        ValueError: a sentence saying what is wrong with the line.
    """
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError('not a JSON object; write {"task_type": "echo", "payload": {...}}')
    unknown = sorted(set(obj) - set(BATCH_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; use {', '.join(BATCH_FIELDS)}")
    if not isinstance(obj.get("task_type"), str) or not obj["task_type"]:
        raise ValueError("task_type is missing or not a string")
    if not isinstance(obj.get("payload", {}), dict):
        raise ValueError("payload must be a JSON object")
    return obj


def read_batch(lines: Iterable[str]) -> Tuple[List[Spec], List[Tuple[int, str]]]:
    """(line number, task) pairs, and (line number, problem) for the bad lines.

    Blank lines and lines starting with ``#`` are skipped.
    """
    specs: List[Spec] = []
    bad: List[Tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            specs.append((number, parse_batch_line(text)))
        except ValueError as exc:
            bad.append((number, str(exc)))
    return specs, bad


async def submit_batch(client: AsyncClient, specs: List[Spec], *, concurrency: int = 64,
                       stop_on_error: bool = False,
                       progress: Optional[Callable[[int], None]] = None) -> Dict[int, Any]:
    """Submit the tasks, a few hundred per request (:meth:`AsyncClient.submit_many`), on the one connection.

    Returns line -> task id, or line -> ``{"error": sentence}`` for a task the main
    node refused. A request refused whole is sent again one task at a time (at most
    ``concurrency`` in flight), so that each refusal names its line; every task has
    its idempotency key before the first request, so nothing is submitted twice.
    With ``stop_on_error`` nothing more is sent after a refusal, and the lines never
    sent are missing from the result. ``progress(n)`` is called as tasks are answered.

    Raises:
        ClientError: the main node cannot be reached.
    """
    batch = _Batch(client, concurrency, stop_on_error, progress)
    keyed = [(line, spec if spec.get("idempotency_key") else {**spec, "idempotency_key": fresh_key("sub")})
             for line, spec in specs]
    requests = iter([keyed[i : i + MANY_PER_REQUEST] for i in range(0, len(keyed), MANY_PER_REQUEST)])

    async def sender() -> None:
        for chunk in requests:
            if batch.stop:
                return
            try:
                ids = await client.submit_many([spec for _, spec in chunk])
            except ProtocolError:  # one task refuses its request: one by one, to say which
                await batch.one_by_one(chunk)
                continue
            batch.answered(zip((line for line, _ in chunk), ids))

    await client.connect()
    await asyncio.gather(*(sender() for _ in range(REQUESTS_IN_FLIGHT)))
    return batch.outcome


class _Batch:
    """What :func:`submit_batch` has heard so far, and whether it stops."""

    def __init__(self, client: AsyncClient, concurrency: int, stop_on_error: bool,
                 progress: Optional[Callable[[int], None]]) -> None:
        self.client, self.concurrency, self.stop_on_error, self.progress = client, concurrency, stop_on_error, progress
        self.outcome: Dict[int, Any] = {}
        self.stop = False

    def answered(self, pairs: Iterable[Tuple[int, Any]]) -> None:
        count = 0
        for line, answer in pairs:
            self.outcome[line] = answer
            count += 1
        if self.progress is not None:
            self.progress(count)

    def refused(self, line: int, sentence: str) -> None:
        self.answered([(line, {"error": sentence})])
        self.stop = self.stop or self.stop_on_error

    async def one_by_one(self, chunk: List[Spec]) -> None:
        pending = iter(chunk)

        async def submitter() -> None:
            for line, spec in pending:
                if self.stop:
                    return
                options = {k: v for k, v in spec.items() if k not in ("task_type", "payload")}
                try:
                    task_id = await self.client.submit(spec["task_type"], spec.get("payload"), **options)
                except FrameTooLarge as exc:  # refused here, before sending (see encode_request)
                    self.refused(line, f"too large to send: {exc.message}")
                except ProtocolError as exc:
                    self.refused(line, f"refused by the main node: {exc.message}")
                else:
                    self.answered([(line, task_id)])

        await asyncio.gather(*(submitter() for _ in range(max(1, min(self.concurrency, len(chunk))))))


async def wait_batch(client: AsyncClient, task_ids: List[str],
                     progress: Optional[Callable[[int], None]] = None,
                     timeout_s: Optional[float] = None, *, brief: bool = False) -> Dict[str, Dict[str, Any]]:
    """Every task's final record, by task id (``progress(1)`` as each ends).

    With ``timeout_s``, the tasks that have not ended by then have their
    record as it is then (a status that is not terminal). With ``brief``,
    each record keeps only what :func:`summarise` reads (:func:`brief_record`):
    a whole record (payload, attempts, times, metrics) takes 2-3 KB of memory,
    which a batch of 100,000 tasks would keep until the end.
    """
    keep = brief_record if brief else dict
    records: Dict[str, Dict[str, Any]] = {}
    try:
        async for record in client.as_completed(task_ids, timeout_s=timeout_s):
            records[record["task_id"]] = keep(record)
            if progress is not None:
                progress(1)
    except TimeoutError:
        if timeout_s is None:
            raise
        rest = [t for t in dict.fromkeys(task_ids) if t not in records]
        for found in await client.statuses(rest):
            if found is not None:
                records[found["task_id"]] = keep(found)
    return records


def brief_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a task record that :func:`summarise` reads, and no more."""
    result = record.get("result")
    return {
        "task_id": record.get("task_id"),
        "status": record.get("status"),
        "error": record.get("error"),
        "assigned_device": record.get("assigned_device"),
        "result": {"output": result.get("output"), "error": result.get("error")} if isinstance(result, dict) else None,
    }


def _one_line(text: Any, width: int = 60) -> str:
    flat = " ".join(str("" if text is None else text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def summarise(submitted: List[Tuple[int, str]], records: Dict[str, Dict[str, Any]]) -> Any:
    """Table rows (line, task, status, output or error), JSON results, and counts by status."""
    counts: Dict[str, int] = {}
    rows, results = [], []
    for line, task_id in submitted:
        record = records[task_id]
        status = record["status"]
        counts[status] = counts.get(status, 0) + 1
        result = record.get("result") or {}
        text = result.get("output") if status == "completed" else record.get("error") or result.get("error")
        rows.append([str(line), task_id, status, _one_line(text)])
        results.append({"line": line, "task_id": task_id, "status": status, "output": result.get("output"),
                        "error": record.get("error"), "device": record.get("assigned_device")})
    return rows, results, counts
