"""Replay the saved atheris corpus (fuzz/corpus/) through the fuzz target's own function.

The fuzzer itself runs by hand (fuzz/README.md); this keeps what it found, and
the seeds, checked on every CI run without atheris.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
CORPUS = sorted((FUZZ / "corpus").iterdir())


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_codec", FUZZ / "fuzz_codec.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGET = load_target()


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 24
    assert all(p.is_file() and p.stat().st_size <= 64 * 1024 for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name[:12] for p in CORPUS])
def test_corpus_input_keeps_the_invariants(path: Path) -> None:
    TARGET.one_input(path.read_bytes())


def test_the_target_does_catch_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay would notice a codec that let a too-deep frame through."""
    from retire_cluster.protocol import codec

    monkeypatch.setattr(codec, "_nesting_ok", lambda data, max_depth: True)
    deep = (
        b'{"message_type":"x","message_id":"m","sender_id":"s","data":{"a":' + b"[" * 40 + b"]" * 40 + b"}}"
    )
    with pytest.raises(AssertionError):
        TARGET.one_input(bytes([0x0B]) + deep + b"\n")  # 16 KiB frames, depth 32
