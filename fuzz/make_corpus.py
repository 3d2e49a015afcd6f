"""Write the seed corpus of fuzz_codec.py into fuzz/corpus/ (one file per input, named by SHA-1).

    python fuzz/make_corpus.py

Each input is a control byte (limits and chunking, see fuzz_codec.one_input)
and the bytes a peer sends: every golden vector, and the shapes the strict
JSON checks care about. Inputs the fuzzer finds worth keeping can be added to
fuzz/corpus/ by hand; this script only adds, it never deletes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "protocol" / "vectors" / "frames.json"

ENVELOPE = b'{"message_type":"task_submit","message_id":"m","sender_id":"c","data":{"task":{"task_type":"echo","payload":%s}}}'


def seeds() -> List[bytes]:
    out: List[bytes] = []
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    valid = 0
    for i, v in enumerate(vectors):
        frame = bytes.fromhex(v["frame_hex"]) if "frame_hex" in v else v["frame"].encode("utf-8")
        if len(frame) > 4096:
            continue
        if v["decode"] == "message":  # a few valid ones; the fuzzer mutates them
            valid += 1
            if valid > 8:
                continue
        control = (i * 37) & 0xFF | 0x08  # max_depth 32 (bits 2-3 = 2), varied limits and chunks
        control &= ~0x04
        out.append(bytes([control]) + frame + b"\n")
    shapes = [
        b"[" * 33 + b"]" * 33,
        b"[" * 32 + b"]" * 32,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        b"[" * 3000,
        b"]" * 50 + b"[" * 50,
        b'{"a":"' + b"[" * 60 + b'"}',
        b'{"a":"\\"' + b"[" * 60 + b'"}',
        b'{"a":"\\\\",' + b"[" * 60 + b"]" * 60 + b"}",
        ENVELOPE % b'{"k":1,"k":2}',
        ENVELOPE % b'{"k":1,"\\u006b":2}',
        ENVELOPE % b'{"k":"\\u003a","k":"x"}',
        ENVELOPE % b'{"k":"\\u003a\\u003A:"}',
        ENVELOPE % b'{"k":[{"a":1},{"a":1}]}',
        ENVELOPE % b'{"k":"\\ud800"}',
        ENVELOPE % b'{"k":"\\ud83d\\ude00"}',
        ENVELOPE % b'{"k":"\\udc00\\ud800"}',
        ENVELOPE % b'{"k":NaN}',
        ENVELOPE % b'{"k":-Infinity}',
        ENVELOPE % b'{"k":1e400}',
        ENVELOPE % b'{"k":18446744073709551616}',
        ENVELOPE % b'{"k":"\\u0000 \\" \xf0\x9f\x98\x80"}',
        ENVELOPE % b'{"k":"\xc0\xaf"}',
        ENVELOPE % b'{"k":"\xed\xa0\x80"}',
        b'{"message_type":"x","message_id":"m","sender_id":"s"}\r\n\r\n\n{"message_type":"y"',
        b'{"message_type":"x","message_id":"m","sender_id":"s","auth_token":"t","data":[]}\n' * 3,
        b'\xef\xbb\xbf{"message_type":"x","message_id":"m","sender_id":"s"}',
        b" " * 300 + b"\n" + b"x" * 300,
        b"\n" * 100,
    ]
    for i, shape in enumerate(shapes):
        out.append(bytes([0x08 | (i % 4) | ((i % 8) << 4)]) + shape + b"\n")
        out.append(bytes([0x09 | 0x70]) + shape)  # unterminated, whole chunks
    return out


def main() -> None:
    corpus = HERE / "corpus"
    corpus.mkdir(exist_ok=True)
    added = 0
    for data in seeds():
        path = corpus / hashlib.sha1(data).hexdigest()
        if not path.exists():
            path.write_bytes(data)
            added += 1
    print(f"{added} new inputs in {corpus}")


if __name__ == "__main__":
    main()
