"""Hot-path cost of the strict JSON checks (retire_cluster/protocol/codec.py), per typical frame.

    python benchmarks/codec_strict.py [--quick]

"before" is decode_message as it was before the checks (orjson.loads and the
same envelope checks); "after" is the current one. Each number is the best of
15 runs of 100,000 calls (`--quick`: 5 runs of 20,000). In process, no sockets.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from _harness import emit

from retire_cluster.protocol.codec import decode_message, loads
from retire_cluster.protocol.errors import InvalidJSON, InvalidMessage
from retire_cluster.protocol.messages import Message

_OPTIONAL = ("target_id", "timestamp", "auth_token")
_ENVELOPE = frozenset({"message_type", "message_id", "sender_id", "data", *_OPTIONAL})


def decode_before(frame: bytes) -> Message:
    """decode_message without the strict checks (orjson.loads only)."""
    try:
        obj = orjson.loads(frame)
    except ValueError:
        raise InvalidJSON("not JSON") from None
    if not isinstance(obj, dict):
        raise InvalidMessage("not an object", path="$")
    for name in ("message_type", "message_id", "sender_id"):
        if not isinstance(obj.get(name), str) or not obj[name]:
            raise InvalidMessage(name, path=f"$.{name}")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise InvalidMessage("data", path="$.data")
    for name in _OPTIONAL:
        if name in obj and not isinstance(obj[name], str):
            raise InvalidMessage(name, path=f"$.{name}")
    for key in obj:
        if key not in _ENVELOPE:
            raise InvalidMessage(key, path=f"$.{key}")
    return Message(obj["message_type"], obj["message_id"], obj["sender_id"], data,
                   obj.get("target_id"), obj.get("timestamp"), obj.get("auth_token"))


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


FRAMES = {
    "heartbeat": compact({
        "message_type": "heartbeat", "message_id": "3f2a9c1e-17", "sender_id": "android-phone-4f3a2b",
        "timestamp": "2024-01-15T10:30:00.000Z",
        "data": {"system_metrics": {"cpu_usage": 25.5, "memory_usage": 45.2, "disk_usage": 12.8,
                                    "load_average": [0.5, 0.3, 0.2], "uptime": 86400,
                                    "battery": {"percent": 81, "charging": True}},
                 "status": "online", "active_tasks": 2, "last_activity": "2024-01-15T10:30:45Z"}}),
    "task_result": compact({
        "message_type": "task_result", "message_id": "3f2a9c1e-18", "sender_id": "android-phone-4f3a2b",
        "data": {"task_id": "0123456789abcdef", "attempt": 1, "status": "completed", "execution_time": 0.0123,
                 "result": {"output": "4999950000", "exit_code": 0, "truncated": False, "stderr": "",
                            "metrics": {"cpu_time": 0.01, "max_rss": 12345678, "wall_time": 0.0123}}}}),
    "task_submit": compact({
        "message_type": "task_submit", "message_id": "cli-7", "sender_id": "client-laptop",
        "auth_token": "Zx" * 21 + "A",
        "data": {"task": {"task_type": "python_eval", "payload": {"expression": "sum(range(100000))"},
                          "priority": "high", "timeout": 60,
                          "requirements": {"min_cpu_cores": 2, "capabilities": ["computational"]},
                          "max_retries": 3}}}),
}  # fmt: skip


def best_us(fn: Callable[[bytes], Any], frame: bytes, n: int, repeat: int) -> float:
    return min(timeit.repeat(lambda: fn(frame), number=n, repeat=repeat)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 runs of 20,000 calls per figure")
    args = ap.parse_args()
    n, repeat = (20_000, 5) if args.quick else (100_000, 15)
    table: list[tuple[str, Any]] = []
    frames: dict[str, dict[str, Any]] = {}
    for name, frame in FRAMES.items():
        assert decode_before(frame) == decode_message(frame)
        a, b = best_us(orjson.loads, frame, n, repeat), best_us(loads, frame, n, repeat)
        d, e = best_us(decode_before, frame, n, repeat), best_us(decode_message, frame, n, repeat)
        table.append((name, f"{len(frame):4d} B | orjson.loads {a:.2f} -> codec.loads {b:.2f} (+{b - a:.2f}) | "
                            f"decode_message before {d:.2f} -> after {e:.2f} (+{e - d:.2f}) us"))
        frames[name] = {"bytes": len(frame), "orjson_loads_us": round(a, 2), "codec_loads_us": round(b, 2),
                        "decode_before_us": round(d, 2), "decode_message_us": round(e, 2)}
    emit("codec_strict", table, {"calls": n, "repeats": repeat, "frames": frames})


if __name__ == "__main__":
    main()
