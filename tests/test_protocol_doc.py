"""Every JSON example in protocol/PROTOCOL.md is a valid message, and every schema has an example."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

from retire_cluster.protocol.validation import MessageValidator, load_schemas


def examples() -> list:
    text = (REPO / "protocol" / "PROTOCOL.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.+?)\n```", text, flags=re.S)]


@pytest.mark.parametrize("example", examples(), ids=lambda e: e["message_type"])
def test_example_validates(example: dict) -> None:
    MessageValidator().validate_obj(example)


def test_every_message_schema_has_an_example() -> None:
    documented = {e["message_type"] for e in examples()}
    assert set(load_schemas()) - {"common"} <= documented
