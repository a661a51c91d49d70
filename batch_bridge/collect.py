"""Ended batches -> result files -> the `responses` table -> the published results source.

Each batch's results are streamed to `results/raw/<batch_id>.jsonl` (a `.part` file renamed when
complete) and its line count checked against `request_counts`, so a stream cut short is retried,
never loaded. A batch loads in slices of its file (`Settings.load_slice_bytes`, whole lines): each
slice is one `INSERT ... SELECT` over DuckDB's own `read_json` (each line parsed once into a typed
STRUCT), committed with the position after it, and the last slice's transaction marks the batch
`collected`. Memory is then one slice whatever the batch's size; a crash mid-load resumes at the next
slice, and a rerun loads every line exactly once. Publishing the results
source is the command's last step (`results.publish`, once per command, not once per load). A file
with a line that is not JSON, or not shaped like a result, is named (file and line), loads nothing,
and is forgotten so that the next collect downloads it again.

A 404 on a batch is the API's propagation delay only while the batch is young and has never been
seen `ended`; otherwise the batch was deleted and is marked `lost` (its rows are sent again), as is
a batch whose `archived_at` is set (results are kept 29 days).

A batch adopted after a create of unknown outcome was matched on its request count alone: its answers
confirm it. When they are not the answers to our requests (another client's batch of the same size in a
shared workspace), nothing of it is loaded, it is released as foreign, and its submission looks for its
own batch again (`state.release_foreign`). Results that errored for account reasons (billing,
permission, a model the workspace cannot see, authentication) are loaded, leave their rows sendable,
and stop the command with what to fix.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

import duckdb

from . import api, state
from .config import Settings
from .errors import ApiAccountError, ApiError, ResultsError
from .jobs import Job, quote_literal
from .outputs import valid_sql
from .pricing import PriceBook, cost_sql, load_prices, price_sql
from .progress import Progress, Silent

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

# A 404 for a batch younger than this is the API's propagation delay, not a deleted batch.
TRANSIENT_404 = timedelta(minutes=10)
DOWNLOAD_TRIES = 3
BATCH_COLUMNS = (
    "processing_status", "processing", "succeeded", "errored", "canceled", "expired",
    "created_at", "expires_at", "ended_at", "cancel_initiated_at", "archived_at", "results_url",
)


_ACCOUNT_HINTS = {
    "authentication_error": "check ANTHROPIC_API_KEY",
    "billing_error": "fix billing (credit balance or spend limit) in the Anthropic console",
    "permission_error": "use a key whose workspace may use this model and feature",
    "not_found_error": "check the job's model (and the key's workspace): the API does not know it",
}


@dataclass
class LoadReport:
    loaded: dict[str, int] = field(default_factory=dict)  # job -> result lines loaded
    foreign: list[str] = field(default_factory=list)  # adopted batches released as another client's
    account_errors: dict[str, tuple[int, str]] = field(default_factory=dict)  # error type -> (requests, a message)

    def raise_account_errors(self) -> None:
        """Stop the command when answers errored for account reasons: the next runs would fail alike."""
        if not self.account_errors:
            return
        parts = [f"{n:,} request(s) errored with {t}: {msg}" for t, (n, msg) in sorted(self.account_errors.items())]
        hints = "; ".join(_ACCOUNT_HINTS[t] for t in sorted(self.account_errors) if t in _ACCOUNT_HINTS)
        raise ApiAccountError(
            "the API refused requests for account reasons: " + "; ".join(parts),
            hint=f"{hints}. The answers were recorded; the rows stay sendable and the next run sends them",
        )


@dataclass
class CollectReport:
    refreshed: int = 0
    ended: int = 0
    downloaded: list[str] = field(default_factory=list)
    loads: LoadReport = field(default_factory=LoadReport)
    lost: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # adopted batches gone before their answers (`state.give_up`)
    still_running: int = 0

    @property
    def loaded(self) -> dict[str, int]:  # job -> result lines loaded
        return self.loads.loaded

    @property
    def foreign(self) -> list[str]:  # adopted batches released: not ours, or gone before they showed ours
        return self.loads.foreign + self.released


def record_status(con: duckdb.DuckDBPyConnection, info: api.BatchInfo) -> None:
    """Store what the API says of a batch (its own words: processing_status and request_counts)."""
    values = [getattr(info, c) for c in BATCH_COLUMNS]
    sets = ", ".join(f"{c} = ?" for c in BATCH_COLUMNS)
    con.execute(f"UPDATE bb_state.batches SET {sets}, polled_at = ? WHERE batch_id = ?",
                [*values, state.utcnow(), info.id])


def open_batches(settings: Settings, jobs: list[str] | None) -> list[dict]:
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT batch_id, job, processing_status, created_at, archived_at, request_count, local_state, ended_at "
            "FROM bb_state.batches WHERE local_state IN ('submitted', 'downloaded') AND lane = 'batch' "
            "ORDER BY created_at"
        ).fetchall()
    cols = ["batch_id", "job", "processing_status", "created_at", "archived_at", "request_count", "local_state",
            "ended_at"]
    return [dict(zip(cols, r)) for r in rows if jobs is None or r[1] in jobs]


def refresh(
    client: anthropic.Anthropic, settings: Settings, jobs: list[str] | None = None, *,
    lost: list[str] | None = None, unconfirmed: list[str] | None = None, released: list[str] | None = None,
) -> list[api.BatchInfo]:
    """Retrieve every batch not yet collected; record its status. Deleted batches are given up
    (`state.give_up`).

    Ids of batches marked lost are appended to `lost`, of adopted ones released to `released`; ids of
    young batches that answered 404 (the API's propagation delay) to `unconfirmed`: they are still in
    flight."""
    out = []
    for b in open_batches(settings, jobs):
        if b["local_state"] != "submitted":
            continue
        try:
            info = api.retrieve(client, b["batch_id"])
        except api.NotFound:
            seen_ended = b["processing_status"] == "ended" or b["ended_at"] is not None
            young = b["created_at"] is None or state.utcnow() - b["created_at"] < TRANSIENT_404
            if young and not seen_ended:
                if unconfirmed is not None:
                    unconfirmed.append(b["batch_id"])
                continue  # the API's propagation delay right after create; look again next time
            with state.connect(settings) as con:
                outcome = state.give_up(con, b["batch_id"], "the API no longer knows this batch (deleted)")
            into = lost if outcome == "lost" else released
            if into is not None:
                into.append(b["batch_id"])
            continue
        with state.connect(settings) as con:
            record_status(con, info)
        out.append(info)
    return out


def _download_one(client: anthropic.Anthropic, settings: Settings, info: api.BatchInfo,
                  sleep: Callable[[float], None], fault: Callable[[str], None] | None = None) -> tuple[str, int]:
    dest = settings.raw_results_dir / f"{info.id}.jsonl"
    last: Exception | None = None
    on_bytes = (lambda n: fault("during_download")) if fault else None
    for attempt in range(DOWNLOAD_TRIES):
        try:
            lines = api.download_results(client, info, dest, on_bytes=on_bytes)
        except (ResultsError, ApiError) as e:
            if isinstance(e, api.NotFound) and info.created_at and state.utcnow() - info.created_at > TRANSIENT_404:
                raise
            last = e
            api.sleep_backoff(attempt, None, sleep)
            continue
        if lines != info.total:
            last = ResultsError(f"results of {info.id}: {lines:,} lines but request_counts total {info.total:,}")
            dest.unlink(missing_ok=True)
            api.sleep_backoff(attempt, None, sleep)
            continue
        return str(dest), lines
    assert last is not None
    raise last


def results_ready(info: api.BatchInfo) -> bool:
    """An ended batch whose results can be downloaded, or never will be (archived). The API may say
    `ended` a moment before it gives the batch a `results_url`: such a batch is still waited for, not
    an error."""
    return info.processing_status == "ended" and (bool(info.results_url) or info.archived_at is not None)


def _give_up(settings: Settings, batch_id: str, cause: str, lost: list[str], released: list[str] | None,
             progress: Progress) -> None:
    with state.connect(settings) as con:
        outcome = state.give_up(con, batch_id, cause)
    if outcome == "lost":
        lost.append(batch_id)
        return
    progress.step(RELEASED.format(batch_id=batch_id))
    if released is not None:
        released.append(batch_id)


# Said of an adopted batch given up before its answers confirmed it (`state.give_up`).
RELEASED = ("batch {batch_id}, adopted after a create of unknown outcome, is gone before its answers showed it "
            "ours: released, and its rows' submission looks for its own batch again (nothing is sent twice)")


def download_ended(
    client: anthropic.Anthropic, settings: Settings, infos: list[api.BatchInfo], *,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    fault: Callable[[str], None] | None = None, released: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Download every ended batch in `infos` (concurrently). Returns (downloaded ids, lost ids); an
    adopted batch whose results are gone is released instead (`state.give_up`), said, and appended
    to `released`."""
    ended = [i for i in infos if results_ready(i)]
    downloaded, lost = [], []
    todo = []
    for info in ended:
        # The API sets archived_at once the results are gone; its clock, not ours, decides.
        if info.archived_at is not None:
            _give_up(settings, info.id, f"results archived at {info.archived_at.isoformat()}Z (29-day retention)",
                     lost, released, progress)
        else:
            todo.append(info)
    if not todo:
        return downloaded, lost
    settings.raw_results_dir.mkdir(parents=True, exist_ok=True)
    errors: list[Exception] = []
    # Downloads take a while: another process may use the state meanwhile (each mark opens it).
    with state.let_go(settings), ThreadPoolExecutor(max_workers=min(settings.concurrency, len(todo))) as pool:
        futures = {pool.submit(_download_one, client, settings, i, sleep, fault): i for i in todo}
        for n, (fut, info) in enumerate(futures.items(), 1):
            try:
                path, lines = fut.result()
            except api.NotFound:
                _give_up(settings, info.id, "results are no longer available (404)", lost, released, progress)
                continue
            except (ResultsError, ApiError) as e:
                errors.append(e)
                continue
            if fault:
                fault("after_download")
            with state.connect(settings) as con:
                state.mark_downloaded(con, info.id, path, lines, os.path.getsize(path))
            downloaded.append(info.id)
            progress.tick("batches downloaded", n, len(todo))
    if errors and not downloaded:
        raise errors[0]
    return downloaded, lost


# One typed parse per line: DuckDB maps each result straight into this STRUCT, ignoring fields it does
# not name (thinking, citations, server tool blocks, new usage fields) and leaving missing ones NULL.
# Much faster than a JSON column read with one `->>` (one re-parse of the document) per field.
# A dict is a STRUCT, a one-element list a LIST of it, a string a DuckDB type.
_BIGINTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
RESULT_SHAPE: dict = {
    "type": "VARCHAR",
    "message": {
        "id": "VARCHAR", "model": "VARCHAR", "stop_reason": "VARCHAR",
        "content": [{"type": "VARCHAR", "text": "VARCHAR", "name": "VARCHAR", "input": "JSON"}],
        "usage": {**{k: "BIGINT" for k in _BIGINTS},
                  "cache_creation": {"ephemeral_5m_input_tokens": "BIGINT", "ephemeral_1h_input_tokens": "BIGINT"}},
    },
    "error": {"type": "VARCHAR", "error": {"type": "VARCHAR", "message": "VARCHAR"}},
}


def _sql_type(shape: object) -> str:
    if isinstance(shape, dict):
        return "STRUCT(" + ", ".join(f"{k} {_sql_type(v)}" for k, v in shape.items()) + ")"
    if isinstance(shape, list):
        return _sql_type(shape[0]) + "[]"
    return str(shape)


RESULT_TYPE = _sql_type(RESULT_SHAPE)


def _shape_error(value: object, shape: object, where: str) -> str | None:
    """Why `value` cannot be read as `shape` (what makes DuckDB's typed read fail), or None."""
    if value is None:
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for k, sub in shape.items():
            if (why := _shape_error(value.get(k), sub, f"{where}.{k}")) is not None:
                return why
    elif isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        for i, item in enumerate(value):
            if (why := _shape_error(item, shape[0], f"{where}[{i}]")) is not None:
                return why
    elif shape == "BIGINT" and (isinstance(value, (dict, list)) or
                                (isinstance(value, str) and not value.strip().lstrip("-").isdigit())):
        return f"{where} is not a number"
    return None


# DuckDB's JSON reader buffers max(32 MB, 2 x maximum_object_size) of its file per thread (less for a
# smaller file: measured, a 10 MB file took 18 MB), and DuckDB raises a smaller maximum_object_size to
# its own 16 MB default. The bound given is the longest line of the slice (`_cut_slice` measures it), so
# ordinary slices read with DuckDB's default, and a slice holding a longer line gets a buffer that
# follows that line instead of a fixed maximum. (The slice's own size would do as a bound, but a 32 MiB
# slice and the end of its last line is 33 MiB: a 66 MiB buffer counted against the memory limit.)
MAX_RESULT_LINE = 16 * 1024 * 1024


def _object_size(longest_line: int) -> int:
    """maximum_object_size for a file whose longest line is `longest_line` bytes, in whole MiB."""
    return max(MAX_RESULT_LINE, -(-(longest_line + 1) // 2**20) * 2**20)


def _read_sql(path: str, max_line: int = MAX_RESULT_LINE) -> str:
    return (
        f"read_json({quote_literal(path)}, format = 'newline_delimited', "
        f"columns = {{custom_id: 'VARCHAR', result: {quote_literal(RESULT_TYPE)}}}, "
        f"maximum_object_size = {max_line})"
    )


def _extract_sql(job: Job, path: str, batch_id: str, submission_id: str, max_line: int = MAX_RESULT_LINE,
                 sent: str | None = None) -> str:
    """A SELECT of `responses` columns (less job, cost and collected_at) from one batch's result file
    (or a slice of it). `sent`: a relation of the submission's sent requests (request_custom_id,
    input_hash, attempt), else they are read from `sent_requests`."""
    if job.output_tool is not None:
        output_text = ("CAST(list_filter(m.content, lambda b: b.type = 'tool_use')[1].input AS VARCHAR)")
    else:
        output_text = "array_to_string(list_filter(list_transform(m.content, lambda b: b.text), lambda t: t IS NOT NULL), '')"
    schema = job.answer_schema
    if schema is not None:
        output_json = "CASE WHEN json_valid(x0.output_text) THEN json(x0.output_text) END"
        ok = valid_sql(schema, "x.output_json")
        status = f"CASE WHEN x.type = 'succeeded' AND NOT coalesce(x.output_json IS NOT NULL AND {ok}, false) THEN 'parse_failed' ELSE x.type END"
    else:
        output_json = "NULL::JSON"
        status = "x.type"
    sub = quote_literal(submission_id)
    return f"""
        WITH raw AS (
            SELECT {quote_literal(batch_id)} AS batch_id, r.custom_id, r.result.type AS type,
                   r.result.message AS m, r.result.error.error AS e
            FROM {_read_sql(path, max_line)} r
            WHERE r.custom_id IS NOT NULL
        ),
        x0 AS (
            SELECT raw.*, CASE WHEN type = 'succeeded' THEN {output_text} END AS output_text FROM raw
        ),
        x AS (SELECT *, {output_json} AS output_json FROM x0)
        SELECT x.batch_id, x.custom_id AS request_custom_id, sr.input_hash, sr.attempt,
               {status} AS status,
               x.output_text, x.output_json,
               x.m.stop_reason AS stop_reason,
               x.m.model AS model,
               x.m.usage.input_tokens AS input_tokens,
               x.m.usage.output_tokens AS output_tokens,
               x.m.usage.cache_creation_input_tokens AS cache_creation_input_tokens,
               x.m.usage.cache_read_input_tokens AS cache_read_input_tokens,
               coalesce(x.m.usage.cache_creation.ephemeral_5m_input_tokens,
                        x.m.usage.cache_creation_input_tokens
                          - coalesce(x.m.usage.cache_creation.ephemeral_1h_input_tokens, 0)) AS cache_creation_5m,
               coalesce(x.m.usage.cache_creation.ephemeral_1h_input_tokens, 0) AS cache_creation_1h,
               x.e.type AS error_type,
               x.e.message AS error_message,
               su.create_started_at AS submitted_at
        FROM x
        JOIN {sent or f"(SELECT request_custom_id, input_hash, attempt FROM bb_state.sent_requests WHERE submission_id = {sub})"} sr
          ON sr.request_custom_id = x.custom_id
        JOIN bb_state.submissions su ON su.submission_id = {sub}
    """


def _first_bad_line(path: str) -> tuple[int, str] | None:
    """(line number, why) of the first line of a result file that is not a JSON object with a custom_id
    and a result of the shape `RESULT_SHAPE` reads."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except ValueError as e:
                return n, f"not valid JSON ({e})"
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not isinstance(obj.get("result"), dict):
                return n, "not a result object with custom_id and result"
            if (why := _shape_error(obj["result"], RESULT_SHAPE, "result")) is not None:
                return n, f"not a result of the expected shape ({why})"
    return None


def _reject_bad_file(con: duckdb.DuckDBPyConnection, batches: list[tuple]) -> None:
    """Name the file and line that made read_json fail; forget that download (and the slices of it
    loaded) so it is fetched and loaded again."""
    for b in batches:
        path = b[3]
        bad = _first_bad_line(path) if Path(path).is_file() else (0, "the file is missing")
        if bad is None:
            continue
        line, why = bad
        where = f"line {line}" if line else "file"
        state.in_transaction(con, lambda: state.discard_download(
            con, b[0], f"result {where}: {why}; downloaded again by the next collect"))
        Path(path).unlink(missing_ok=True)
        raise ResultsError(
            f"results of batch {b[0]} ({path}), {where}: {why}; nothing of this batch of job {b[1]!r} was "
            "loaded (a batch loads whole or not at all)",
            hint="the file was removed; the next `batch-bridge collect` downloads it again",
        )


def load_downloaded(
    settings: Settings, jobs: dict[str, Job], *, progress: Progress = Silent(),
    fault: Callable[[str], None] | None = None,
) -> LoadReport:
    """Load every downloaded batch into `responses`, set-wise, slice by slice, and mark it collected.

    The last slice's transaction marks the batch collected and owes its answers to `input_outcomes`
    (and `key_inputs.answered`), the per-input summaries that `plan` reads instead of the whole
    history; they are folded in once FOLD_ANSWERS answers are owed, and by the command before it ends
    (`state.fold_outcomes`).

    Publishes nothing: the command calls `results.publish` once when it is done loading, which also
    writes the history part of every collected batch that has none yet."""
    report = LoadReport()
    loaded = report.loaded
    book = load_prices(settings.prices_file)
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT b.batch_id, b.job, b.submission_id, b.result_file, b.result_lines, b.loaded_lines, b.loaded_bytes "
            "FROM bb_state.batches b WHERE b.local_state = 'downloaded' ORDER BY b.job, b.batch_id"
        ).fetchall()
        by_job: dict[str, list[tuple]] = {}
        for r in rows:
            by_job.setdefault(r[1], []).append(r)
        for job_name, job_batches in by_job.items():
            job = jobs.get(job_name)
            if job is None:
                continue  # the job was removed from the project; its files stay until it returns
            total = sum((b[4] or 0) - (b[5] or 0) for b in job_batches)
            loaded[job_name] = 0
            grown = 0  # the limit a batch of this job grew to (`_load_slices`): the next starts there
            with state.single_threaded(con):  # reading files is I/O: see single_threaded
                for batch in job_batches:
                    def ticked(n: int) -> None:
                        loaded[job_name] += n
                        progress.tick("results loaded", loaded[job_name], total)

                    with (state.room_for_loading(con, settings, _line_bytes(batch), batch[4] or 0, at_least=grown),
                          state.one_checkpoint(con)):
                        start = state.memory_limit(con)
                        ok = _load_batch(con, settings, job, batch, book, fault, progress, ticked)
                        end = state.memory_limit(con)
                        grown = end if end > start else grown
                    if not ok:
                        report.foreign.append(batch[0])
                        continue
                    _account_errors(con, batch[0], report)
        with state.room_for_joining(con, settings):
            state.fold_outcomes(con, at_least=state.FOLD_ANSWERS)
    return report


def _adopted(con: duckdb.DuckDBPyConnection, submission_id: str) -> bool:
    row = con.execute("SELECT adopted FROM bb_state.submissions WHERE submission_id = ?", [submission_id]).fetchone()
    return bool(row and row[0])


def _account_errors(con: duckdb.DuckDBPyConnection, batch_id: str, report: LoadReport) -> None:
    for error_type, n, message in con.execute(
        f"SELECT error_type, count(*), any_value(error_message) FROM bb_state.responses "
        f"WHERE batch_id = ? AND status = 'errored' AND error_type IN ({', '.join(map(quote_literal, state.ACCOUNT_ERRORS))}) "
        "GROUP BY ALL", [batch_id],
    ).fetchall():
        before = report.account_errors.get(error_type, (0, message))[0]
        report.account_errors[error_type] = (before + n, message)


def _release_foreign(con: duckdb.DuckDBPyConnection, batch: tuple, lines: int, matched: int, progress: Progress) -> None:
    """An adopted batch whose answers are not ours: record it as foreign, forget what slices of it were
    loaded, and remove its file."""
    batch_id, job_name, submission_id, result_file = batch[:4]
    why = (f"adopted on its request count, but {lines - matched:,} of the {lines:,} answers in a slice of its "
           f"{batch[4] or 0:,} are not to our requests: another client's batch; never loaded, cancelled or deleted")
    state.in_transaction(con, lambda: state.release_foreign(con, batch_id, why))
    Path(result_file).unlink(missing_ok=True)  # another client's data is not ours to keep
    progress.step(f"warning: job {job_name!r}: batch {batch_id} {why}; submission {submission_id} looks for its "
                  "own batch again")


def _line_bytes(batch: tuple) -> float:
    """The mean width of a downloaded batch's result lines (its answers), for `state.room_for_loading`."""
    result_file, result_lines = batch[3], batch[4]
    try:
        return os.path.getsize(result_file) / max(1, result_lines or 0)
    except OSError:
        return 0.0  # a missing file is reported by the load itself


_COPY_CHUNK = 2**20


def _cut_slice(src: BinaryIO, offset: int, dest: Path, size: int) -> tuple[int, int, int]:
    """Copy whole lines of `src` from byte `offset`, about `size` bytes of them (one line at least), to
    `dest`, readable by its owner only (results hold user data). Returns (lines, the offset after them,
    a bound on the longest of them in bytes: exact for a line that spans chunks of the copy, the chunk's
    size for lines within one (1 MiB, far below what `_object_size` rounds to))."""
    src.seek(offset)
    lines = written = 0
    longest = run = 0  # run: the bytes of the line being copied so far
    tail = b"\n"

    def copied(chunk: bytes) -> None:
        nonlocal longest, run
        first = chunk.find(b"\n")
        if first < 0:
            run += len(chunk)
            return
        longest = max(longest, run + first + 1, len(chunk))  # the lines within it are no longer than it
        run = len(chunk) - chunk.rfind(b"\n") - 1

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as out:
        while written < size:
            chunk = src.read(min(_COPY_CHUNK, size - written))
            if not chunk:
                break
            out.write(chunk)
            copied(chunk)
            written += len(chunk)
            lines += chunk.count(b"\n")
            tail = chunk[-1:]
        if tail != b"\n":  # the slice ends inside a line: take the rest of it
            rest = src.readline()
            out.write(rest)
            copied(rest)
            written += len(rest)
            lines += rest.count(b"\n")
            if not rest.endswith(b"\n"):
                lines += 1  # a last line without a newline is complete JSON (as the download counts it)
    return lines, offset + written, max(longest, run)


def _insert_responses(con: duckdb.DuckDBPyConnection, job: Job, batch: tuple, book: PriceBook, now: object,
                      path: str, max_line: int, sent: str | None = None) -> int:
    """BEGIN, then read, extract and INSERT one slice of a batch's results in one statement (a bad
    line inserts nothing)."""
    batch_id, job_name, submission_id = batch[:3]
    select = _extract_sql(job, path, batch_id, submission_id, max_line, sent)
    # A sync-lane run's answers file loads like a batch's results; its calls are billed at standard prices.
    (lane,) = con.execute("SELECT lane FROM bb_state.batches WHERE batch_id = ?", [batch_id]).fetchone()
    # DuckDB estimates a result file at a few dozen rows whatever its size, and would build its hash
    # table from the results, answer text and all: as written, the sent requests are built instead.
    with state.joins_as_written(con):
        con.execute("BEGIN")
        return con.execute(
            f"""
            INSERT INTO bb_state.responses
            SELECT $job, r.batch_id, r.request_custom_id, r.input_hash, r.attempt, r.status,
                   r.output_text, r.output_json, r.stop_reason, r.model,
                   r.input_tokens, r.output_tokens, r.cache_creation_input_tokens, r.cache_read_input_tokens,
                   r.cache_creation_5m, r.cache_creation_1h,
                   CASE WHEN r.price IS NULL AND r.status IN ('succeeded', 'parse_failed') THEN NULL
                        ELSE {cost_sql('r', 'r.price')} END,
                   r.error_type, r.error_message, r.submitted_at, $now, $lane
            FROM (SELECT *, {price_sql(book, 'model', batch=lane != 'sync')} AS price FROM ({select})) r
            """,
            {"job": job_name, "now": now, "lane": lane},
        ).fetchone()[0]


def _load_batch(
    con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, batch: tuple, book: PriceBook,
    fault: Callable[[str], None] | None, progress: Progress, ticked: Callable[[int], None],
) -> bool:
    """Load one downloaded batch slice by slice, from where an earlier load stopped; mark it collected.

    A slice is `settings.load_slice_bytes` of the result file (whole lines, one at least), copied to
    a file of its own and read, extracted and INSERTed in one transaction with the position after it
    (`state.record_slice`). DuckDB holds an uncommitted INSERT in memory and buffers up to 32 MB of
    the file it reads, so the peak is one slice whatever the batch's size; a load cut short resumes at
    the next slice and never loads a line twice. The last slice's transaction also marks the batch
    collected and owes its answers to the summaries (`state.owe_outcomes`), so a batch is loaded whole
    or not at all.

    Returns False when the batch, adopted on its request count, proved another client's (then
    nothing of it stays loaded)."""
    submission_id, result_file = batch[2], batch[3]
    try:
        src = open(result_file, "rb")
    except OSError:
        _reject_bad_file(con, [batch])
        raise
    piece = Path(result_file + ".slice")
    # The submission's sent requests, looked up once per batch rather than once per slice: finding
    # them scans every request ever sent (their ids share a prefix, so no zone map skips any).
    con.execute("CREATE OR REPLACE TEMP TABLE bb_batch_sent AS SELECT request_custom_id, input_hash, attempt "
                "FROM bb_state.sent_requests WHERE submission_id = ?", [submission_id])
    try:
        with src:
            return _load_slices(con, settings, job, batch, book, fault, progress, ticked, src, piece)
    finally:
        con.execute("DROP TABLE IF EXISTS bb_batch_sent")


def _load_slices(
    con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, batch: tuple, book: PriceBook,
    fault: Callable[[str], None] | None, progress: Progress, ticked: Callable[[int], None], src: BinaryIO,
    piece: Path,
) -> bool:
    """The slices of `src` from where an earlier load stopped (see `_load_batch`)."""
    batch_id, job_name, submission_id, _, result_lines = batch[:5]
    done, offset = batch[5] or 0, batch[6] or 0
    expected = result_lines or 0
    size = os.fstat(src.fileno()).st_size
    while True:
        lines, end, longest = _cut_slice(src, offset, piece, settings.load_slice_bytes)
        last = end >= size
        try:
            n = _insert_responses(con, job, batch, book, state.utcnow(), str(piece), _object_size(longest),
                                  "bb_batch_sent")
        except duckdb.Error as e:
            state.rollback(con)
            piece.unlink(missing_ok=True)
            if state.is_out_of_memory(e):
                # What a slice needs beyond its width is the answers' checks: an output_schema's JSON
                # functions hold copies of the answers they parse (100,000 answers of ~800 bytes with a
                # 400-character field ran out of 96 MiB; 12,000 of ~1.6 KB need 128-144 MiB and load at
                # 192 MiB). The same slice again, with twice the limit (`room_for_loading`
                # restores it after the batch, and the job's next batch starts with it); past the cap,
                # or under a limit the user set, the command says which setting to raise.
                before = state.memory_limit(con)
                if state.grow_room(con, settings):
                    progress.step(f"job {job_name!r}, batch {batch_id}: a slice of its results needed more than "
                                  f"{before // 2**20} MiB; loading it with {state.memory_limit(con) // 2**20} MiB")
                    continue
                raise
            _reject_bad_file(con, [batch])
            raise ResultsError(f"job {job_name!r}: the result files could not be read: {e}") from e
        piece.unlink(missing_ok=True)
        try:
            if n != lines and _adopted(con, submission_id):
                state.rollback(con)
                _release_foreign(con, batch, lines, int(n), progress)
                return False
            if n != lines or (last and done + lines != expected):
                state.rollback(con)
                state.in_transaction(con, lambda: state.forget_loaded_slices(con, batch_id))
                raise ResultsError(
                    f"job {job_name!r}, batch {batch_id}: {done + n:,} result lines matched sent requests "
                    f"in its first {done + lines:,}, expected {expected:,} in all; nothing of it was loaded"
                )
            state.record_slice(con, batch_id, done + lines, end)
            if last:
                _finish_batch(con, job_name, batch_id, done + lines, progress)
                if fault:
                    fault("during_load")
            con.execute("COMMIT")
        except Exception:
            state.rollback(con)
            raise
        done, offset = done + lines, end
        ticked(lines)
        if last:
            break
        if fault:
            fault("between_slices")
    if fault:
        fault("after_load")
    return True


def _finish_batch(con: duckdb.DuckDBPyConnection, job_name: str, batch_id: str, answers: int,
                  progress: Progress) -> None:
    """In the last slice's transaction: warn of models without a price, mark the batch collected with
    its answers owed to the summaries."""
    unknown = con.execute(
        "SELECT DISTINCT model FROM bb_state.responses WHERE job = ? AND batch_id = ? "
        "AND model IS NOT NULL AND cost_usd IS NULL AND status IN ('succeeded', 'parse_failed') ORDER BY 1",
        [job_name, batch_id]).fetchall()
    for (m,) in unknown:
        progress.step(f"warning: no price for model {m!r}; its cost is reported as unknown (NULL)")
    state.mark_collected(con, batch_id)
    state.owe_outcomes(con, job_name, batch_id, answers)


def collect(
    client: anthropic.Anthropic, settings: Settings, jobs: dict[str, Job], *,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    fault: Callable[[str], None] | None = None,
) -> CollectReport:
    """Fetch every ended, uncollected batch and load it; never waits for running batches.

    Does not publish: the caller runs `results.publish` once when its command is done loading."""
    report = CollectReport()
    gone: list[str] = []
    unconfirmed: list[str] = []
    infos = refresh(client, settings, list(jobs), lost=gone, unconfirmed=unconfirmed, released=report.released)
    for bid in report.released:
        progress.step(RELEASED.format(batch_id=bid))
    report.refreshed = len(infos) + len(unconfirmed)
    report.ended = sum(1 for i in infos if results_ready(i))
    report.still_running = report.refreshed - report.ended
    report.downloaded, lost = download_ended(client, settings, infos, progress=progress, sleep=sleep, fault=fault,
                                             released=report.released)
    report.lost = gone + lost
    for bid in report.lost:
        progress.step(f"batch {bid} is lost (deleted, or results past the 29-day retention); "
                      "its rows are sent again by the next submit")
    report.loads = load_downloaded(settings, jobs, progress=progress, fault=fault)
    return report
