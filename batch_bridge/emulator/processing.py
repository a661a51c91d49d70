"""One batch's requests -> its results file: the per-request work, and where it runs.

`process_batch` is a function of its inputs (a `Job`, the responder, the prompt cache) and
the batch's files, so the same code runs in the worker thread or in a separate process.

Why a separate process: the per-request work (~25 µs each, pure Python) holds the GIL, so in
the server process it starves the HTTP side. With the batch being processed, a create body
is parsed at half speed and every poll waits for the interpreter. `ProcessingChild` is a
long-lived child process (a fresh interpreter, so nothing is inherited mid-use from the server's
threads) that processes every batch one after the other. It owns the prompt cache, so requests still
meet the cache and the fault draws in a stable order and results stay reproducible. The
server's worker thread only schedules, forwards cancels/expiry, and records the outcome.

Results are written to BUCKETS files chosen by a hash of `custom_id` and then concatenated,
so the results file is deliberately not in request order (the API makes no order promise),
while memory stays constant: requests are read one JSONL line at a time.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Literal

from . import ids, models
from .config import Faults
from .faults import request_outcome
from .jsonl import dumps as _dumps
from .jsonl import loads_line
from .responder import Responder, ResponderError, finish_message, load_responder
from .usage import CacheNeeded, NoPromptCache, PromptCache
from .validate import check_params

log = logging.getLogger("batch_bridge.emulator")

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
    # Processed apart from the prompt cache, in parallel with other batches: stops with
    # CacheNeeded at the first request the cache could apply to (see Worker._dispatch).
    cache_free: bool = False


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
    """Write the batch's results file; `interrupted()` is asked every CHECK_EVERY requests."""
    work = job.results_path.parent / "work"
    work.mkdir(exist_ok=True)
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
    tmp = job.results_path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for k in range(BUCKETS):
            with open(work / f"{k:02d}.jsonl", "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    tmp.replace(job.results_path)
    shutil.rmtree(work, ignore_errors=True)
    return outcome


def _answer(
    job: Job, responder: Responder, cache: PromptCache, outcome: Outcome, cid: str, params: Any, raw: bytes
) -> tuple[str, str]:
    problem = check_params(params)
    if problem is not None:
        return "errored", errored_line(cid, "invalid_request_error", problem)
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
    info = models.lookup(params["model"])
    min_tokens = job.cache_min_tokens
    if min_tokens is None:
        min_tokens = info.cache_min_tokens if info else 1024
    input_usage = cache.account(params, min_tokens)
    message = finish_message(answer, params, input_usage, ids.stable_id("msg", raw))
    try:
        return "succeeded", _dumps({"custom_id": cid, "result": {"type": "succeeded", "message": message}})
    except (TypeError, ValueError, RecursionError) as exc:  # a plug-in answer that is not JSON
        return "errored", errored_line(cid, "api_error", f"responder answer is not JSON: {exc}")


def _fault_message(error_type: str) -> str:
    return "Overloaded" if error_type == "overloaded_error" else "Internal server error"


# --- the child process -----------------------------------------------------------------------


class ProcessingChild:
    """A child Python process that runs `process_batch` for the worker thread, one batch at a time.

    With several children, the first one owns the prompt cache; the others only take batches
    no cache can apply to (`Job.cache_free`).

    A plain `python -c` subprocess rather than a multiprocessing spawn: spawn re-imports the
    host's `__main__`, so a script without an `if __name__ == "__main__"` guard would start
    its emulator again inside the child. Messages are pickles over a socketpair
    (`multiprocessing.connection.Connection`): the parent sends ("init", sys.path, responder)
    once, then ("process", Job), ("interrupt", kind), ("clear_cache",) or ("stop",); the
    child answers init and each job with an Outcome, True, or ("error", traceback text).
    """

    def __init__(self, responder_spec: str | Responder | None) -> None:
        parent_end, child_end = socket.socketpair()
        code = f"from batch_bridge.emulator.processing import child_main; child_main({child_end.fileno()})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL)
        child_end.close()
        self._conn = Connection(parent_end.detach())
        self._send_lock = threading.Lock()
        self._send(("init", list(sys.path), responder_spec))
        answer = self._conn.recv() if self._conn.poll(120) else ("error", "no answer within 120 s")
        if answer is not True:
            self.stop()
            raise RuntimeError(f"the processing process could not start:\n{answer[1]}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def run(self, job: Job, interrupted: Callable[[], Interruption | None], stopping: threading.Event) -> Outcome:
        """Process `job` in the child; forward a cancel or the expiry when `interrupted()` says so."""
        self._send(("process", job))
        forwarded = job.mode != "process"
        while not self._conn.poll(0.05):
            if stopping.is_set() or not self.alive():
                self.stop()
                raise RuntimeError(f"processing of {job.batch_id} stopped: the processing process is gone")
            if not forwarded:
                why = interrupted()
                if why is not None:
                    self._send(("interrupt", why))
                    forwarded = True
        answer = self._conn.recv()
        if answer == ("cache_needed",):
            raise CacheNeeded()
        if isinstance(answer, tuple):
            raise RuntimeError(f"processing of {job.batch_id} failed in the processing process:\n{answer[1]}")
        return answer  # type: ignore[no-any-return]

    def clear_cache(self) -> None:
        self._send(("clear_cache",))

    def stop(self) -> None:
        """Ask the child to exit; kill it if it does not within 0.5 s (e.g. mid-batch)."""
        try:
            self._send(("stop",))
        except OSError:
            pass
        try:
            self._proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._conn.close()


def child_main(fd: int) -> None:
    """The processing process: serve jobs from the parent until "stop" or the parent is gone."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    _, sys_path, responder_spec = conn.recv()
    sys.path[:] = sys_path  # a plug-in responder importable in the parent is importable here
    try:
        responder = load_responder(responder_spec)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(True)
    cache = PromptCache()
    later: list[tuple[Any, ...]] = []  # messages that arrived while a batch was being processed
    interruption: list[Interruption] = []

    def interrupted() -> Interruption | None:
        while conn.poll():
            message = conn.recv()
            if message[0] == "interrupt":
                interruption.append(message[1])
            else:
                later.append(message)
        return interruption[0] if interruption else None

    while True:
        if later:
            message = later.pop(0)
        else:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone
                return
        if message[0] == "stop":
            return
        if message[0] == "clear_cache":
            cache.clear()
        elif message[0] == "process":  # a late "interrupt" of a finished batch is ignored
            interruption.clear()
            start = time.process_time()
            job: Job = message[1]
            try:
                outcome = process_batch(job, responder, NoPromptCache() if job.cache_free else cache, interrupted)
            except CacheNeeded:
                conn.send(("cache_needed",))
                continue
            except Exception:
                conn.send(("error", traceback.format_exc()))
                continue
            outcome.cpu_seconds = time.process_time() - start
            conn.send(outcome)
