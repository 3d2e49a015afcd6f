"""One-off generator kept for reference; schemas/*.json are the source of truth.

Run `python tools/make_schemas.py` only to rewrite them all from this file.
"""
import json
from pathlib import Path

BASE = "https://retire-cluster.invalid/schemas/"
OUT = Path(__file__).resolve().parent.parent / "schemas"

ID = {"type": "string", "minLength": 1, "maxLength": 128}
SHORT = {"type": "string", "maxLength": 256}
COUNT = {"type": "integer", "minimum": 0}
NUM = {"type": "number"}

common = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": BASE + "common.json",
    "title": "Shared definitions",
    "$defs": {
        "id": ID,
        "envelope": {
            "type": "object",
            "required": ["message_type", "message_id", "sender_id"],
            "properties": {
                "message_type": {"type": "string", "minLength": 1, "maxLength": 64},
                "message_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "sender_id": ID,
                "target_id": ID,
                "timestamp": {"type": "string", "maxLength": 64},
                "auth_token": {"type": "string", "maxLength": 256},
                "data": {"type": "object"},
            },
            "additionalProperties": False,
        },
        "priority": {
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 100},
                {"enum": ["low", "normal", "high", "urgent"]},
            ]
        },
        "requirements": {
            "type": "object",
            "properties": {
                "min_cpu_cores": {"type": "integer", "minimum": 1},
                "min_memory_gb": {"type": "number", "minimum": 0},
                "platform": SHORT,
                "architecture": SHORT,
                "role": SHORT,
                "capabilities": {"type": "array", "items": SHORT, "maxItems": 64},
            },
            "additionalProperties": False,
        },
        "task_status": {
            "enum": ["pending", "assigned", "running", "completed", "failed", "cancelled", "timeout"]
        },
        "result": {
            "type": "object",
            "properties": {
                "output": {"type": ["string", "null"]},
                "exit_code": {"type": ["integer", "null"]},
                "stderr": {"type": ["string", "null"]},
                "truncated": {"type": "boolean"},
                "error": {"type": ["string", "null"]},
                "metrics": {"type": "object"},
            },
        },
        "task_record": {
            "type": "object",
            "required": ["task_id", "task_type", "status", "priority", "attempt"],
            "properties": {
                "task_id": ID,
                "task_type": {"type": "string"},
                "status": {"$ref": "#/$defs/task_status"},
                "priority": {"type": "integer"},
                "timeout": NUM,
                "payload": {"type": "object"},
                "requirements": {"type": "object"},
                "max_retries": COUNT,
                "attempt": COUNT,
                "assigned_device": {"type": ["string", "null"]},
                "result": {"anyOf": [{"$ref": "#/$defs/result"}, {"type": "null"}]},
                "error": {"type": ["string", "null"]},
                "progress": {"type": ["number", "null"]},
                "created_at": {"type": ["string", "null"]},
                "assigned_at": {"type": ["string", "null"]},
                "started_at": {"type": ["string", "null"]},
                "finished_at": {"type": ["string", "null"]},
            },
        },
    },
}


def message(name, title, data_schema, example_note=""):
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": BASE + name + ".json",
        "title": title,
        "type": "object",
        "allOf": [{"$ref": "common.json#/$defs/envelope"}],
        "properties": {
            "message_type": {"const": name},
            "data": data_schema,
        },
        "required": ["data"] if data_schema.get("required") else [],
    }


def obj(props, required=(), extra=False):
    s = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        s["required"] = list(required)
    return s


task_ref = {"type": "object"}
schemas = {
    "register": message(
        "register",
        "A worker joins (or rejoins) the cluster",
        obj(
            {
                "device_info": obj(
                    {
                        "hostname": SHORT,
                        "platform": SHORT,
                        "architecture": SHORT,
                        "python_version": SHORT,
                        "role": SHORT,
                    },
                    required=["hostname", "platform", "architecture", "python_version"],
                    extra=True,
                ),
                "hardware_specs": obj(
                    {
                        "cpu_cores": {"type": "integer", "minimum": 1},
                        "memory_total": COUNT,
                        "disk_space": COUNT,
                        "network_interfaces": {"type": "array", "items": SHORT, "maxItems": 256},
                    },
                    required=["cpu_cores", "memory_total"],
                    extra=True,
                ),
                "capabilities": {"type": "array", "items": SHORT, "maxItems": 256},
                "task_types": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 256},
                "max_concurrent_tasks": {"type": "integer", "minimum": 1, "maximum": 1024},
                "running_tasks": {
                    "type": "array",
                    "maxItems": 1024,
                    "items": obj({"task_id": ID, "attempt": {"type": "integer", "minimum": 1}}, required=["task_id", "attempt"]),
                },
                "accepting": {"type": "boolean"},
                "reason": {"type": ["string", "null"], "maxLength": 256},
            },
            required=["device_info", "hardware_specs"],
            extra=True,
        ),
    ),
    "heartbeat": message(
        "heartbeat",
        "A worker is alive; its metrics",
        obj(
            {
                "system_metrics": {"type": "object"},
                "status": SHORT,
                "active_tasks": COUNT,
                "last_activity": {"type": ["string", "null"]},
                "accepting": {"type": "boolean"},
                "reason": {"type": ["string", "null"], "maxLength": 256},
            },
            extra=True,
        ),
    ),
    "task_assign": message(
        "task_assign",
        "The main node gives a task to a worker",
        obj(
            {
                "task": obj(
                    {
                        "task_id": ID,
                        "task_type": {"type": "string"},
                        "priority": {"$ref": "common.json#/$defs/priority"},
                        "timeout": NUM,
                        "payload": {"type": "object"},
                        "requirements": {"type": "object"},
                        "attempt": {"type": "integer", "minimum": 1},
                    },
                    required=["task_id", "task_type", "payload", "timeout", "attempt"],
                    extra=True,
                )
            },
            required=["task"],
        ),
    ),
    "task_result": message(
        "task_result",
        "A worker reports how a task ended",
        obj(
            {
                "task_id": ID,
                "attempt": {"type": "integer", "minimum": 1},
                "status": {"enum": ["completed", "failed", "cancelled", "timeout"]},
                "execution_time": {"type": "number", "minimum": 0},
                "result": {"$ref": "common.json#/$defs/result"},
            },
            required=["task_id", "attempt", "status"],
        ),
    ),
    "task_progress": message(
        "task_progress",
        "A worker reports progress of a running task",
        obj(
            {
                "task_id": ID,
                "attempt": {"type": "integer", "minimum": 1},
                "progress": {"type": "number", "minimum": 0, "maximum": 100},
                "message": {"type": "string", "maxLength": 1024},
            },
            required=["task_id", "attempt"],
        ),
    ),
    "task_cancel": message(
        "task_cancel",
        "Cancel a task (client to main node, and main node to the worker holding it)",
        obj({"task_id": ID, "attempt": {"type": "integer", "minimum": 1}, "reason": SHORT}, required=["task_id"]),
    ),
    "task_submit": message(
        "task_submit",
        "A client submits a task",
        obj(
            {
                "task": obj(
                    {
                        "task_type": {"type": "string", "minLength": 1, "maxLength": 64},
                        "payload": {"type": "object"},
                        "priority": {"$ref": "common.json#/$defs/priority"},
                        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 31536000},
                        "requirements": {"$ref": "common.json#/$defs/requirements"},
                        "max_retries": {"type": "integer", "minimum": 0, "maximum": 100},
                        "retry_on_timeout": {"type": "boolean"},
                        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 128},
                    },
                    required=["task_type"],
                )
            },
            required=["task"],
        ),
    ),
    "task_status": message(
        "task_status", "A client asks for one task's record", obj({"task_id": ID}, required=["task_id"])
    ),
    "task_list": message(
        "task_list",
        "A client lists tasks, newest first",
        obj(
            {
                "status": {"$ref": "common.json#/$defs/task_status"},
                "device_id": ID,
                "task_type": {"type": "string", "maxLength": 64},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
            }
        ),
    ),
    "list_devices": message(
        "list_devices",
        "A client lists devices",
        obj({"status": {"enum": ["online", "offline"]}}),
    ),
    "cluster_status": message("cluster_status", "A client asks for counts of devices and tasks by state", obj({})),
    "subscribe": message(
        "subscribe",
        "A client asks for task_update pushes (for these tasks, or all when task_ids is absent)",
        obj({"task_ids": {"type": "array", "items": ID, "maxItems": 10000}}),
    ),
    "task_update": message(
        "task_update",
        "The main node pushes a changed task record to subscribers",
        obj({"task": {"$ref": "common.json#/$defs/task_record"}}, required=["task"]),
    ),
    "ack": message(
        "ack",
        "Success reply to a request",
        obj({"original_message_id": {"type": ["string", "null"]}, "result": {}}, required=["original_message_id"]),
    ),
    "error": message(
        "error",
        "Failure reply to a request",
        obj(
            {
                "original_message_id": {"type": ["string", "null"]},
                "code": {
                    "enum": [
                        "invalid_json", "frame_too_large", "invalid_message", "unknown_message_type",
                        "unauthorized", "not_registered", "forbidden", "not_found", "conflict",
                        "overloaded", "internal",
                    ]
                },
                "error": {"type": "string"},
                "path": {"type": "string"},
            },
            required=["original_message_id", "code", "error"],
        ),
    ),
}

OUT.mkdir(exist_ok=True)
(OUT / "common.json").write_text(json.dumps(common, indent=2) + "\n")
for name, schema in schemas.items():
    if not schema["required"]:
        del schema["required"]
    (OUT / f"{name}.json").write_text(json.dumps(schema, indent=2) + "\n")
print("wrote", len(schemas) + 1, "schemas")
