"""A retire-cluster plug-in task type: ``wordcount`` counts the words of ``payload.text``.

The worker finds it through the ``retire_cluster.task_types`` entry point
(see pyproject.toml) and runs ``WordCount().run(payload, context)`` on its
event loop. Long texts are counted in chunks with a pause between them, so
the worker keeps answering heartbeats, and progress is reported as it goes.

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from typing import Any, Dict

__all__ = ["WordCount"]

WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
SPACE = re.compile(r"\s")
#: Characters counted between two yields to the event loop.
CHUNK_CHARS = 256 * 1024


class WordCount:
    """Counts words, lines and characters; the output is JSON text with the most common words.

    Payload: ``text`` (str, required), ``top`` (int, default 10): how many of
    the most common words (lower-cased) to list.
    """

    name = "wordcount"

    async def run(self, payload: Dict[str, Any], context: Any) -> Dict[str, Any]:
        """Count; raise ValueError (the task fails with its message) on a bad payload."""
        text = payload.get("text")
        if not isinstance(text, str):
            raise ValueError("wordcount needs payload.text, a string")
        top = payload.get("top", 10)
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise ValueError("wordcount payload.top must be an integer >= 0")
        counts: Counter[str] = Counter()
        start = 0
        while start < len(text):
            space = SPACE.search(text, min(len(text), start + CHUNK_CHARS))  # never cut a word in two
            end = space.start() + 1 if space else len(text)
            counts.update(w.lower() for w in WORD.findall(text, start, end))
            start = end
            if start < len(text):
                context.progress(round(100.0 * start / len(text), 1), f"counted {start} of {len(text)} characters")
                await asyncio.sleep(0)
        words = sum(counts.values())
        summary = {
            "words": words,
            "unique_words": len(counts),
            "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
            "characters": len(text),
            "top": [[word, n] for word, n in counts.most_common(top)],
        }
        return {"output": json.dumps(summary, ensure_ascii=False), "exit_code": 0,
                "metrics": {"words": words, "characters": len(text)}}
