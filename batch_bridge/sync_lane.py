"""The sync lane: a journalled submission's requests sent as synchronous Messages calls.

A sync-lane submission is prepared exactly like a batch's (`submit.Preparer`: the same request file,
the same `sent_requests` rows, committed before anything is sent), so dedupe, incremental hashing,
rejected rows and the in-flight check are the batch lane's. Instead of a create, `state.start_sync`
gives it a local run id (`msg_run_<submission>`) and a `batches` row of lane `sync`; each line of the
request file is then posted as it is (`params`, the body a batch line carries) to `POST /v1/messages`,
`Job.sync_concurrency` at a time, and every answer is appended to `results/raw/<run id>.jsonl` as soon
as it arrives, in the shape of a batch result line. That file is the run's result file: once it holds
an answer to every request the run is ended and downloaded (`state.end_sync`), and the batch loader
loads it set-wise into `responses` (DuckDB's read_json, never row inserts), at standard prices.

Crash safety: requests are journalled before the first call; answers are on disk as they arrive. A run
killed mid-way stays `submitted`; the next command truncates a line cut short, skips every request whose
answer is in the file (completed calls are never paid again) and sends the others, so a call that was in
flight at the kill is sent again exactly once.

Failures by class, as in a batch: 429 (its retry-after waited out, by every worker) and 529/5xx/timeouts
(backoff) are retried within the run a few times, then recorded as `errored` with the API's error type,
which counts against `max_attempts` and is sent again by a later run; a 400/413 is recorded as the
answer (the input is refused: `invalid_request`); an account failure (401/402/403/404 model) stops the
lane with what to fix, leaving the run open and its unanswered rows to the next run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator


from . import api, state
from .config import Settings
from .errors import ApiAccountError, ApiError
from .jobs import Job
from .progress import Progress, Silent

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

RUN_PREFIX = "msg_run_"
# Tries of one call within a run for a retryable failure (429, 529, 5xx, timeout) before it is recorded
# as errored (and sent again by a later run, within max_attempts).
CALL_TRIES = 6
CALL_TIMEOUT = 600.0
# A failure the API attributes to the account (or the job's model): nothing further can succeed.
_STOP_TYPES = ("authentication_error", "billing_error", "permission_error", "not_found_error")


@dataclass
class SyncReport:
    answered: dict[str, int] = field(default_factory=dict)  # job -> calls answered (any outcome) by this command
    runs: list[str] = field(default_factory=list)  # run ids ended by this command
    calls: int = 0  # HTTP calls made, retries included


def run_id_of(submission_id: str) -> str:
    return RUN_PREFIX + submission_id


def _prepared(settings: Settings, jobs: list[str]) -> list[dict]:
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT submission_id, job, request_count FROM bb_state.submissions "
            "WHERE lane = 'sync' AND state = 'prepared' ORDER BY prepared_at, submission_id").fetchall()
    return [{"submission_id": s, "job": j, "request_count": n} for s, j, n in rows if j in jobs]


def open_runs(settings: Settings, jobs: list[str]) -> list[dict]:
    """Sync-lane runs whose calls are not all answered yet: started by this command or interrupted."""
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT b.batch_id, b.job, b.request_count, s.request_file FROM bb_state.batches b "
            "JOIN bb_state.submissions s USING (submission_id) "
            "WHERE b.lane = 'sync' AND b.local_state = 'submitted' ORDER BY b.created_at, b.batch_id").fetchall()
    return [{"run_id": r, "job": j, "request_count": n, "request_file": f} for r, j, n, f in rows if j in jobs]


def send(
    client: anthropic.Anthropic, settings: Settings, jobs: dict[str, Job], *, progress: Progress = Silent(),
    sleep: Callable[[float], None] = time.sleep, fault: Callable[[str], None] | None = None,
) -> SyncReport:
    """Start every prepared sync-lane submission and send every open run's unanswered requests."""
    report = SyncReport()
    names = list(jobs)
    for sub in _prepared(settings, names):
        with state.connect(settings) as con:
            con.execute("BEGIN")
            try:
                state.start_sync(con, sub["submission_id"], run_id_of(sub["submission_id"]), sub["request_count"])
                con.execute("COMMIT")
            except Exception:
                state.rollback(con)
                raise
    for run in open_runs(settings, names):
        _send_run(client, settings, jobs[run["job"]], run, report, progress, sleep, fault)
    return report


class _Gate:
    """When the next call may go: a 429's retry-after holds every worker, not only the one that got it."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self._lock = threading.Lock()
        self._until = 0.0
        self._sleep = sleep

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self) -> None:
        with self._lock:
            left = self._until - time.monotonic()
        if left > 0:
            self._sleep(left)


def _answered(path: Path) -> tuple[set[str], int, dict[str, int]]:
    """Custom ids already answered in an answers file (a last line cut short by a kill is dropped first),
    the line count, and the count per result type."""
    done: set[str] = set()
    counts: dict[str, int] = {}
    if not path.exists():
        return done, 0, counts
    with open(path, "rb+") as f:
        data_end = f.seek(0, os.SEEK_END)
        if data_end:
            # Find the last newline: anything after it is a line the kill cut short.
            pos = data_end
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    pos = pos - step + nl + 1
                    break
                pos -= step
            if pos != data_end:
                f.truncate(pos)
        f.seek(0)
        for line in f:
            obj = json.loads(line)
            done.add(obj["custom_id"])
            kind = obj["result"]["type"]
            counts[kind] = counts.get(kind, 0) + 1
    return done, len(done), counts


def _requests(path: Path, skip: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(custom_id, params) of each request line not yet answered, read one line at a time."""
    with open(path, "rb") as f:
        for line in f:
            obj = json.loads(line)
            if obj["custom_id"] not in skip:
                yield obj["custom_id"], obj["params"]


def _call(client: anthropic.Anthropic, params: dict[str, Any], gate: _Gate, sleep: Callable[[float], None],
          report: SyncReport, lock: threading.Lock) -> dict[str, Any]:
    """One request's result, as a batch result line would carry it; raises ApiAccountError to stop."""
    no_retries = client.with_options(max_retries=0)  # retries are ours: by failure class, retry-after shared
    for attempt in range(CALL_TRIES):
        gate.wait()
        with lock:
            report.calls += 1
        try:
            message = api.create_message(no_retries, params, timeout=CALL_TIMEOUT)
        except ApiError as e:
            failure = api.call_failure(e)
            if failure.error_type in _STOP_TYPES or isinstance(e, ApiAccountError):
                raise
            retryable = failure.status is None or failure.status in (408, 409, 429) or failure.status >= 500
            if retryable and attempt < CALL_TRIES - 1:
                wait = api.backoff(attempt, failure.retry_after)
                if failure.status == 429:
                    gate.hold(wait)
                else:
                    sleep(wait)
                continue
            return {"type": "errored",
                    "error": {"type": "error", "error": {"type": failure.error_type, "message": failure.message}}}
        return {"type": "succeeded", "message": message.model_dump(mode="json", exclude_none=True)}
    raise AssertionError("unreachable: the last try returns")


def _send_run(
    client: anthropic.Anthropic, settings: Settings, job: Job, run: dict, report: SyncReport, progress: Progress,
    sleep: Callable[[float], None], fault: Callable[[str], None] | None,
) -> None:
    settings.raw_results_dir.mkdir(parents=True, exist_ok=True)
    path = settings.raw_results_dir / f"{run['run_id']}.jsonl"
    done, lines, counts = _answered(path)
    total = run["request_count"]
    gate, lock = _Gate(sleep), threading.Lock()
    stop: list[BaseException] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    answered_here = 0

    def one(custom_id: str, params: dict[str, Any]) -> None:
        nonlocal lines, answered_here
        if stop:
            return
        try:
            result = _call(client, params, gate, sleep, report, lock)
        except ApiError as e:
            stop.append(e)
            return
        line = (json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False,
                           separators=(",", ":")) + "\n").encode()
        with lock:
            os.write(fd, line)  # one write of a whole line, appended: on disk as the call returns
            lines += 1
            answered_here += 1
            counts[result["type"]] = counts.get(result["type"], 0) + 1
            progress.tick(f"{job.name}: synchronous calls answered", lines, total)
        if fault:
            fault("during_sync")

    try:
        with ThreadPoolExecutor(max_workers=job.sync_concurrency) as pool:
            flying: deque[Future[None]] = deque()
            todo = _requests(Path(run["request_file"]), done)
            if job.cache_ttl != "none":
                # The first call goes alone and writes the shared prefix to the prompt cache; the others
                # then read it (sent together at first, each would pay the cache write).
                for custom_id, params in todo:
                    one(custom_id, params)
                    break
            # At most two calls per worker are queued: memory stays flat in the number of requests.
            for custom_id, params in todo:
                if stop:
                    break
                while len(flying) >= 2 * job.sync_concurrency:
                    flying.popleft().result()
                flying.append(pool.submit(one, custom_id, params))
            for fut in flying:
                fut.result()
    finally:
        os.fsync(fd)
        os.close(fd)
    report.answered[job.name] = report.answered.get(job.name, 0) + answered_here
    if stop:
        raise stop[0]
    if lines != total:
        return  # cannot happen unless the request file changed; the run stays open and is looked at again
    with state.connect(settings) as con:
        state.end_sync(con, run["run_id"], str(path), lines, os.path.getsize(path), counts)
    report.runs.append(run["run_id"])
