"""One batch's requests -> its results file: the per-request work.

`process_batch` is a function of its inputs (a `Job`, the responder, the prompt cache) and
the batch's files, so the same code runs in the worker thread or in a processing process
(`child.py`); `worker.py` decides which batch runs where.

Results are written to BUCKETS files chosen by a hash of `custom_id` and then concatenated,
so the results file is deliberately not in request order (the API makes no order promise),
while memory stays constant: requests are read one JSONL line at a time.
"""

from __future__ import annotations

import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from . import ids, models
from .config import Faults
from .faults import request_outcome
from .jsonl import dumps as _dumps
from .jsonl import loads_line
from .responder import Responder, ResponderError, finish_message
from .usage import PromptCache, too_long
from .validate import params_error

BUCKETS = 16
CHECK_EVERY = 256  # requests between looks for a cancel or the expiry while processing
Mode = Literal["process", "cancel", "expire"]
Interruption = Literal["canceled", "expired"]


@dataclass(frozen=True)
class Job:
    """Everything `process_batch` needs to know about one batch (picklable)."""

    batch_id: str
    requests_path: Path
    results_path: Path
    mode: Mode
    faults: Faults  # a snapshot taken when processing starts
    cancel_complete_fraction: float
    cache_min_tokens: int | None
    cache_hit_rate: float
    # Processed apart from the prompt cache, in parallel with other batches: stops with
    # CacheNeeded at the first request the cache could apply to (see Worker._dispatch).
    cache_free: bool = False
    # Part `part` of `parts` (of a batch of `lines` requests): lines lines*part//parts up to
    # lines*(part+1)//parts, left as bucket files for `join_parts`. One part writes the results itself.
    part: int = 0
    parts: int = 1
    lines: int = 0


@dataclass
class Outcome:
    """What processing one batch produced, for the store and the stats."""

    counts: dict[str, int]
    faults: Counter[str] = field(default_factory=Counter)  # injected outcomes: expired, errored
    cpu_seconds: float = 0.0


def errored_line(custom_id: str, error_type: str, message: str) -> str:
    return _dumps(
        {
            "custom_id": custom_id,
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": error_type, "message": message}, "request_id": None},
            },
        }
    )


def _simple_line(custom_id: str, result_type: str) -> str:
    # custom_id matches ^[a-zA-Z0-9_-]+$, so no escaping is needed.
    return f'{{"custom_id":"{custom_id}","result":{{"type":"{result_type}"}}}}'


def process_batch(
    job: Job, responder: Responder, cache: PromptCache, interrupted: Callable[[], Interruption | None]
) -> Outcome:
    """Write the batch's results file (or a part's bucket files); `interrupted()` is asked every
    CHECK_EVERY requests."""
    work = _work_dir(job.results_path, job.part if job.parts > 1 else None)
    work.mkdir(exist_ok=True)
    first, end = 0, None
    if job.parts > 1:
        first, end = job.lines * job.part // job.parts, job.lines * (job.part + 1) // job.parts
    buckets = [
        open(work / f"{k:02d}.jsonl", "w", encoding="utf-8", newline="\n", buffering=1 << 18)
        for k in range(BUCKETS)
    ]
    outcome = Outcome(counts={"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    counts = outcome.counts
    seed = job.faults.seed
    rest: Interruption | None = "expired" if job.mode == "expire" else None
    try:
        with open(job.requests_path, "rb") as requests:
            for n, raw in enumerate(requests):
                if n < first:
                    continue
                if end is not None and n >= end:
                    break
                item = loads_line(raw)
                cid: str = item["custom_id"]
                if job.mode == "process" and rest is None and n % CHECK_EVERY == 0:
                    # Requests not yet sent to the "model" when a cancel or the expiry
                    # arrives end canceled / expired; the ones already done stay done.
                    rest = interrupted()
                if rest is not None:
                    kind, line = rest, _simple_line(cid, rest)
                elif job.mode == "cancel" and ids.fraction(seed, "cancel", cid) >= job.cancel_complete_fraction:
                    kind, line = "canceled", _simple_line(cid, "canceled")
                else:
                    kind, line = _answer(job, responder, cache, outcome, cid, item["params"], raw)
                counts[kind] += 1
                out = buckets[zlib.crc32(cid.encode()) % BUCKETS]
                out.write(line)
                out.write("\n")
    finally:
        for f in buckets:
            f.close()
    if job.parts == 1:
        _concatenate([work], job.results_path)
    return outcome


def _work_dir(results_path: Path, part: int | None) -> Path:
    return results_path.parent / ("work" if part is None else f"work-{part}")


def _concatenate(works: list[Path], results_path: Path) -> None:
    """The results file: bucket by bucket, each bucket's lines part after part. The parts of a batch
    hold consecutive ranges of its requests, so this is the file one part would have written."""
    tmp = results_path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for k in range(BUCKETS):
            for work in works:
                with open(work / f"{k:02d}.jsonl", "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
    tmp.replace(results_path)
    drop_parts(results_path)


def join_parts(results_path: Path, parts: int) -> None:
    """Write the results file of a batch processed in `parts` parts (see `Job.part`)."""
    _concatenate([_work_dir(results_path, k) for k in range(parts)], results_path)


def drop_parts(results_path: Path) -> None:
    """Remove the bucket files any processing of the batch left (parts of a run given up, or done)."""
    for work in results_path.parent.glob("work*"):
        shutil.rmtree(work, ignore_errors=True)


def _answer(
    job: Job, responder: Responder, cache: PromptCache, outcome: Outcome, cid: str, params: Any, raw: bytes
) -> tuple[str, str]:
    problem = params_error(params)
    if problem is not None:
        return "errored", errored_line(cid, *problem)
    info = models.lookup(params["model"])
    long = too_long(params, len(raw), info.max_input_tokens) if info else None
    if long is not None:
        return "errored", errored_line(cid, "invalid_request_error", long)
    injected = request_outcome(job.faults, cid)
    if injected == "expired":
        outcome.faults["expired"] += 1
        return "expired", _simple_line(cid, "expired")
    if injected is not None:
        outcome.faults["errored"] += 1
        return "errored", errored_line(cid, injected, _fault_message(injected))
    try:
        answer = responder(params, cid)
    except ResponderError as exc:
        return "errored", errored_line(cid, exc.error_type, exc.message)
    except Exception as exc:  # a plug-in bug becomes an api_error for that request only
        return "errored", errored_line(cid, "api_error", f"responder raised {type(exc).__name__}: {exc}")
    if answer.get("type") == "error":
        err = answer.get("error") or {}
        return "errored", errored_line(cid, err.get("type", "api_error"), err.get("message", ""))
    min_tokens = job.cache_min_tokens
    if min_tokens is None:
        min_tokens = info.cache_min_tokens if info else 1024
    input_usage = cache.account(params, min_tokens, job.cache_hit_rate, ids.fraction(job.faults.seed, "cache", cid))
    message = finish_message(answer, params, input_usage, ids.stable_id("msg", raw))
    try:
        return "succeeded", _dumps({"custom_id": cid, "result": {"type": "succeeded", "message": message}})
    except (TypeError, ValueError, RecursionError) as exc:  # a plug-in answer that is not JSON
        return "errored", errored_line(cid, "api_error", f"responder answer is not JSON: {exc}")


def _fault_message(error_type: str) -> str:
    return "Overloaded" if error_type == "overloaded_error" else "Internal server error"
