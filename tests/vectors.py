"""The golden vectors of protocol/vectors/frames.json, for parametrizing tests.

Import as ``from vectors import load_vectors`` (pytest puts tests/ on sys.path
because it has no ``__init__.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

VECTORS_FILE = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "frames.json"

Vector = Dict[str, Any]


def load_vectors(path: Optional[Path] = None) -> List[Vector]:
    """Every vector, in file order, each with its frame's bytes added as ``frame_bytes``."""
    vectors: List[Vector] = json.loads((path or VECTORS_FILE).read_text(encoding="utf-8"))
    for vector in vectors:
        vector["frame_bytes"] = frame_bytes(vector)
    return vectors


def frame_bytes(vector: Vector) -> bytes:
    """The frame as sent, without its newline."""
    if "frame_hex" in vector:
        return bytes.fromhex(vector["frame_hex"])
    return vector["frame"].encode("utf-8")


def vector_params(vectors: List[Vector]) -> List[Any]:
    """``pytest.param`` per vector, with the vector's name as the test id."""
    return [pytest.param(v, id=v["name"]) for v in vectors]
