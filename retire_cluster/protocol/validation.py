"""Check messages against the JSON Schemas in ``schemas/``.

The schemas (JSON Schema 2020-12, one file per message type plus
``common.json``) are the published description of the wire format. They ship
inside the wheel as ``retire_cluster/schemas/``; in a source checkout they are
read from the top-level ``schemas/`` directory.

jsonschema is needed here; the worker never imports this module.
"""

from __future__ import annotations

import json
from functools import lru_cache
from math import isfinite
from pathlib import Path
from typing import Any

from .errors import InvalidMessage, UnknownMessageType, did_you_mean
from .fastcheck import compile_schema
from .messages import Message

__all__ = ["SCHEMA_BASE_URI", "MessageValidator", "load_schemas", "schema_dir"]

SCHEMA_BASE_URI = "https://retire-cluster.invalid/schemas/"


def schema_dir() -> Path:
    """The directory holding the schema files (installed or source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "common.json").is_file():
            return candidate
    raise FileNotFoundError(
        "retire_cluster schemas not found; reinstall the package (pip install retire-cluster)."
    )


@lru_cache(maxsize=1)
def load_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by name (file name without ``.json``)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(schema_dir().glob("*.json")):
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _json_path(error: Any) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class MessageValidator:
    """Validates whole messages (envelope and ``data``) by ``message_type``.

    Args:
        types: the message types to accept; others raise UnknownMessageType.
            Defaults to every type that has a schema.
    """

    def __init__(self, types: frozenset[str] | None = None) -> None:
        from jsonschema import Draft202012Validator, validators
        from referencing import Registry, Resource

        # JSON numbers are finite; NaN would pass every minimum and maximum (as in fastcheck).
        finite = Draft202012Validator.TYPE_CHECKER.redefine(
            "number", lambda checker, v: type(v) is int or (type(v) is float and isfinite(v))
        )
        strict = validators.extend(Draft202012Validator, type_checker=finite)

        schemas = load_schemas()
        registry: Registry[Any] = Registry().with_resources(
            (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
        )
        names = set(schemas) - {"common"}
        if types is not None:
            names &= set(types)
        self._validators = {
            name: strict(schemas[name], registry=registry) for name in names
        }
        documents = {schema["$id"]: schema for schema in schemas.values()}
        self._fast = {name: compile_schema(schemas[name], documents) for name in names}

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._validators)

    def validate_obj(self, obj: dict[str, Any]) -> None:
        """Validate a decoded JSON object.

        Raises:
            UnknownMessageType: no schema for its ``message_type``.
            InvalidMessage: with ``path`` set to the JSON path of the first error.
        """
        mtype = obj.get("message_type")
        fast = self._fast.get(mtype) if isinstance(mtype, str) else None
        if fast is None:
            hint = did_you_mean(mtype, self._fast) if isinstance(mtype, str) else ""
            raise UnknownMessageType(
                f"Unknown message_type {mtype!r}; {hint}see protocol/PROTOCOL.md for the list."
            )
        if fast(obj):
            return
        # Invalid (the rare case): let jsonschema say exactly why and where.
        error = next(iter(self._validators[str(mtype)].iter_errors(obj)), None)
        if error is None:
            return
        best = _deepest(error)
        path = _json_path(best)
        raise InvalidMessage(f"{path}: {_wording(best)}", path=path)

    def valid(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj`` is a valid message of a known type (the compiled check alone: no error)."""
        fast = self._fast.get(obj.get("message_type"))  # type: ignore[arg-type]
        return fast is not None and fast(obj)

    def reference_ok(self, obj: dict[str, Any]) -> bool:
        """jsonschema's own verdict (tests compare it with the fast path)."""
        validator = self._validators[obj["message_type"]]
        return bool(validator.is_valid(obj))

    def fast_ok(self, obj: dict[str, Any]) -> bool:
        """The compiled checker's verdict."""
        return self._fast[obj["message_type"]](obj)

    def validate(self, message: Message) -> None:
        """Validate a :class:`Message`; see :meth:`validate_obj`."""
        self.validate_obj(message.to_wire())


def _deepest(error: Any) -> Any:
    """The most specific sub-error (jsonschema reports oneOf/allOf failures at the top).

    When every alternative of a oneOf/anyOf refused the value itself (not
    something inside it), the top error stays, worded by :func:`_wording`
    with all of them: "'hgih' is not of type 'integer' and is not one of
    ['low', ...]" rather than the first alternative's half of the story.
    """
    while error.context:
        if error.validator in ("oneOf", "anyOf") and all(not e.relative_path for e in error.context):
            return error
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def _wording(error: Any) -> str:
    """The error's message, with a long value cut short instead of the reason."""
    value = _short(repr(error.instance), 60)
    if error.validator in ("oneOf", "anyOf") and error.context:
        reasons = []
        for sub in error.context:
            text = sub.message
            reasons.append(text[len(repr(sub.instance)):].strip() if text.startswith(repr(sub.instance)) else text)
        return _short(f"{value} {' and '.join(dict.fromkeys(reasons))}")
    text = error.message
    if text.startswith(repr(error.instance)):
        text = value + text[len(repr(error.instance)):]
    return _short(text)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
