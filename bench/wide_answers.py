"""An emulator responder for `bench_collect.py --summary-chars N`: every answer fits the benchmark's
summary schema, with a summary of N characters (the environment's BENCH_SUMMARY_CHARS), so that the
width of the checked answers is chosen, not drawn. Its usage is given: the emulator need not count
the tokens of the long answer."""

from __future__ import annotations

import json
import os

FILLER = "a careful summary of the review "


def summary_answer(params: dict, custom_id: str | None = None) -> dict:
    chars = int(os.environ.get("BENCH_SUMMARY_CHARS", "1200"))
    text = json.dumps({"sentiment": "positive", "topics": ["price", "quality"],
                       "summary": (f"{custom_id} " + FILLER * (chars // len(FILLER) + 1))[:chars]})
    return {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": chars // 4}}
