"""A blocking client over one TCP connection (standard library sockets).

    with Client("nas.local:8080", token=...) as c:
        task_id = c.submit("python_eval", {"expression": "sum(range(100000))"})
        print(c.wait(task_id)["result"]["output"])

Every wire ``error`` is raised as its typed exception from
:mod:`retire_cluster.protocol.errors` (``NotFound``, ``Conflict``, ...).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Dict, List, Optional

from ..protocol.codec import MessageStream, encode
from ..protocol.errors import error_from_code
from ..protocol.messages import TERMINAL_STATUSES, Message, new_message_id
from ..worker.config import parse_main_address

__all__ = ["Client", "ClientError"]

_TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)


class ClientError(ConnectionError):
    """The main node could not be reached, or the connection broke."""


class Client:
    """Blocking client.

    Args:
        main: ``HOST[:PORT]`` of the main node.
        token: the cluster token (None against an --insecure main node).
        timeout_s: how long to wait for one reply.
        client_id: sender_id of the requests.
    """

    def __init__(self, main: str = "127.0.0.1:8080", token: Optional[str] = None, *,
                 timeout_s: float = 30.0, client_id: Optional[str] = None) -> None:
        self.host, self.port = parse_main_address(main)
        self.token = token
        self.timeout_s = timeout_s
        self.client_id = client_id or f"client-{socket.gethostname()}"
        self._sock: Optional[socket.socket] = None
        self._stream = MessageStream(64 * 1024 * 1024)
        self._inbox: List[Message] = []
        self.updates: List[Dict[str, Any]] = []

    def __enter__(self) -> Client:
        """The connection opens with the first request."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise ClientError(
                f"cannot connect to the main node at {self.host}:{self.port} "
                f"({exc.strerror or exc}); is `retire-cluster main` running there?"
            ) from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- plumbing ---------------------------------------------------------

    def _recv_message(self, deadline: Optional[float]) -> Message:
        assert self._sock is not None
        while not self._inbox:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no reply from the main node in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no reply from the main node in time") from None
            except OSError as exc:
                raise ClientError(f"connection to the main node broke ({exc})") from None
            for event in self._stream.feed(data):
                if isinstance(event, Message):
                    self._inbox.append(event)
                else:
                    raise ClientError(f"main node sent a bad frame: {event.error}")
            if not data and not self._inbox:
                raise ClientError("the main node closed the connection")
        return self._inbox.pop(0)

    def request(self, message_type: str, data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Send one request and return its ``ack`` result; raise the typed error otherwise."""
        self.connect()
        assert self._sock is not None
        msg = Message(message_type, new_message_id(), self.client_id, data or {}, auth_token=self.token)
        try:
            self._sock.sendall(encode(msg))
        except OSError as exc:
            raise ClientError(f"connection to the main node broke ({exc})") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._recv_message(deadline)
            if reply.message_type == "task_update":
                self.updates.append(reply.data.get("task") or {})
                continue
            if reply.data.get("original_message_id") != msg.message_id:
                continue
            if reply.message_type == "error":
                raise error_from_code(str(reply.data.get("code")), str(reply.data.get("error")),
                                      path=reply.data.get("path"))
            result = reply.data.get("result")
            return result if isinstance(result, dict) else {}

    # -- API --------------------------------------------------------------

    def submit(self, task_type: str, payload: Optional[Dict[str, Any]] = None, **options: Any) -> str:
        """Submit a task; returns its id. Options: priority, timeout, requirements,
        max_retries, retry_on_timeout, idempotency_key."""
        task: Dict[str, Any] = {"task_type": task_type, "payload": payload or {}}
        task.update({k: v for k, v in options.items() if v is not None})
        return str(self.request("task_submit", {"task": task})["task_id"])

    def status(self, task_id: str) -> Dict[str, Any]:
        return dict(self.request("task_status", {"task_id": task_id})["task"])

    def cancel(self, task_id: str) -> Dict[str, Any]:
        return self.request("task_cancel", {"task_id": task_id})

    def tasks(self, *, status: Optional[str] = None, device_id: Optional[str] = None,
              task_type: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        query = {"status": status, "device_id": device_id, "task_type": task_type, "limit": limit}
        return list(self.request("task_list", {k: v for k, v in query.items() if v is not None})["tasks"])

    def devices(self, status: Optional[str] = None) -> List[Dict[str, Any]]:
        return list(self.request("list_devices", {} if status is None else {"status": status})["devices"])

    def cluster_status(self) -> Dict[str, Any]:
        return self.request("cluster_status")

    def wait(self, task_id: str, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Block until the task ends (pushed ``task_update``, no polling); return its record.

        Raises:
            TimeoutError: it did not end within ``timeout_s``.
        """
        self.request("subscribe", {"task_ids": [task_id]})
        record = self.status(task_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while record.get("status") not in _TERMINAL:
            for update in self._drain_updates():
                if update.get("task_id") == task_id:
                    record = update
            if record.get("status") in _TERMINAL:
                break
            msg = self._recv_message(deadline)
            if msg.message_type == "task_update":
                self.updates.append(msg.data.get("task") or {})
        return record

    def _drain_updates(self) -> List[Dict[str, Any]]:
        out, self.updates = self.updates, []
        return out
