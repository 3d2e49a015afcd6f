#!/usr/bin/env python3
"""Submit one task to a retire-cluster main node and print its result.

Standard library only: copy it anywhere Python runs.

    python3 submit_and_wait.py --main 192.168.1.10:8080 --token=TOKEN \
        python_eval '{"expression": "sum(range(100000))"}'
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import uuid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default=os.environ.get("RETIRE_CLUSTER_MAIN", "127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("RETIRE_CLUSTER_TOKEN"))
    parser.add_argument("task_type")
    parser.add_argument("payload", nargs="?", default="{}", help="a JSON object")
    args = parser.parse_args()
    host, _, port = args.main.rpartition(":") if ":" in args.main else (args.main, "", "8080")

    sock = socket.create_connection((host, int(port)))
    lines = sock.makefile("rb")

    def send(message_type, data):
        mid = uuid.uuid4().hex
        frame = {"message_type": message_type, "message_id": mid, "sender_id": "example",
                 "auth_token": args.token, "data": data}
        sock.sendall(json.dumps(frame).encode() + b"\n")
        return mid

    def reply_to(mid):
        for line in lines:  # pushes (task_update) that arrive first are skipped here
            msg = json.loads(line)
            if msg["data"].get("original_message_id") == mid:
                if msg["message_type"] == "error":
                    sys.exit(f"error: {msg['data']['error']} ({msg['data']['code']})")
                return msg["data"]["result"]
        sys.exit("error: the main node closed the connection")

    # Subscribe to everything first so the task's final update cannot be missed.
    reply_to(send("subscribe", {}))
    task_id = reply_to(send("task_submit", {"task": {"task_type": args.task_type,
                                                      "payload": json.loads(args.payload)}}))["task_id"]
    for line in lines:
        msg = json.loads(line)
        task = msg["data"].get("task", {})
        if msg["message_type"] == "task_update" and task.get("task_id") == task_id:
            if task["status"] in ("completed", "failed", "cancelled", "timeout"):
                result = task.get("result") or {}
                if task["status"] != "completed":
                    sys.exit(f"task {task_id} {task['status']}: {task.get('error')}")
                print(result.get("output"))
                return


if __name__ == "__main__":
    main()
