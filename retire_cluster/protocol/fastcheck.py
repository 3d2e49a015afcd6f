"""JSON Schemas compiled to plain Python functions, for the hot path.

jsonschema costs 80-100 µs per frame, ten times everything else the main node
does with a heartbeat. The schemas in ``schemas/`` use a small subset of JSON
Schema 2020-12, so :func:`compile_schema` writes each one out as the source of
one Python function (as fastjsonschema does for older drafts) that only answers
valid / not valid: a heartbeat takes about a microsecond, where nested
closures took four. When a frame is not valid,
:class:`~retire_cluster.protocol.validation.MessageValidator` asks jsonschema
itself for the error message and path, so replies are exactly what the
reference implementation says. A keyword this compiler does not know raises at
compile time, and tests check both give the same verdict on every golden
vector and on generated messages.

The generated code checks a value with straight-line tests that ``return
False`` at the first failure. Subschemas of ``properties``, ``items``,
``additionalProperties``, ``allOf`` and non-recursive ``$ref`` are written
inline; ``anyOf``, ``oneOf``, ``not``, ``propertyNames`` and recursive
references become functions of their own. Constants (key sets, patterns, enum values) are
globals of the generated module, never text pasted into the source, except
property names and plain strings written with ``repr``.
"""

from __future__ import annotations

import re
from math import isfinite
from typing import Any, Callable

__all__ = ["Check", "UnsupportedSchema", "compile_schema"]

Check = Callable[[Any], bool]

_IGNORED = frozenset({"$schema", "$id", "title", "description", "$defs", "$comment", "examples", "default"})

#: The keywords the compiler implements (anything else raises UnsupportedSchema).
_KNOWN = frozenset({
    "type", "properties", "required", "additionalProperties", "minProperties", "maxProperties", "propertyNames",
    "items", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "enum", "const", "$ref", "allOf", "anyOf", "oneOf", "not",
})

#: Inline at most this deep; further down a subschema becomes a function (Python caps indentation).
_MAX_INLINE_DEPTH = 24


class UnsupportedSchema(ValueError):
    """The schema uses a keyword the compiler does not implement."""


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1.0 is 1, at any depth (Python's == says True == 1)."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if type(a) is list:
        return type(b) is list and len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return (type(b) is dict and a.keys() == b.keys()
                and all(_json_equal(x, b[k]) for k, x in a.items()))  # fmt: skip
    return type(b) not in (list, dict) and bool(a == b)


#: An expression template per JSON type: bool is not a number, 1.0 is an integer, and NaN and
#: infinity are not numbers (JSON has none, but an in-process caller such as the dashboard's
#: commands could pass one, and NaN passes every bound).
#: ``{t}`` is ``type(x)``, or a local holding it when several tests ask.
_TYPE_TESTS = {
    "object": "{t} is dict",
    "array": "{t} is list",
    "string": "{t} is str",
    "integer": "({t} is int or ({t} is float and {x}.is_integer()))",
    "number": "({t} is int or ({t} is float and _isfinite({x})))",
    "boolean": "{t} is bool",
    "null": "{x} is None",
}


def _type_test(kind: str, x: str, t: str | None = None) -> str:
    """An expression true when ``x`` (whose type is the expression ``t``) is of JSON type ``kind``."""
    if kind not in _TYPE_TESTS:
        raise UnsupportedSchema(f"type {kind!r} is not a JSON type")
    return _TYPE_TESTS[kind].format(x=x, t=t or f"type({x})")


class _Writer:
    """Writes the source of one module: a function per compiled (sub)schema that needs one."""

    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.documents = documents  # by $id
        self.names: dict[str, Any] = {"_isfinite": isfinite, "_json_equal": _json_equal}
        self.functions: list[str] = []
        self.by_key: dict[str, str] = {}  # "base|ref" or id-based key -> function name
        self._counter = 0
        #: value expression -> the local holding its type, while the code that set it is being written
        self._types: dict[str, str] = {}

    def type_of(self, x: str) -> str:
        """An expression for ``type(x)``: a local when one holds it."""
        return self._types.get(x) or f"type({x})"

    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def const(self, value: Any) -> str:
        name = self.fresh("_k")
        self.names[name] = value
        return name

    def resolve(self, ref: str, base: str) -> tuple[Any, str]:
        doc_part, _, pointer = ref.partition("#")
        doc_id = base if not doc_part else base.rsplit("/", 1)[0] + "/" + doc_part
        node: Any = self.documents[doc_id]
        for part in [p for p in pointer.split("/") if p]:
            node = node[part]
        return node, doc_id

    def function(self, schema: Any, base: str, refs: tuple[str, ...] = (), key: str | None = None) -> str:
        """The name of a function checking ``schema`` (written once per ``key``)."""
        if key is not None and key in self.by_key:
            return self.by_key[key]
        name = self.fresh("_f")
        if key is not None:
            self.by_key[key] = name  # before the body: a recursive reference calls it
        body: list[str] = []
        self.emit(schema, base, "v", body, 1, refs)
        self.functions.append("\n".join([f"def {name}(v):", *body, "    return True"]))
        return name

    def emit(self, schema: Any, base: str, x: str, out: list[str], depth: int, refs: tuple[str, ...]) -> None:
        """Lines that ``return False`` unless ``x`` is valid against ``schema``."""
        pad = "    " * depth
        if schema is True:
            return
        if schema is False:
            out.append(f"{pad}return False")
            return
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"a schema must be an object or a boolean, not {schema!r}")
        for key in schema:
            if key not in _KNOWN and key not in _IGNORED:
                raise UnsupportedSchema(f"keyword {key!r} is not supported by the fast checker")
        kind = schema.get("type")
        outer = self._types.get(x)
        self.emit_type(kind, x, out, pad)
        self.emit_values(schema, x, out, pad)
        self.emit_object(schema, base, x, out, depth, refs, kind == "object")
        self.emit_string(schema, x, out, depth, kind == "string")
        self.emit_array(schema, base, x, out, depth, refs, kind == "array")
        self.emit_bounds(schema, x, out, depth, kind in ("integer", "number"))
        self.emit_combined(schema, base, x, out, depth, refs)
        if outer is None:
            self._types.pop(x, None)
        else:
            self._types[x] = outer

    def emit_type(self, kind: Any, x: str, out: list[str], pad: str) -> None:
        if isinstance(kind, str):
            out.append(f"{pad}if not {_type_test(kind, x, self.type_of(x))}: return False")
        elif isinstance(kind, list):
            # Several tests of one value: type() once, in a local the later length checks use too.
            t = self._types[x] = self.fresh("_t")
            tests = " or ".join(_type_test(k, x, t) for k in kind)
            out.append(f"{pad}{t} = type({x})")
            out.append(f"{pad}if not ({tests}): return False")
        elif kind is not None:
            raise UnsupportedSchema(f"type must be a string or a list, not {kind!r}")

    def emit_values(self, schema: dict[str, Any], x: str, out: list[str], pad: str) -> None:
        """``const`` and ``enum``."""
        if "const" in schema:
            value = schema["const"]
            if type(value) is str:
                out.append(f"{pad}if type({x}) is not str or {x} != {value!r}: return False")
            else:
                out.append(f"{pad}if not _json_equal({x}, {self.const(value)}): return False")
        if "enum" in schema:
            options = schema["enum"]
            if all(type(o) is str for o in options):
                out.append(f"{pad}if type({x}) is not str or {x} not in {self.const(frozenset(options))}: return False")
            else:
                opts = self.const(tuple(options))
                out.append(f"{pad}for _o in {opts}:")
                out.append(f"{pad}    if _json_equal({x}, _o): break")
                out.append(f"{pad}else: return False")

    def emit_combined(self, schema: dict[str, Any], base: str, x: str, out: list[str], depth: int,
                      refs: tuple[str, ...]) -> None:
        """``$ref``, ``allOf``, ``anyOf``, ``oneOf`` and ``not``."""
        pad = "    " * depth
        if "$ref" in schema:
            self.emit_ref(schema["$ref"], base, x, out, depth, refs)
        for sub in schema.get("allOf", ()):
            self.emit_sub(sub, base, x, out, depth, refs)
        if "anyOf" in schema:
            calls = " or ".join(f"{self.function(s, base, refs)}({x})" for s in schema["anyOf"])
            out.append(f"{pad}if not ({calls}): return False")
        if "oneOf" in schema:
            calls = " + ".join(f"{self.function(s, base, refs)}({x})" for s in schema["oneOf"])
            out.append(f"{pad}if ({calls}) != 1: return False")
        if "not" in schema:
            negated = schema["not"]
            if isinstance(negated, dict) and set(negated) - _IGNORED == {"pattern"}:
                # The usual case ("no control characters"): one search, no call.
                search = self.const(re.compile(negated["pattern"]).search)
                out.append(f"{pad}if type({x}) is str and {search}({x}) is not None: return False")
            else:
                out.append(f"{pad}if {self.function(negated, base, refs)}({x}): return False")

    def emit_sub(self, schema: Any, base: str, x: str, out: list[str], depth: int, refs: tuple[str, ...]) -> None:
        """``schema`` inline, or as a call when the code is already deep."""
        if depth < _MAX_INLINE_DEPTH:
            self.emit(schema, base, x, out, depth, refs)
        else:
            out.append(f"{'    ' * depth}if not {self.function(schema, base, refs)}({x}): return False")

    def emit_ref(self, ref: str, base: str, x: str, out: list[str], depth: int, refs: tuple[str, ...]) -> None:
        key = base + "|" + ref
        target, target_base = self.resolve(ref, base)
        if key in refs or key in self.by_key:  # recursive (or already a function): call it
            name = self.by_key.get(key) or self.function(target, target_base, refs, key)
            out.append(f"{'    ' * depth}if not {name}({x}): return False")
        else:
            self.emit_sub(target, target_base, x, out, depth, refs + (key,))

    def emit_object(self, schema: dict[str, Any], base: str, x: str, out: list[str], depth: int,
                    refs: tuple[str, ...], known_type: bool) -> None:
        props: dict[str, Any] = schema.get("properties", {})
        needed = schema.get("required", ())
        extra = schema.get("additionalProperties", True)
        lo, hi, names = schema.get("minProperties"), schema.get("maxProperties"), schema.get("propertyNames", True)
        if not props and not needed and extra is True and lo is None and hi is None and names is True:
            return
        pad = _sized(out, x, depth, None if known_type else "dict", lo, hi, self.type_of(x))
        depth = len(pad) // 4
        if names is not True:
            key = self.fresh("k")
            out.append(f"{pad}for {key} in {x}:")
            self.emit_sub(names, base, key, out, depth + 1, refs)
        if needed:
            out.append(f"{pad}if not {x}.keys() >= {self.const(frozenset(needed))}: return False")
        known = self.const(frozenset(props))
        if extra is False:
            out.append(f"{pad}if not {known}.issuperset({x}): return False")
        elif extra is not True:
            key, y = self.fresh("k"), self.fresh("v")
            out.append(f"{pad}for {key}, {y} in {x}.items():")
            if props:
                out.append(f"{pad}    if {key} in {known}: continue")
            self.emit_sub(extra, base, y, out, depth + 1, refs)
        for name, sub in props.items():
            if sub is True:
                continue
            y = self.fresh("v")
            out.append(f"{pad}if {name!r} in {x}:")
            out.append(f"{pad}    {y} = {x}[{name!r}]")
            self.emit_sub(sub, base, y, out, depth + 1, refs)

    def emit_string(self, schema: dict[str, Any], x: str, out: list[str], depth: int, known_type: bool) -> None:
        lo, hi, pattern = schema.get("minLength"), schema.get("maxLength"), schema.get("pattern")
        if lo is None and hi is None and pattern is None:
            return
        pad = _sized(out, x, depth, None if known_type else "str", lo, hi, self.type_of(x))
        if pattern is not None:
            out.append(f"{pad}if {self.const(re.compile(pattern).search)}({x}) is None: return False")

    def emit_array(self, schema: dict[str, Any], base: str, x: str, out: list[str], depth: int,
                   refs: tuple[str, ...], known_type: bool) -> None:
        lo, hi, items = schema.get("minItems"), schema.get("maxItems"), schema.get("items", True)
        if lo is None and hi is None and items is True:
            return
        pad = _sized(out, x, depth, None if known_type else "list", lo, hi, self.type_of(x))
        if items is not True:
            y = self.fresh("v")
            out.append(f"{pad}for {y} in {x}:")
            self.emit_sub(items, base, y, out, len(pad) // 4 + 1, refs)

    def emit_bounds(self, schema: dict[str, Any], x: str, out: list[str], depth: int, known_type: bool) -> None:
        tests = []
        for key, op in (("minimum", "<"), ("maximum", ">"), ("exclusiveMinimum", "<="), ("exclusiveMaximum", ">=")):
            if key in schema:
                bound = schema[key]
                if type(bound) not in (int, float):
                    raise UnsupportedSchema(f"{key} must be a number, not {bound!r}")
                tests.append(f"{x} {op} {bound!r}")
        if not tests:
            return
        pad = "    " * depth
        if not known_type:
            t = self.type_of(x)
            out.append(f"{pad}if {t} is int or {t} is float:")
            pad += "    "
        out.append(f"{pad}if {' or '.join(tests)}: return False")


def _sized(out: list[str], x: str, depth: int, guard: str | None, lo: Any, hi: Any, t: str) -> str:
    """The type guard (when the type is not known already) and length bounds; returns the indent for what follows.

    ``t`` is the expression for ``type(x)``.
    """
    if guard is not None:
        out.append(f"{'    ' * depth}if {t} is {guard}:")
        depth += 1
    pad = "    " * depth
    if lo is not None and hi is not None:
        out.append(f"{pad}if not {int(lo)} <= len({x}) <= {int(hi)}: return False")  # one len() call
    elif lo is not None:
        out.append(f"{pad}if len({x}) < {int(lo)}: return False")
    elif hi is not None:
        out.append(f"{pad}if len({x}) > {int(hi)}: return False")
    return pad


def compile_schema(schema: dict[str, Any], documents: dict[str, dict[str, Any]]) -> Check:
    """A function telling whether a value is valid against ``schema``.

    ``documents`` maps each ``$id`` to its schema, for ``$ref`` across files.
    Raises :class:`UnsupportedSchema` for keywords outside the supported subset.
    The generated source is on the function as ``__source__`` (for reading).
    """
    writer = _Writer(documents)
    main = writer.function(schema, schema["$id"])
    source = "\n\n".join(writer.functions)
    namespace = dict(writer.names)
    exec(compile(source, f"<fastcheck {schema['$id']}>", "exec"), namespace)  # our own code, written from our schemas
    check: Check = namespace[main]
    check.__source__ = source  # type: ignore[attr-defined]
    return check
