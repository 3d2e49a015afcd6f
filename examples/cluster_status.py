#!/usr/bin/env python3
"""Print a retire-cluster's devices and task counts.

Standard library only: copy it anywhere Python runs.

    python3 cluster_status.py --main 192.168.1.10:8080 --token=TOKEN [--json]

It sends two requests on one connection without waiting in between, then matches
each reply to its request by message_id (replies may come in any order).
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
    parser.add_argument("--json", action="store_true", help="print the two replies as JSON")
    args = parser.parse_args()
    host, _, port = args.main.rpartition(":") if ":" in args.main else (args.main, "", "8080")

    try:
        sock = socket.create_connection((host, int(port)), timeout=30)
    except OSError as exc:
        sys.exit(f"error: cannot connect to {host}:{port} ({exc.strerror or exc}); "
                 "is `retire-cluster main` running there?")
    asked = {}
    for message_type in ("cluster_status", "list_devices"):
        frame = {"message_type": message_type, "message_id": uuid.uuid4().hex, "sender_id": "status-example",
                 "data": {}}
        if args.token:
            frame["auth_token"] = args.token
        sock.sendall(json.dumps(frame).encode() + b"\n")
        asked[frame["message_id"]] = message_type

    answers = {}
    for line in sock.makefile("rb"):
        reply = json.loads(line)
        message_type = asked.get(reply["data"].get("original_message_id"))
        if message_type is None:
            continue
        if reply["message_type"] == "error":
            sys.exit(f"error: {reply['data']['error']} ({reply['data']['code']})")
        answers[message_type] = reply["data"]["result"]
        if len(answers) == len(asked):
            break
    else:
        sys.exit("error: the main node closed the connection")
    sock.close()

    if args.json:
        print(json.dumps(answers, indent=2, sort_keys=True))
        return
    status, devices = answers["cluster_status"], answers["list_devices"]["devices"]
    counts = status["devices"]
    print(f"devices: {counts.get('online', 0)} online, {counts.get('offline', 0)} offline; "
          f"slots {status['slots']['busy']}/{status['slots']['total']} busy; queue {status['queue_length']}")
    print("tasks: " + ", ".join(f"{n} {state}" for state, n in status["tasks"].items()))
    for d in devices:
        metrics = d.get("system_metrics") or {}
        battery = metrics.get("battery_percent")
        print(f"  {d['device_id']:<20} {d['status']:<8} {d['active_tasks']}/{d['max_concurrent_tasks']} tasks"
              f"  types: {', '.join(d.get('task_types', []))}"
              + ("" if battery is None else f"  battery {battery:.0f}%"))


if __name__ == "__main__":
    main()
