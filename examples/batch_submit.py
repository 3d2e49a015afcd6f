#!/usr/bin/env python3
"""Submit every task of a JSON Lines file to a retire-cluster and wait for all of them.

Standard library only: copy it anywhere Python runs.

    python3 batch_submit.py --main 192.168.1.10:8080 --token=TOKEN tasks.jsonl

Each line of the file is a task object: {"task_type": "echo", "payload": {"message": "hi"}}.
It subscribes to all task updates first (so no result can be missed), sends the
submissions without waiting for each reply (at most --window in flight), then reads
updates until every task has ended. Exits 1 if any task did not complete.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import uuid

FINAL = ("completed", "failed", "cancelled", "timeout")


class Batch:
    """One connection, the submissions in flight, and what came back."""

    def __init__(self, host, port, token):
        self.sock = socket.create_connection((host, port))
        self.lines = self.sock.makefile("rb")
        self.token = token
        self.asked = {}  # message_id -> line number, for submissions not answered yet
        self.task_ids = {}  # line number -> task_id, or None when the main node refused the task
        self.ended = {}  # task_id -> final record (from task_update pushes)

    def send(self, message_type, data):
        mid = uuid.uuid4().hex
        frame = {"message_type": message_type, "message_id": mid, "sender_id": "batch-example", "data": data}
        if self.token:
            frame["auth_token"] = self.token
        self.sock.sendall(json.dumps(frame).encode() + b"\n")
        return mid

    def read_one(self):
        """Read one frame and note what it says; return it."""
        line = self.lines.readline()
        if not line:
            sys.exit("error: the main node closed the connection")
        msg = json.loads(line)
        data = msg["data"]
        if msg["message_type"] == "task_update" and data["task"]["status"] in FINAL:
            self.ended[data["task"]["task_id"]] = data["task"]
        elif data.get("original_message_id") in self.asked:
            number = self.asked.pop(data["original_message_id"])
            if msg["message_type"] == "error":
                print(f"line {number}: refused: {data['error']}", file=sys.stderr)
            self.task_ids[number] = data["result"]["task_id"] if msg["message_type"] == "ack" else None
        elif msg["message_type"] == "error":
            sys.exit(f"error: {data['error']} ({data['code']})")
        return msg

    def run(self, tasks, window):
        subscribed = self.send("subscribe", {})
        while self.read_one()["data"].get("original_message_id") != subscribed:
            pass
        for number, task in tasks:
            self.asked[self.send("task_submit", {"task": task})] = number
            while len(self.asked) >= window:
                self.read_one()
        while self.asked:
            self.read_one()
        while any(t is not None and t not in self.ended for t in self.task_ids.values()):
            self.read_one()
        self.sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default=os.environ.get("RETIRE_CLUSTER_MAIN", "127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("RETIRE_CLUSTER_TOKEN"))
    parser.add_argument("--window", type=int, default=100, help="submissions in flight at once")
    parser.add_argument("file", type=argparse.FileType("r"))
    args = parser.parse_args()
    tasks = [(n, json.loads(line)) for n, line in enumerate(args.file, start=1) if line.strip()]
    host, _, port = args.main.rpartition(":") if ":" in args.main else (args.main, "", "8080")

    try:
        batch = Batch(host, int(port), args.token)
    except OSError as exc:
        sys.exit(f"error: cannot connect to {host}:{port} ({exc.strerror or exc}); "
                 "is `retire-cluster main` running there?")
    batch.run(tasks, max(args.window, 1))
    completed = 0
    for number, _ in tasks:
        task_id = batch.task_ids[number]
        if task_id is None:
            continue
        record = batch.ended[task_id]
        result = record.get("result") or {}
        text = result.get("output") if record["status"] == "completed" else record.get("error")
        completed += record["status"] == "completed"
        print(f"{number}\t{task_id}\t{record['status']}\t{text}")
    print(f"{len(tasks)} tasks: {completed} completed, {len(tasks) - completed} did not", file=sys.stderr)
    sys.exit(0 if completed == len(tasks) else 1)


if __name__ == "__main__":
    main()
