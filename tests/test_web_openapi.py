"""/api/v1/openapi.json describes exactly the routes the application serves."""

from __future__ import annotations

import re
from typing import Any, Dict, Set, Tuple

import webutil
from jsonschema import Draft202012Validator
from webutil import WORKER_ID, Cluster, open_stream

METHODS = {"get", "post", "put", "patch", "delete"}

cluster = webutil.cluster  # the fixture: a node serving HTTP on port 0 and a real worker


def live_routes(cluster: Cluster) -> Set[Tuple[str, str]]:
    """(method, path) of every route of the running application (HEAD is implied by GET)."""
    routes = set()
    for resource in cluster.node.web.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info["formatter"]
        for route in resource:
            if route.method != "HEAD":
                routes.add((route.method.lower(), path))
    return routes


def documented(doc: Dict[str, Any]) -> Set[Tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item if method in METHODS}


def refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


async def test_the_document_matches_the_live_routes(cluster: Cluster) -> None:
    status, doc = await cluster.get("/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    live, docs = live_routes(cluster), documented(doc)
    assert live - docs == set(), "routes served but not documented"
    assert docs - live == set(), "routes documented but not served"
    assert len(live) >= 20


async def test_the_document_is_well_formed(cluster: Cluster) -> None:
    doc = (await cluster.get("/api/v1/openapi.json"))[1]
    for ref in set(refs(doc)):
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]  # KeyError: a dangling reference
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    for path, item in doc["paths"].items():
        params = set(re.findall(r"{(\w+)}", path))
        for method, op in item.items():
            assert op["summary"] and "500" in op["responses"], (method, path)
            public = op.get("security") == []
            assert public or "401" in op["responses"], (method, path)
            assert params == {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}, (method, path)
    public = {(m, p) for p, item in doc["paths"].items() for m, op in item.items() if op.get("security") == []}
    assert public == {("get", "/"), ("get", "/api/v1/health"), ("get", "/static/{filename}")}


async def test_every_documented_get_answers_with_a_documented_status(cluster: Cluster) -> None:
    doc = (await cluster.get("/api/v1/openapi.json"))[1]
    for path, item in doc["paths"].items():
        if "get" not in item or "{" in path:
            continue
        if path.startswith("/stream/"):
            (await open_stream(cluster, path)).close()
            continue
        status, _ = await cluster.get(path)
        assert str(status) in item["get"]["responses"], (path, status)
    for path, sample in (("/api/v1/devices/{device_id}", "nope"), ("/api/v1/tasks/{task_id}", "nope"),
                         ("/static/{filename}", "dashboard.css")):
        status, _ = await cluster.get(path.split("{")[0] + sample)
        assert str(status) in doc["paths"][path]["get"]["responses"], (path, status)


async def test_a_query_parameter_given_twice_is_refused_unless_documented_as_repeatable(cluster: Cluster) -> None:
    """?status=pending&status=running used to list only pending tasks, silently."""
    status, body = await cluster.get("/api/v1/tasks?status=pending&status=running")
    assert (status, body["path"]) == (400, "?status"), body
    doc = (await cluster.get("/api/v1/openapi.json"))[1]
    assert "given twice" in doc["info"]["description"]
    checked = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                if param["in"] != "query" or param["schema"].get("type") == "array":
                    continue  # the repeatable ones (task_id, device_id on /stream/...) are an array
                name = param["name"]
                url = path.replace("{device_id}", WORKER_ID).replace("{task_id}", "nope")
                status, body = await cluster.request(method.upper(), f"{url}?{name}=1&{name}=2", json={})
                assert status == 400 and "400" in op["responses"], (method, path, name, status, body)
                assert body["code"] == "invalid_message" and body["path"] == f"?{name}", body
                assert body["error"] == f"query parameter {name!r} is given 2 times; it takes one value, so give it once."
                checked.add((path, name))
    assert ("/api/v1/tasks", "status") in checked and ("/text/tasks", "status") in checked
    assert ("/api/v1/devices", "status") in checked and ("/stream/logs", "level") in checked
    status, body = await cluster.get("/stream/logs?last_event_id=1&last_event_id=2")
    assert status == 400 and body["path"] == "?last_event_id", body
