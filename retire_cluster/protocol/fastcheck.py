"""JSON Schemas compiled to plain Python checks, for the hot path.

jsonschema costs 80-100 µs per frame, ten times everything else the main node
does with a heartbeat. The schemas in ``schemas/`` use a small subset of JSON
Schema 2020-12, so :func:`compile_schema` turns each one into nested closures
that only answer valid / not valid, in a few microseconds. When a frame is not
valid, :class:`~retire_cluster.protocol.validation.MessageValidator` asks
jsonschema itself for the error message and path, so replies are exactly what
the reference implementation says. A keyword this compiler does not know
raises at compile time, and tests check both give the same verdict on every
golden vector and on generated messages.
"""

from __future__ import annotations

import re
from math import isfinite
from typing import Any, Callable

__all__ = ["Check", "UnsupportedSchema", "compile_schema"]

Check = Callable[[Any], bool]

_IGNORED = frozenset({"$schema", "$id", "title", "description", "$defs", "$comment", "examples", "default"})


def _all_of(checks: list[Check]) -> Check:
    # Plain loops: a generator inside all() costs twice as much per call.
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)

    def check(v: Any) -> bool:
        for c in checks:
            if not c(v):
                return False
        return True

    return check


def _any_of(checks: list[Check]) -> Check:
    def check(v: Any) -> bool:
        for c in checks:
            if c(v):
                return True
        return False

    return check


class UnsupportedSchema(ValueError):
    """The schema uses a keyword the compiler does not implement."""


def _is_int(v: Any) -> bool:
    return (type(v) is int) or (type(v) is float and v.is_integer())


_TYPES: dict[str, Check] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "integer": _is_int,
    # JSON has no NaN or infinity; an in-process caller (the dashboard's commands,
    # an HTTP query parameter) could still pass one, and NaN passes every bound.
    "number": lambda v: type(v) is int or (type(v) is float and isfinite(v)),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def _json_equal(a: Any, b: Any) -> bool:
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    return bool(a == b)


#: Keywords that :meth:`_Compiler.fused` folds into one check, by ``type``.
_FUSED = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "string": frozenset({"type", "minLength", "maxLength", "pattern"}),
}


class _Compiler:
    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.documents = documents  # by $id
        self.cache: dict[str, Check] = {}

    def resolve(self, ref: str, base: str) -> tuple[dict[str, Any], str]:
        doc_part, _, pointer = ref.partition("#")
        doc_id = base if not doc_part else base.rsplit("/", 1)[0] + "/" + doc_part
        node: Any = self.documents[doc_id]
        for part in [p for p in pointer.split("/") if p]:
            node = node[part]
        return node, doc_id

    def compile(self, schema: Any, base: str) -> Check:
        if schema is True:
            return lambda v: True
        if schema is False:
            return lambda v: False
        checks: list[Check] = []
        fused = self.fused(schema, base)
        if fused is not None:
            checks.append(fused)
        for key, value in schema.items():
            if key in _IGNORED or key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                continue
            if fused is not None and key in _FUSED[schema["type"]]:
                continue
            method = getattr(self, "k_" + key.lstrip("$"), None)
            if method is None:
                raise UnsupportedSchema(f"keyword {key!r} is not supported by the fast checker")
            checks.append(method(value, schema, base))
        bounds = self.bounds(schema)
        if bounds is not None:
            checks.append(bounds)
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        return _all_of(checks)

    def fused(self, schema: dict[str, Any], base: str) -> Check | None:
        """One function for an object's or a string's common keywords (a call each costs as much as the test)."""
        kind = schema.get("type")
        if kind == "object":
            props = [(name, self.compile(sub, base)) for name, sub in schema.get("properties", {}).items()]
            needed = frozenset(schema.get("required", ()))
            extra = schema.get("additionalProperties", True)
            known = frozenset(schema.get("properties", {}))
            closed = extra is False
            other = None if extra is True or extra is False else self.compile(extra, base)

            def object_check(v: Any) -> bool:
                if type(v) is not dict or not v.keys() >= needed:
                    return False
                if closed:
                    if not known.issuperset(v):
                        return False
                elif other is not None:
                    for k, x in v.items():
                        if k not in known and not other(x):
                            return False
                for name, sub in props:
                    if name in v and not sub(v[name]):
                        return False
                return True

            return object_check
        if kind == "string":
            lo, hi = schema.get("minLength", 0), schema.get("maxLength")
            pattern = schema.get("pattern")
            search = None if pattern is None else re.compile(pattern).search

            def string_check(v: Any) -> bool:
                return (
                    type(v) is str and len(v) >= lo and (hi is None or len(v) <= hi)
                    and (search is None or search(v) is not None)
                )  # fmt: skip

            return string_check
        return None

    def bounds(self, schema: dict[str, Any]) -> Check | None:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if lo is None and hi is None and xlo is None and xhi is None:
            return None

        def check(v: Any) -> bool:
            if type(v) not in (int, float):
                return True
            return not (
                (lo is not None and v < lo) or (hi is not None and v > hi)
                or (xlo is not None and v <= xlo) or (xhi is not None and v >= xhi)
            )  # fmt: skip

        return check

    # -- keywords (k_<name>) ---------------------------------------------------

    def k_ref(self, ref: str, schema: dict[str, Any], base: str) -> Check:
        key = base + "|" + ref
        if key not in self.cache:
            # While the target compiles, a recursive reference goes through
            # this trampoline; afterwards callers get the target directly.
            self.cache[key] = lambda v: self.cache[key](v)
            target, target_base = self.resolve(ref, base)
            self.cache[key] = self.compile(target, target_base)
        return self.cache[key]

    def k_type(self, kind: Any, schema: dict[str, Any], base: str) -> Check:
        if isinstance(kind, str):
            return _TYPES[kind]
        return _any_of([_TYPES[k] for k in kind])

    def k_enum(self, options: list[Any], schema: dict[str, Any], base: str) -> Check:
        if all(type(o) is str for o in options):
            allowed = frozenset(options)
            return lambda v: type(v) is str and v in allowed
        return lambda v: any(_json_equal(v, o) for o in options)

    def k_const(self, value: Any, schema: dict[str, Any], base: str) -> Check:
        return lambda v: _json_equal(v, value)

    def k_properties(self, props: dict[str, Any], schema: dict[str, Any], base: str) -> Check:
        compiled = [(name, self.compile(sub, base)) for name, sub in props.items()]

        def check(v: Any) -> bool:
            if type(v) is not dict:
                return True
            for name, sub in compiled:
                if name in v and not sub(v[name]):
                    return False
            return True

        return check

    def k_required(self, names: list[str], schema: dict[str, Any], base: str) -> Check:
        needed = frozenset(names)
        return lambda v: type(v) is not dict or needed.issubset(v)

    def k_additionalProperties(self, allowed: Any, schema: dict[str, Any], base: str) -> Check:
        known = frozenset(schema.get("properties", {}))
        if allowed is True:
            return lambda v: True
        if allowed is False:
            return lambda v: type(v) is not dict or known.issuperset(v)
        sub = self.compile(allowed, base)
        return lambda v: type(v) is not dict or all(sub(x) for k, x in v.items() if k not in known)

    def k_items(self, items: Any, schema: dict[str, Any], base: str) -> Check:
        sub = self.compile(items, base)

        def check(v: Any) -> bool:
            if type(v) is list:
                for x in v:
                    if not sub(x):
                        return False
            return True

        return check

    def k_maxItems(self, n: int, schema: dict[str, Any], base: str) -> Check:
        return lambda v: type(v) is not list or len(v) <= n

    def k_minItems(self, n: int, schema: dict[str, Any], base: str) -> Check:
        return lambda v: type(v) is not list or len(v) >= n

    def k_maxLength(self, n: int, schema: dict[str, Any], base: str) -> Check:
        return lambda v: type(v) is not str or len(v) <= n

    def k_minLength(self, n: int, schema: dict[str, Any], base: str) -> Check:
        return lambda v: type(v) is not str or len(v) >= n

    def k_pattern(self, pattern: str, schema: dict[str, Any], base: str) -> Check:
        search = re.compile(pattern).search
        return lambda v: type(v) is not str or search(v) is not None

    def k_allOf(self, subs: list[Any], schema: dict[str, Any], base: str) -> Check:
        return _all_of([self.compile(s, base) for s in subs])

    def k_anyOf(self, subs: list[Any], schema: dict[str, Any], base: str) -> Check:
        return _any_of([self.compile(s, base) for s in subs])

    def k_not(self, sub: Any, schema: dict[str, Any], base: str) -> Check:
        check = self.compile(sub, base)
        return lambda v: not check(v)

    def k_oneOf(self, subs: list[Any], schema: dict[str, Any], base: str) -> Check:
        checks = [self.compile(s, base) for s in subs]
        return lambda v: sum(1 for c in checks if c(v)) == 1


def compile_schema(schema: dict[str, Any], documents: dict[str, dict[str, Any]]) -> Check:
    """A function telling whether a value is valid against ``schema``.

    ``documents`` maps each ``$id`` to its schema, for ``$ref`` across files.
    Raises :class:`UnsupportedSchema` for keywords outside the supported subset.
    """
    return _Compiler(documents).compile(schema, schema["$id"])
