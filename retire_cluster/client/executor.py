"""``concurrent.futures`` on the cluster.

    with ClusterExecutor("nas.local:8080", token=...) as ex:
        squares = list(ex.map("python_eval", [{"expression": f"{n}**2"} for n in range(10)]))
        fut = ex.submit("sleep", {"seconds": 60}, priority="low")
        fut.cancel()  # cancels the task on the cluster

Theory of operation: one background thread runs an asyncio loop with one
:class:`~retire_cluster.client.aio.AsyncClient` (threads are fine on the client
side; the main node has none). :meth:`ClusterExecutor.submit` returns at once;
on the loop the task is submitted (pipelined with the others on the one
connection), then waited for with pushed ``task_update`` records, and the future
resolved: the task's ``output`` text when it completed, :class:`TaskFailed`
when it ended failed or timeout, cancelled when it was cancelled. Every future
change happens on the loop thread, so a ``cancel()`` racing the result cannot
resolve a future twice.

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Dict, List, Optional, Set, TypeVar

from ..protocol.errors import Conflict
from .aio import AsyncClient
from .common import MANY_PER_REQUEST, TaskFailed, task_spec

__all__ = ["ClusterExecutor", "ClusterFuture"]

T = TypeVar("T")


class ClusterFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A future for one cluster task.

    ``task_id`` is set once the main node accepted the task; ``record`` is the
    task's final record (result, attempts, times) once it ended.
    """

    def __init__(self, executor: ClusterExecutor) -> None:
        super().__init__()
        self._executor = executor
        self.task_id: Optional[str] = None
        self.record: Optional[Dict[str, Any]] = None
        self._submitted: Optional[asyncio.Future[str]] = None  # the task_submit, on the loop

    def cancel(self) -> bool:
        """Cancel the task on the cluster; True when it was cancelled.

        False when it already ended (its result is on the way, or here). Called
        from a done callback (the executor's thread) it cannot wait for the main
        node: the cancel is sent and False returned.
        """
        if self.done():
            return self.cancelled()
        return self._executor._cancel(self)

    # -- loop thread only ---------------------------------------------------

    def _mark_cancelled(self) -> None:
        if not self.done() and concurrent.futures.Future.cancel(self):
            self.set_running_or_notify_cancel()  # wakes wait() / as_completed()

    def _fail(self, exc: BaseException) -> None:
        if not self.done():
            self.set_exception(exc)

    def _resolve(self, record: Dict[str, Any]) -> None:
        if self.done():
            return
        self.record = record
        status = record.get("status")
        if status == "completed":
            self.set_result((record.get("result") or {}).get("output"))
        elif status == "cancelled":
            self._mark_cancelled()
        else:
            self.set_exception(TaskFailed(record))


class ClusterExecutor(concurrent.futures.Executor):
    """An Executor whose work items are cluster tasks.

    ``submit(task_type, payload, **options)`` instead of ``submit(fn, *args)``;
    ``map(task_type, payloads)`` yields outputs in order, as the standard
    library's does. Connects at construction (raises ClientError when the main
    node cannot be reached).

    Args:
        main: ``HOST[:PORT]`` of the main node.
        token: the cluster token.
        client_options: passed to :class:`AsyncClient` (timeout_s, ssl, ...).
    """

    def __init__(self, main: str = "127.0.0.1:8080", token: Optional[str] = None, **client_options: Any) -> None:
        self._client = AsyncClient(main, token, **client_options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="retire-cluster-executor", daemon=True)
        self._futures: Set[ClusterFuture] = set()
        self._drives: Set[asyncio.Task[None]] = set()
        #: submissions that came in this loop pass: sent together (_send_submissions)
        self._to_send: List[Any] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self._stopped = False
        self._thread.start()
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop()
            raise

    @property
    def client(self) -> AsyncClient:
        """The AsyncClient on the executor's loop (call it only from that loop)."""
        return self._client

    # -- the loop thread ------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftover:
                task.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _start(self, fut: ClusterFuture, task_type: str, payload: Optional[Dict[str, Any]],
               options: Dict[str, Any]) -> None:
        fut._submitted = self._loop.create_future()
        if not self._to_send:
            self._loop.call_soon(self._send_submissions)
        self._to_send.append((fut, task_type, payload, options))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        drive = self._loop.create_task(coro)
        self._drives.add(drive)
        drive.add_done_callback(self._drives.discard)

    def _send_submissions(self) -> None:
        """The submissions of a loop pass (``map()`` makes thousands in a row): a few hundred per request."""
        pending, self._to_send = self._to_send, []
        for start in range(0, len(pending), MANY_PER_REQUEST):
            self._track(self._submit_group(pending[start : start + MANY_PER_REQUEST]))

    async def _submit_group(self, group: List[Any]) -> None:
        """Submit the group (in one request when it can), then follow its tasks to their ends together."""
        submitted = False
        if len(group) > 1:
            try:
                ids = await self._client.submit_many(
                    [{**options, "task_type": task_type, "payload": payload} for _, task_type, payload, options in group])
            except Exception:  # one of them refuses the request: each alone, so that each future hears its own
                pass
            else:
                for (fut, *_), task_id in zip(group, ids):
                    fut.task_id = task_id
                    fut._submitted.set_result(task_id)
                submitted = True
        if not submitted:
            await asyncio.gather(*(self._submit_one(*item) for item in group))
        await self._follow([item[0] for item in group])

    async def _follow(self, futures: List[ClusterFuture]) -> None:
        """Resolve each future as its task ends: one subscription and a status per hundred, not two requests each."""
        by_id: Dict[str, List[ClusterFuture]] = {}  # a list: one idempotency key may be given twice
        for fut in futures:
            assert fut._submitted is not None  # settled by _submit_group, never cancelled
            refused = fut._submitted.exception()
            if refused is not None:
                fut._fail(refused)
                continue
            by_id.setdefault(fut._submitted.result(), []).append(fut)
        try:
            async for record in self._client.as_completed(list(by_id)):
                for fut in by_id[record["task_id"]]:
                    fut._resolve(record)
        except Exception as exc:
            for waiting in by_id.values():
                for fut in waiting:
                    fut._fail(exc)

    async def _submit_one(self, fut: ClusterFuture, task_type: str, payload: Optional[Dict[str, Any]],
                          options: Dict[str, Any]) -> None:
        assert fut._submitted is not None
        try:
            task_id = await self._client.submit(task_type, payload, **options)
        except Exception as exc:
            fut._submitted.set_exception(exc)
        else:
            fut.task_id = task_id
            fut._submitted.set_result(task_id)

    async def _cancel_remote(self, fut: ClusterFuture) -> bool:
        if fut.done():
            return fut.cancelled()
        if fut._submitted is None:  # pragma: no cover - _start always runs first (FIFO callbacks)
            return False
        try:
            task_id = await asyncio.shield(fut._submitted)
        except Exception:
            return False  # not submitted: the future gets that error
        try:
            await self._client.cancel(task_id)
        except Conflict:
            return False  # it ended meanwhile: its result is on the way
        except Exception:
            return False
        fut._mark_cancelled()
        return True

    # -- caller threads -----------------------------------------------------------

    def submit(self, task_type: str, payload: Optional[Dict[str, Any]] = None,  # type: ignore[override]
               **options: Any) -> ClusterFuture:
        """Submit a cluster task; return its future at once.

        Options: ``priority``, ``timeout``, ``requirements``, ``max_retries``,
        ``retry_on_timeout``, ``idempotency_key``.

        Raises:
            RuntimeError: after shutdown().
            TypeError: an unknown option.
        """
        task_spec(task_type, payload, options)  # raise on an unknown option here, not in the future
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit tasks after shutdown")
            fut = ClusterFuture(self)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        self._loop.call_soon_threadsafe(self._start, fut, task_type, payload, options)
        return fut

    def _forget(self, fut: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        with self._lock:
            self._futures.discard(fut)

    def _cancel(self, fut: ClusterFuture) -> bool:
        if threading.current_thread() is self._thread:
            self._loop.create_task(self._cancel_remote(fut))
            return False
        try:
            return self._call(self._cancel_remote(fut), self._client.timeout_s * 2)
        except Exception:
            return False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; with ``wait`` block until every future is done, then disconnect.

        ``cancel_futures`` cancels the unfinished tasks on the cluster first.
        """
        with self._lock:
            self._shutdown = True
            futures: List[ClusterFuture] = list(self._futures)
        if self._stopped:
            return
        if cancel_futures:
            for fut in futures:
                fut.cancel()
        if wait:
            if threading.current_thread() is self._thread:
                raise RuntimeError("shutdown(wait=True) from a done callback would wait for itself")
            concurrent.futures.wait(futures)
            self._stop()
        else:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._stop_when_done()))

    async def _stop_when_done(self) -> None:
        while self._drives:
            await asyncio.gather(*list(self._drives), return_exceptions=True)
        await self._client.close()
        self._stopped = True
        self._loop.stop()

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self._call(self._client.close(), 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
