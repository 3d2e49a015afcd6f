"""Timestamps for benchmarks/round_trip_trace.py (imported only with this folder on PYTHONPATH).

With RC_TRACE_DIR set, a `retire-cluster main` or `worker` process records
when it receives and sends frames and when its commits start and end
(time.perf_counter_ns: CLOCK_MONOTONIC, comparable across processes), and
writes them to RC_TRACE_DIR/<role>-<pid>.txt when it exits. The hooks wrap
methods and cost a few microseconds each; nothing is recorded otherwise.
"""

import atexit
import os
import signal
import sys
import time

_DIR = os.environ.get("RC_TRACE_DIR")
_ROLE = "main" if "main" in sys.argv[1:3] else "worker" if "worker" in sys.argv[1:3] else None
_EVENTS = []


def _types(blob):
    """The message types in a chunk of frames, without parsing the JSON."""
    out, key, start = [], b'"message_type":"', 0
    while True:
        i = bytes(blob).find(key, start)
        if i < 0:
            return ",".join(out)
        j = blob.find(b'"', i + len(key))
        out.append(bytes(blob[i + len(key):j]).decode("ascii", "replace"))
        start = j


def _mark(what, detail=""):
    _EVENTS.append((time.perf_counter_ns(), what, detail))


def _dump(*_args):
    with open(os.path.join(_DIR, f"{_ROLE}-{os.getpid()}.txt"), "w") as f:
        for t, what, detail in _EVENTS:
            f.write(f"{t} {_ROLE} {what} {detail}\n")
    _EVENTS.clear()
    if _args:
        os._exit(0)


def _install_main():
    from retire_cluster.main import server, store

    received, flush, start, finish, apply_batch = (server.Connection.data_received, server.Connection.flush,
                                                   store.Store._start, store.Store._finish, store._apply_batch)

    def data_received(self, data):
        _mark("recv", _types(data))
        received(self, data)

    def flushed(self):
        if self._out:
            _mark("send", (self.device_id or "client") + ":" + _types(b"".join(self._out)))
        flush(self)

    def started(self):
        if self._queue and not self._in_flight:
            _mark("commit-start", str(len(self._queue)))
        start(self)

    def finished(self, waiters, exc, count):
        _mark("commit-end")
        finish(self, waiters, exc, count)

    def applied(db, groups):
        _mark("thread-start")
        apply_batch(db, groups)
        _mark("thread-end")

    server.Connection.data_received = data_received
    server.Connection.flush = flushed
    store.Store._start = started
    store.Store._finish = finished
    store._apply_batch = applied


def _install_worker():
    from retire_cluster import link
    from retire_cluster.worker import agent

    received, on_message, send = link.Link.data_received, agent.Agent._on_message, agent.Agent._send_frame

    def data_received(self, data):
        _mark("transport-recv", _types(data))
        received(self, data)

    def handled(self, msg):
        _mark("recv", msg.message_type)
        on_message(self, msg)

    def sent(self, frame):
        _mark("send", _types(frame))
        send(self, frame)

    link.Link.data_received = data_received
    agent.Agent._on_message = handled
    agent.Agent._send_frame = sent


if _DIR and _ROLE:
    (_install_main if _ROLE == "main" else _install_worker)()
    atexit.register(_dump)
    signal.signal(signal.SIGTERM, _dump)
