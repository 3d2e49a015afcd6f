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

    try:
        sock = socket.create_connection((host, int(port)))
    except OSError as exc:
        sys.exit(f"error: cannot connect to {host}:{port} ({exc.strerror or exc}); "
                 "is `retire-cluster main` running there?")
    lines = sock.makefile("rb")

    def send(message_type, data):
        mid = uuid.uuid4().hex
        frame = {"message_type": message_type, "message_id": mid, "sender_id": "example", "data": data}
        if args.token:  # a main node with --insecure needs none
            frame["auth_token"] = args.token
        sock.sendall(json.dumps(frame).encode() + b"\n")
        return mid

    def reply_to(mid):
        for line in lines:
            msg = json.loads(line)
            if msg["data"].get("original_message_id") == mid:
                if msg["message_type"] == "error":
                    sys.exit(f"error: {msg['data']['error']} ({msg['data']['code']})")
                return msg["data"]["result"]
        sys.exit("error: the main node closed the connection")

    # With "wait" the one reply comes when the task has ended, or after an hour.
    data = {"task": {"task_type": args.task_type, "payload": json.loads(args.payload)}, "wait": 3600}
    task = reply_to(send("task_submit", data))["task"]
    if task["status"] not in ("completed", "failed", "cancelled", "timeout"):
        sys.exit(f"task {task['task_id']} is still {task['status']} after an hour; "
                 f"`retire-cluster task {task['task_id']}` shows it")
    if task["status"] != "completed":
        sys.exit(f"task {task['task_id']} {task['status']}: {task.get('error')}")
    print((task.get("result") or {}).get("output"))


if __name__ == "__main__":
    main()
