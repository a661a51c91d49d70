"""A create body on disk -> `requests.jsonl`, one validated request per line.

Two parsers, one result. The fast one reads the body in 1 MiB text chunks and hands each
request object to the C JSON decoder (`raw_decode`), then writes the request's own bytes
as its line: one C parse per request and no re-encoding, about 3x the throughput of
building each item with ijson and dumping it again. It accepts only the shape clients send,
`{"requests": [{...}, ...]}` (any JSON whitespace), and gives up on anything else: another
top-level key, a syntax error, invalid UTF-8, `NaN`, a request over 16 MiB. Giving up means
starting again with ijson (C backend, event by event), so unusual and invalid bodies get
exactly the answers and error messages they always got, and memory stays bounded by one
chunk plus one request either way, never by the body size.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, TextIO

import ijson

from .jsonl import dumps as _dumps
from .validate import EnvelopeError, check_item

CHUNK_CHARS = 1 << 20
MAX_ITEM_CHARS = 16 << 20  # a bigger single request goes to ijson, which streams it

_HEAD = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"requests"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*([,\]])")
_TAIL = re.compile(r"[ \t\n\r]*\}[ \t\n\r]*")


class _NotFast(Exception):
    """The body is not in the shape the fast parser takes; ijson decides instead."""


# Where Python's decoder is more lenient than yajl, the fast parser steps aside.
def _no_constants(name: str) -> Any:
    raise _NotFast(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _NotFast(f"{text} overflows a double")
    return value


_raw_decode = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float).raw_decode


def persist_requests(body_path: Path, out_path: Path, max_requests: int) -> int:
    """Validate the envelope of an uploaded create body and write it as JSONL; return the count.

    Raises EnvelopeError; on error `out_path` is not left behind.
    """
    tmp = out_path.with_suffix(".tmp")
    try:
        try:
            count = _fast(body_path, tmp, max_requests)
        except _NotFast:
            count = _with_ijson(body_path, tmp, max_requests)
        if count > max_requests:
            raise EnvelopeError(f"requests: List should have at most {max_requests} items after validation, not {count}")
        if count == 0:
            raise EnvelopeError(_describe_missing_requests(body_path))
        os.replace(tmp, out_path)
        return count
    finally:
        tmp.unlink(missing_ok=True)


def _open_out(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20)


def _fast(body_path: Path, tmp: Path, max_requests: int) -> int:
    first_seen: dict[str, int] = {}
    count = 0
    try:
        with open(body_path, encoding="utf-8", newline="") as f, _open_out(tmp) as out:
            buf = f.read(CHUNK_CHARS)
            head = _HEAD.match(buf)
            if head is None or buf.startswith("]", head.end()):
                raise _NotFast("not {\"requests\": [ ... ]} or an empty list")
            pos, eof = head.end(), len(buf) < CHUNK_CHARS
            while True:
                pos = _WS.match(buf, pos).end()
                try:
                    item, end = _raw_decode(buf, pos)
                    sep = _SEP.match(buf, end)
                except json.JSONDecodeError:
                    sep = None
                except (ValueError, RecursionError):  # e.g. an integer over 4,300 digits
                    raise _NotFast("a value Python's decoder refuses") from None
                if sep is None:  # the request (or the comma after it) runs past the buffer
                    if eof or len(buf) - pos > MAX_ITEM_CHARS:
                        raise _NotFast("invalid JSON, or one request larger than MAX_ITEM_CHARS")
                    more = f.read(CHUNK_CHARS)
                    buf, pos, eof = buf[pos:] + more, 0, len(more) < CHUNK_CHARS
                    continue
                if count < max_requests:
                    check_item(count, item, first_seen)
                    line = buf[pos:end]
                    if "\n" in line or "\r" in line or "\\ud" in line or "\\uD" in line:
                        # Pretty-printed (a line per request is needed) or with escaped surrogates
                        # (a lone one cannot be written as UTF-8; yajl makes it "?"): re-encode.
                        line = _dumps({"custom_id": item["custom_id"], "params": item["params"]})
                        try:
                            line.encode("utf-8")
                        except UnicodeEncodeError:
                            raise _NotFast("a lone surrogate") from None
                    out.write(line)
                    out.write("\n")
                count += 1  # past the limit: keep counting so the message can say how many there were
                pos = sep.end()
                if sep.group(1) == "]":
                    rest = buf[pos:] + f.read(CHUNK_CHARS)
                    tail = _TAIL.match(rest)
                    if tail is None or tail.end() != len(rest) or f.read(1):
                        raise _NotFast("something after the requests list")
                    return count
    except UnicodeDecodeError:
        raise _NotFast("not UTF-8") from None


def _with_ijson(body_path: Path, tmp: Path, max_requests: int) -> int:
    first_seen: dict[str, int] = {}
    count = 0
    with open(body_path, "rb") as f, _open_out(tmp) as out:
        try:
            for item in ijson.items(f, "requests.item", use_float=True):
                if count >= max_requests:
                    count += 1
                    continue  # keep counting so the message can say how many there were
                check_item(count, item, first_seen)
                out.write(_dumps({"custom_id": item["custom_id"], "params": item["params"]}))
                out.write("\n")
                count += 1
        except ijson.JSONError as exc:
            raise EnvelopeError(f"The request body is not valid JSON: {exc}") from None
    return count


def _describe_missing_requests(body_path: Path) -> str:
    """Why `requests.item` yielded nothing: missing, not a list, or empty (a cheap early-exit scan)."""
    with open(body_path, "rb") as f:
        events = ijson.parse(f)
        first = next(events, None)
        if first is None or first[1] != "start_map":
            return "body: Input should be a valid dictionary"
        for prefix, event, value in events:
            if prefix == "" and event == "map_key" and value == "requests":
                _, kind, _ = next(events)
                if kind != "start_array":
                    return "requests: Input should be a valid list"
                return "requests: List should have at least 1 item after validation, not 0"
    return "requests: Field required"
