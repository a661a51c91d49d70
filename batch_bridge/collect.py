"""Ended batches -> result files -> the `responses` table -> the published results source.

Each batch's results are streamed to `results/raw/<batch_id>.jsonl` (a `.part` file renamed when
complete) and its line count checked against `request_counts`, so a stream cut short is retried,
never loaded. Loading is one `INSERT ... SELECT` over DuckDB's own `read_json` of every downloaded
file, in the same transaction that marks the batches `collected`: a crash mid-load loads nothing,
and a rerun loads exactly once. A file with a line that is not JSON is named (file and line), loads
nothing, and is forgotten so that the next collect downloads it again.

A 404 on a batch is the API's propagation delay only while the batch is young and has never been
seen `ended`; otherwise the batch was deleted and is marked `lost` (its rows are sent again), as is
a batch whose `archived_at` is set (results are kept 29 days).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import anthropic
import duckdb

from . import api, state
from .config import Settings
from .errors import ApiError, ResultsError
from .jobs import Job, quote_literal
from .outputs import valid_sql
from .pricing import cost_sql, load_prices, register_model_map, register_prices
from .progress import Progress, Silent
from .results import publish

# A 404 for a batch younger than this is the API's propagation delay, not a deleted batch.
TRANSIENT_404 = timedelta(minutes=10)
DOWNLOAD_TRIES = 3
BATCH_COLUMNS = (
    "processing_status", "processing", "succeeded", "errored", "canceled", "expired",
    "created_at", "expires_at", "ended_at", "cancel_initiated_at", "archived_at", "results_url",
)


@dataclass
class CollectReport:
    refreshed: int = 0
    ended: int = 0
    downloaded: list[str] = field(default_factory=list)
    loaded: dict[str, int] = field(default_factory=dict)  # job -> result lines loaded
    lost: list[str] = field(default_factory=list)
    still_running: int = 0


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
            "FROM bb_state.batches WHERE local_state IN ('submitted', 'downloaded') ORDER BY created_at"
        ).fetchall()
    cols = ["batch_id", "job", "processing_status", "created_at", "archived_at", "request_count", "local_state",
            "ended_at"]
    return [dict(zip(cols, r)) for r in rows if jobs is None or r[1] in jobs]


def refresh(
    client: anthropic.Anthropic, settings: Settings, jobs: list[str] | None = None, *,
    lost: list[str] | None = None, unconfirmed: list[str] | None = None,
) -> list[api.BatchInfo]:
    """Retrieve every batch not yet collected; record its status. Deleted batches are marked lost.

    Ids of batches marked lost are appended to `lost`; ids of young batches that answered 404 (the
    API's propagation delay) to `unconfirmed`: they are still in flight."""
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
                state.mark_lost(con, b["batch_id"], "the API no longer knows this batch (deleted); "
                                "its rows are sent again by the next submit")
            if lost is not None:
                lost.append(b["batch_id"])
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


def download_ended(
    client: anthropic.Anthropic, settings: Settings, infos: list[api.BatchInfo], *,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    fault: Callable[[str], None] | None = None,
) -> tuple[list[str], list[str]]:
    """Download every ended batch in `infos` (concurrently). Returns (downloaded ids, lost ids)."""
    ended = [i for i in infos if i.processing_status == "ended"]
    downloaded, lost = [], []
    todo = []
    for info in ended:
        # The API sets archived_at once the results are gone; its clock, not ours, decides.
        if info.archived_at is not None:
            with state.connect(settings) as con:
                state.mark_lost(con, info.id, f"results archived at {info.archived_at.isoformat()}Z (29-day retention)")
            lost.append(info.id)
        else:
            todo.append(info)
    if not todo:
        return downloaded, lost
    settings.raw_results_dir.mkdir(parents=True, exist_ok=True)
    errors: list[Exception] = []
    with ThreadPoolExecutor(max_workers=min(settings.concurrency, len(todo))) as pool:
        futures = {pool.submit(_download_one, client, settings, i, sleep, fault): i for i in todo}
        for n, (fut, info) in enumerate(futures.items(), 1):
            try:
                path, lines = fut.result()
            except api.NotFound:
                with state.connect(settings) as con:
                    state.mark_lost(con, info.id, "results are no longer available (404)")
                lost.append(info.id)
                continue
            except (ResultsError, ApiError) as e:
                errors.append(e)
                continue
            if fault:
                fault("after_download")
            with state.connect(settings) as con:
                state.mark_downloaded(con, info.id, path, lines)
            downloaded.append(info.id)
            progress.tick("batches downloaded", n, len(todo))
    if errors and not downloaded:
        raise errors[0]
    return downloaded, lost


def _extract_sql(job: Job) -> str:
    """Columns of one response row from a raw result line (`custom_id`, `result` JSON)."""
    text = (
        "array_to_string(list_filter(CAST(json_extract_string(result, '$.message.content[*].text') AS VARCHAR[]), "
        "lambda t: t IS NOT NULL), '')"
    )
    tool_input = (
        "list_filter(json_extract(result, '$.message.content[*]'), lambda b: b->>'type' = 'tool_use')[1]->'input'"
    )
    if job.output_tool is not None:
        output_text = f"CAST({tool_input} AS VARCHAR)"
    else:
        output_text = text
    schema = job.answer_schema
    if schema is not None:
        output_json = "CASE WHEN json_valid(x0.output_text) THEN json(x0.output_text) END"
        ok = valid_sql(schema, "x.output_json")
        status = f"CASE WHEN x.type = 'succeeded' AND NOT coalesce(x.output_json IS NOT NULL AND {ok}, false) THEN 'parse_failed' ELSE x.type END"
    else:
        output_json = "NULL::JSON"
        status = "x.type"
    return f"""
        WITH x0 AS (
            SELECT f.batch_id, f.submission_id, raw.custom_id, raw.result,
                   raw.result->>'$.type' AS type,
                   CASE WHEN raw.result->>'$.type' = 'succeeded' THEN {output_text} END AS output_text
            FROM raw JOIN bb_files f ON f.file = raw.filename
            WHERE raw.custom_id IS NOT NULL
        ),
        x AS (SELECT *, {output_json} AS output_json FROM x0),
        y AS (
            SELECT x.batch_id, x.custom_id AS request_custom_id, sr.input_hash, sr.attempt,
                   {status} AS status,
                   x.output_text, x.output_json,
                   result->>'$.message.stop_reason' AS stop_reason,
                   result->>'$.message.model' AS model,
                   CAST(result->>'$.message.usage.input_tokens' AS BIGINT) AS input_tokens,
                   CAST(result->>'$.message.usage.output_tokens' AS BIGINT) AS output_tokens,
                   CAST(result->>'$.message.usage.cache_creation_input_tokens' AS BIGINT) AS cache_creation_input_tokens,
                   CAST(result->>'$.message.usage.cache_read_input_tokens' AS BIGINT) AS cache_read_input_tokens,
                   coalesce(CAST(result->>'$.message.usage.cache_creation.ephemeral_5m_input_tokens' AS BIGINT),
                            CAST(result->>'$.message.usage.cache_creation_input_tokens' AS BIGINT)
                              - coalesce(CAST(result->>'$.message.usage.cache_creation.ephemeral_1h_input_tokens' AS BIGINT), 0)
                   ) AS cache_creation_5m,
                   coalesce(CAST(result->>'$.message.usage.cache_creation.ephemeral_1h_input_tokens' AS BIGINT), 0) AS cache_creation_1h,
                   result->>'$.error.error.type' AS error_type,
                   result->>'$.error.error.message' AS error_message,
                   su.create_started_at AS submitted_at
            FROM x
            JOIN bb_state.sent_requests sr ON sr.submission_id = x.submission_id AND sr.request_custom_id = x.custom_id
            JOIN bb_state.submissions su ON su.submission_id = x.submission_id
        )
    """


def _first_bad_line(path: str) -> tuple[int, str] | None:
    """(line number, why) of the first line of a result file that is not a JSON object with a custom_id."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except ValueError as e:
                return n, f"not valid JSON ({e})"
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or "result" not in obj:
                return n, "not a result object with custom_id and result"
    return None


def _reject_bad_file(con: duckdb.DuckDBPyConnection, batches: list[tuple]) -> None:
    """Name the file and line that made read_json fail; forget that download so it is fetched again."""
    for b in batches:
        path = b[3]
        bad = _first_bad_line(path) if Path(path).is_file() else (0, "the file is missing")
        if bad is None:
            continue
        line, why = bad
        where = f"line {line}" if line else "file"
        state.discard_download(con, b[0], f"result {where}: {why}; downloaded again by the next collect")
        Path(path).unlink(missing_ok=True)
        raise ResultsError(
            f"results of batch {b[0]} ({path}), {where}: {why}; nothing of job {b[1]!r} was loaded",
            hint="the file was removed; the next `batch-bridge collect` downloads it again",
        )


def load_downloaded(
    settings: Settings, jobs: dict[str, Job], *, progress: Progress = Silent(),
    fault: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Load every downloaded batch into `responses`, set-wise, and mark it collected (one transaction per job)."""
    loaded: dict[str, int] = {}
    book = load_prices(settings.prices_file)
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT batch_id, job, submission_id, result_file, result_lines FROM bb_state.batches "
            "WHERE local_state = 'downloaded' ORDER BY job, batch_id"
        ).fetchall()
        by_job: dict[str, list[tuple]] = {}
        for r in rows:
            by_job.setdefault(r[1], []).append(r)
        register_prices(con, book)
        for job_name, batches in by_job.items():
            job = jobs.get(job_name)
            if job is None:
                continue  # the job was removed from the project; its files stay until it returns
            con.execute("CREATE OR REPLACE TEMP TABLE bb_files (batch_id VARCHAR, submission_id VARCHAR, file VARCHAR)")
            con.executemany("INSERT INTO bb_files VALUES (?, ?, ?)", [(b[0], b[2], b[3]) for b in batches])
            files = "[" + ", ".join(quote_literal(b[3]) for b in batches) + "]"
            now = state.utcnow()
            try:  # parsed into a temp table before the transaction: a bad file changes no state
                con.execute(
                    f"""CREATE OR REPLACE TEMP VIEW raw AS SELECT * FROM read_json({files},
                        format = 'newline_delimited', columns = {{custom_id: 'VARCHAR', result: 'JSON'}},
                        filename = true, maximum_object_size = 268435456)"""
                )
                con.execute(f"CREATE OR REPLACE TEMP TABLE bb_new AS {_extract_sql(job)} SELECT * FROM y")
            except duckdb.Error as e:
                _reject_bad_file(con, batches)
                raise ResultsError(f"job {job_name!r}: the result files could not be read: {e}") from e
            con.execute("BEGIN")
            try:
                models = [r[0] for r in con.execute("SELECT DISTINCT model FROM bb_new WHERE model IS NOT NULL").fetchall()]
                unknown = register_model_map(con, book, models)
                for m in unknown:
                    progress.step(f"warning: no price for model {m!r}; its cost is reported as unknown (NULL)")
                n = con.execute(
                    f"""
                    INSERT INTO bb_state.responses
                    SELECT $job, r.batch_id, r.request_custom_id, r.input_hash, r.attempt, r.status,
                           r.output_text, r.output_json, r.stop_reason, r.model,
                           r.input_tokens, r.output_tokens, r.cache_creation_input_tokens, r.cache_read_input_tokens,
                           r.cache_creation_5m, r.cache_creation_1h,
                           CASE WHEN p.model IS NULL AND r.status IN ('succeeded', 'parse_failed') THEN NULL
                                ELSE {cost_sql('r', 'p')} END,
                           r.error_type, r.error_message, r.submitted_at, $now
                    FROM bb_new r
                    LEFT JOIN bb_model_price mp ON mp.model = r.model
                    LEFT JOIN bb_prices p ON p.model = mp.price_model
                    """,
                    {"job": job_name, "now": now},
                ).fetchone()[0]
                expected = sum(b[4] or 0 for b in batches)
                if n != expected:
                    raise ResultsError(
                        f"job {job_name!r}: {n:,} result lines matched sent requests, expected {expected:,}; "
                        "nothing was loaded"
                    )
                for b in batches:
                    state.mark_collected(con, b[0])
                if fault:
                    fault("during_load")
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            loaded[job_name] = int(n)
            progress.tick("results loaded", int(n), expected)
            if fault:
                fault("after_load")
        for job in jobs.values():
            # History parts of every collected batch that has none yet: this run's, and those of a run
            # killed between its COMMIT and here (so a crash never loses a history part).
            parts = settings.results_dir(job.name) / "history"
            collected = [r[0] for r in con.execute(
                "SELECT batch_id FROM bb_state.batches WHERE job = ? AND local_state = 'collected' ORDER BY batch_id",
                [job.name]).fetchall()]
            publish(con, settings, job, [b for b in collected if not (parts / f"{b}.parquet").exists()])
    return loaded


def collect(
    client: anthropic.Anthropic, settings: Settings, jobs: dict[str, Job], *,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    fault: Callable[[str], None] | None = None,
) -> CollectReport:
    """Fetch every ended, uncollected batch and load it; never waits for running batches."""
    report = CollectReport()
    gone: list[str] = []
    unconfirmed: list[str] = []
    infos = refresh(client, settings, list(jobs), lost=gone, unconfirmed=unconfirmed)
    report.refreshed = len(infos) + len(unconfirmed)
    report.ended = sum(1 for i in infos if i.processing_status == "ended")
    report.still_running = report.refreshed - report.ended
    report.downloaded, lost = download_ended(client, settings, infos, progress=progress, sleep=sleep, fault=fault)
    report.lost = gone + lost
    for bid in report.lost:
        progress.step(f"batch {bid} is lost (deleted, or results past the 29-day retention); "
                      "its rows are sent again by the next submit")
    report.loaded = load_downloaded(settings, jobs, progress=progress, fault=fault)
    return report
