#!/usr/bin/env python3
"""A complete retire-cluster worker in one standard-library file, for any device with Python 3
(Android: Termux, `pkg install python`):  python3 tiny_worker.py --main HOST:8080 --token=T
It registers, sends heartbeats, acks each task_assign, runs echo (and python_eval with --allow-python,
in a child Python killed at the task timeout), reports each task_result with its attempt, and
reconnects when the connection drops (reporting the tasks it still runs)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid

EVAL = "import sys; sys.stdout.write(str(eval(compile(sys.stdin.read(), '<expression>', 'eval'))))"
MAX_OUTPUT = 256 * 1024  # characters; keeps the task_result frame far below the 1 MiB limit


class Worker:
    def __init__(self, args):
        self.args, self.device_id = args, args.device_id or "tiny-" + socket.gethostname()
        self.task_types = ["echo", "python_eval"] if args.allow_python else ["echo"]
        self.lock = threading.Lock()  # one frame at a time on the socket
        self.sock, self.running, self.unsent, self.joined = None, {}, [], False

    def send(self, message_type, data, message_id=None):
        frame = {"message_type": message_type, "message_id": message_id or uuid.uuid4().hex,
                 "sender_id": self.device_id, "data": data}
        if self.args.token:
            frame["auth_token"] = self.args.token
        with self.lock:
            self.sock.sendall(json.dumps(frame).encode() + b"\n")
        return frame["message_id"]

    def register_data(self):
        return {
            "device_info": {"hostname": socket.gethostname(), "platform": sys.platform,
                            "architecture": platform.machine() or "unknown",
                            "python_version": platform.python_version(), "role": "worker"},
            "hardware_specs": {"cpu_cores": os.cpu_count() or 1, "disk_space": 0, "network_interfaces": [],
                               "memory_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
            "capabilities": ["computational"], "task_types": self.task_types,
            "max_concurrent_tasks": os.cpu_count() or 1,
            "running_tasks": [{"task_id": t, "attempt": a} for t, a in list(self.running.items())],
        }

    def heartbeats(self, interval, stop):
        while not stop.wait(interval):
            try:
                self.send("heartbeat", {"system_metrics": {}, "status": "online",  # metrics are optional
                                        "active_tasks": len(self.running)})
            except OSError:
                return  # the reading loop sees the broken connection too

    def run_task(self, task):
        started, payload = time.monotonic(), task.get("payload") or {}
        status, output, code, error = "completed", None, 0, None
        try:
            if task["task_type"] == "echo":
                output = str(payload.get("message", ""))
            else:
                proc = subprocess.run([sys.executable, "-I", "-c", EVAL], input=str(payload.get("expression")),
                                      capture_output=True, text=True, timeout=float(task.get("timeout") or 3600))
                output, code = proc.stdout, proc.returncode
                if code != 0:
                    status, lines = "failed", proc.stderr.strip().splitlines()
                    error = lines[-1] if lines else f"exit code {code}"
        except subprocess.TimeoutExpired:
            status, code, error = "timeout", None, f"stopped after {task.get('timeout')} s"
        except Exception as exc:
            status, code, error = "failed", 1, f"{type(exc).__name__}: {exc}"
        result = {"output": None if output is None else output[:MAX_OUTPUT], "exit_code": code,
                  "truncated": len(output or "") > MAX_OUTPUT, "metrics": {}, "error": error}
        self.deliver({"task_id": task["task_id"], "attempt": task["attempt"], "status": status,
                      "execution_time": round(time.monotonic() - started, 6), "result": result})

    def deliver(self, data):
        try:
            self.send("task_result", data)
            self.running.pop(data["task_id"], None)
        except OSError:  # reported as running at the next register, then sent again
            self.unsent.append(data)

    def serve(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        lines = self.sock.makefile("rb")
        register_id = self.send("register", self.register_data())
        reply = json.loads(lines.readline() or b"null")  # nothing is pushed before the register reply
        if not reply or reply["data"].get("original_message_id") != register_id:
            raise ConnectionError("no reply to register")
        if reply["message_type"] == "error":
            sys.exit(f"register refused: {reply['data']['error']} ({reply['data']['code']})")
        self.sock.settimeout(None)  # from now on wait for pushes as long as it takes
        self.joined = True
        print(f"{self.device_id} joined {host}:{port}; running {', '.join(self.task_types)}", flush=True)
        while self.unsent:
            self.deliver(self.unsent.pop(0))
        stop, interval = threading.Event(), float(reply["data"]["result"].get("heartbeat_interval", 60))
        threading.Thread(target=self.heartbeats, args=(interval, stop), daemon=True).start()
        try:
            for line in lines:
                msg = json.loads(line)
                if msg["message_type"] == "task_assign":
                    task = msg["data"]["task"]
                    if task["task_type"] not in self.task_types:  # hands it back without using a retry
                        self.send("error", {"original_message_id": msg["message_id"], "code": "forbidden",
                                            "error": f"this device does not run {task['task_type']}"})
                    else:
                        self.running[task["task_id"]] = task["attempt"]
                        self.send("ack", {"original_message_id": msg["message_id"], "result": {}})
                        threading.Thread(target=self.run_task, args=(task,), daemon=True).start()
                # task_cancel: a tiny worker lets the task finish; the main node ignores that result.
        finally:
            stop.set()
            self.sock.close()
        raise ConnectionError("the main node closed the connection")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default=os.environ.get("RETIRE_CLUSTER_MAIN", "127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("RETIRE_CLUSTER_TOKEN"))
    parser.add_argument("--device-id", help="default: tiny-HOSTNAME")
    parser.add_argument("--allow-python", action="store_true", help="also run python_eval tasks")
    worker, delay = Worker(parser.parse_args()), 1
    host, _, port = worker.args.main.rpartition(":") if ":" in worker.args.main else (worker.args.main, "", "8080")
    while True:
        try:
            worker.serve(host, int(port))
        except (OSError, ValueError) as exc:  # ValueError: a frame that is not JSON
            if worker.joined:
                worker.joined, delay = False, 1
            print(f"connection lost ({exc}); retrying in {delay} s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 60)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
