"""atheris fuzz target: any bytes through the codec give messages or typed refusals.

Run by hand (not in CI; atheris is not a dependency)::

    pip install atheris
    python fuzz/fuzz_codec.py fuzz/corpus -max_total_time=600

CI replays the saved corpus through :func:`one_input` (tests/test_fuzz_corpus.py).
The first input byte picks the limits and how the rest is chunked; the rest is
the byte stream a peer sends. Checked, for the orjson backend and the
standard-library fallback alike:

- every event is a :class:`Message` or a :class:`BadFrame` whose error is a
  :class:`RemoteProtocolError` with a wire code; a closing error comes last;
- at most ``max_frame_bytes`` is ever buffered;
- how the bytes are chunked changes nothing (unless a frame was too large);
- a message nests at most ``max_depth`` deep and survives encode -> decode;
- both backends give equal messages and refuse the same frames with the
  same codes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python fuzz/fuzz_codec.py` from a checkout
    sys.path.insert(0, str(REPO))

from retire_cluster.protocol import codec  # noqa: E402
from retire_cluster.protocol.errors import ERROR_CODES, RemoteProtocolError  # noqa: E402
from retire_cluster.protocol.messages import Message  # noqa: E402

FRAME_LIMITS = (64, 256, 1024, 16 * 1024)
DEPTHS = (2, 5, 32, 100)
CHUNKS = (1, 2, 3, 7, 64, 512, 4096, 1 << 30)


def _load_stdlib_codec() -> ModuleType:
    """A second copy of codec.py, imported as if orjson were missing."""
    name = "retire_cluster.protocol._fuzz_codec_without_orjson"
    spec = importlib.util.spec_from_file_location(name, codec.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]  # makes `import orjson` fail
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        if saved is None:
            del sys.modules["orjson"]
        else:
            sys.modules["orjson"] = saved
    return module


STDLIB_CODEC = _load_stdlib_codec()
BACKENDS = (codec, STDLIB_CODEC)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in node)
    return deepest


def _run(module: ModuleType, data: bytes, max_frame: int, max_depth: int, chunk: int) -> List[Any]:
    stream = module.MessageStream(max_frame, max_depth=max_depth)
    events: List[Any] = []
    for i in range(0, len(data), chunk):
        events += stream.feed(data[i : i + chunk])
        assert stream.decoder.buffered_bytes <= max_frame, "buffered more than max_frame_bytes"
    events += stream.feed(b"")
    assert stream.feed(b"more\n") == [], "a closed stream produced events"
    return events


def _summary(module: ModuleType, events: List[Any], max_depth: int) -> List[Tuple[str, Any]]:
    out: List[Tuple[str, Any]] = []
    for i, event in enumerate(events):
        if isinstance(event, Message):
            assert _depth(event.to_wire()) <= max_depth, "a message deeper than max_depth"
            frame = codec.encode(event)
            assert frame.endswith(b"\n") and frame.count(b"\n") == 1
            assert codec.decode_message(frame[:-1], max_depth) == event, "encode/decode changed it"
            out.append(("message", event))
            continue
        assert isinstance(event, module.BadFrame), f"unexpected event {event!r}"
        error = event.error
        assert isinstance(error, RemoteProtocolError), f"untyped refusal {error!r}"
        assert error.code in ERROR_CODES and isinstance(error.message, str) and error.message
        if error.close:
            assert i == len(events) - 1, "events after a closing error"
        out.append((error.code, event.message_id))
    return out


def one_input(data: bytes) -> None:
    """The fuzz target: raises AssertionError when an invariant breaks."""
    if not data:
        return
    control, body = data[0], data[1:]
    max_frame = FRAME_LIMITS[control & 3]
    max_depth = DEPTHS[(control >> 2) & 3]
    chunk = CHUNKS[(control >> 4) & 7]
    results = []
    for module in BACKENDS:
        whole = _summary(module, _run(module, body, max_frame, max_depth, len(body) or 1), max_depth)
        split = _summary(module, _run(module, body, max_frame, max_depth, chunk), max_depth)
        if not any(code == "frame_too_large" for code, _ in whole + split):
            assert whole == split, "chunking changed the events"
        results.append(whole)
    assert results[0] == results[1], "orjson and stdlib backends disagree"


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.instrument_all()  # the codec was imported above
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
