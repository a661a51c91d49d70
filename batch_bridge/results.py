"""The results source dbt reads: Parquet files per job, written atomically, never a lock on anything.

`current.parquet` holds one row per key: the latest answer for the key's current input, or, when the
input changed and has no answer yet, the latest earlier answer flagged `is_stale`. `history/` holds
one part per collected batch with every (key, answer) pair it produced. Keys get their original names and types back from `jobs.key_types`;
schema fields become typed columns through `json_transform`. An identical request sent once for
several keys is attributed to the key that was sent (`cost_usd`), the others are `deduplicated`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from typing import get_args

import duckdb

from .config import Settings
from .jobs import Job, quote_ident, quote_literal
from .outputs import field_structures
from .state import ResultType, joins_as_written, room_for_rows, single_threaded

COLUMNS_AFTER_KEYS = (
    "custom_id", "status", "output_text", "output_json", "stop_reason", "model", "input_tokens", "output_tokens",
    "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "deduplicated", "is_stale",
    "error_type", "error_message", "attempt", "batch_id", "request_custom_id", "input_hash",
    "submitted_at", "collected_at", "lane",
)

# `status` values: the API's result types, and parse_failed (the answer did not match the schema).
RESULT_STATUSES = (*get_args(ResultType), "parse_failed")
# What each column after the keys says (the generated dbt source documents every column with these).
COLUMN_DOCS = {
    "custom_id": "The key's request id: the key itself when it fits the API's custom_id pattern, else a hash of it.",
    "status": "succeeded, errored, canceled, expired (the API's result types), or parse_failed (the answer did not match the job's schema).",
    "output_text": "The answer as text (a tool call's input as JSON text); NULL unless the model answered.",
    "output_json": "The answer as JSON, when it is valid JSON.",
    "stop_reason": "Why the model stopped: end_turn, max_tokens, tool_use, ...",
    "model": "The model that answered.",
    "input_tokens": "Input tokens billed, beyond the prompt cache.",
    "output_tokens": "Output tokens billed.",
    "cache_creation_input_tokens": "Input tokens written to the prompt cache.",
    "cache_read_input_tokens": "Input tokens read from the prompt cache.",
    "cost_usd": "What this request cost (batch prices in the batch lane, standard prices in the sync lane); 0 on a deduplicated row, NULL when the model's price is unknown.",
    "deduplicated": "True when another key's identical request was sent and its answer is shown here.",
    "is_stale": "True when the row's input changed after this answer: it answers an earlier version of the row.",
    "error_type": "The API's error type, for an errored request.",
    "error_message": "The API's error message, for an errored request.",
    "attempt": "Which send of this input gave the answer (1: the first).",
    "batch_id": "The Message Batch that answered (sync lane: the run of synchronous calls, msg_run_...).",
    "request_custom_id": "The custom_id the request went out under (another key's, when deduplicated).",
    "input_hash": "Hash of the request's fixed part and the row's prompt, as hex.",
    "submitted_at": "When the batch was submitted (UTC).",
    "collected_at": "When the bridge loaded the answer (UTC); the source's freshness field.",
    "lane": "How the answer came: batch (a Message Batch, half price) or sync (a synchronous Messages call, standard price).",
}


def _key_types(con: duckdb.DuckDBPyConnection, job: Job) -> list[tuple[str, str]]:
    row = con.execute("SELECT key_types FROM bb_state.jobs WHERE job = ?", [job.name]).fetchone()
    if row and row[0]:
        return [tuple(x) for x in json.loads(row[0])]
    return [(k, "VARCHAR") for k in job.key]


def _projection(con: duckdb.DuckDBPyConnection, job: Job) -> str:
    """Result columns over a relation `h` of (custom_id, key_json, current_hash, response columns...)."""
    keys = ", ".join(
        f"CAST(json_extract_string(h.key_json, '$[{i}]') AS {typ}) AS {quote_ident(name)}"
        for i, (name, typ) in enumerate(_key_types(con, job))
    )
    fields = ""
    schema = job.answer_schema
    if schema is not None and field_structures(schema):
        struct = json.dumps(field_structures(schema))
        fields = "".join(
            f", json_transform(h.output_json, {quote_literal(struct)}).{quote_ident(k)} AS {quote_ident(k)}"
            for k in field_structures(schema)
        )
    return f"""
        SELECT {keys},
               h.custom_id, h.status, h.output_text, h.output_json{fields},
               h.stop_reason, h.model, h.input_tokens, h.output_tokens,
               h.cache_creation_input_tokens, h.cache_read_input_tokens,
               CASE WHEN h.request_custom_id = h.custom_id THEN h.cost_usd ELSE 0 END AS cost_usd,
               h.request_custom_id <> h.custom_id AS deduplicated,
               h.input_hash <> h.current_hash AS is_stale,
               h.error_type, h.error_message, h.attempt, h.batch_id, h.request_custom_id,
               lpad(lower(hex(h.input_hash)), 32, '0') AS input_hash,
               h.submitted_at, h.collected_at, h.lane
    """


def history_sql(con: duckdb.DuckDBPyConnection, job: Job, batch_ids: list[str] | None = None) -> str:
    """Every (key, answer) pair, or only those of the given batches.

    For given batches, the keys are narrowed to those that had one of their inputs first, so a
    part costs time in proportion to its batch, not to every key of the job.
    """
    job_lit = quote_literal(job.name)
    only = ""
    if batch_ids is not None:
        only = " AND batch_id IN (" + (", ".join(quote_literal(b) for b in batch_ids) or "NULL") + ")"
    return _projection(con, job) + f"""
        FROM (
            WITH v AS (
                SELECT DISTINCT custom_id, input_hash FROM bb_state.key_versions
                WHERE job = {job_lit} AND input_hash IN (
                    SELECT input_hash FROM bb_state.responses WHERE job = {job_lit}{only})
            ),
            l AS (
                SELECT custom_id, arg_max(input_hash, seen_at) AS current_hash, arg_max(key_json, seen_at) AS key_json
                FROM bb_state.key_versions WHERE job = {job_lit} AND custom_id IN (SELECT custom_id FROM v)
                GROUP BY custom_id
            ),
            kv AS (SELECT l.custom_id, l.key_json, l.current_hash, v.input_hash FROM v JOIN l ON l.custom_id = v.custom_id)
            SELECT kv.custom_id, kv.key_json, kv.current_hash, r.*
            FROM (SELECT * FROM bb_state.responses WHERE job = {job_lit}{only}) r
            JOIN kv ON kv.input_hash = r.input_hash
        ) h
    """


def pick_current(con: duckdb.DuckDBPyConnection, job: Job) -> None:
    """`bb_picked`: one row per key with the rowid of the answer `current.parquet` shows for it: the
    latest answer for its current input, else its latest earlier answer (stale).

    Hash aggregates only (latest version per key, the rowid of the latest answer per input), no window
    over history and no row-sized aggregate state, so the cost grows with the number of keys. A table of
    its own, not a CTE of the COPY: in one statement the materialized CTEs, the hash table of the picks
    and the answers streaming past it did not fit 64MB for 150,000 keys; in two they do.
    """
    job_lit = quote_literal(job.name)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE bb_picked AS
            WITH latest AS (
                SELECT custom_id, arg_max(input_hash, seen_at) AS current_hash, arg_max(key_json, seen_at) AS key_json
                FROM bb_state.key_versions WHERE job = {job_lit} GROUP BY custom_id
            ),
            best AS (
                SELECT input_hash, arg_max(rowid, (collected_at, attempt)) AS rid, max(collected_at) AS at
                FROM bb_state.responses WHERE job = {job_lit} GROUP BY input_hash
            ),
            picked AS (
                SELECT l.custom_id, l.key_json, l.current_hash, b.rid
                FROM latest l JOIN best b ON b.input_hash = l.current_hash
                UNION ALL
                SELECT l.custom_id, l.key_json, l.current_hash, arg_max(b.rid, b.at)
                FROM latest l
                JOIN bb_state.key_versions v ON v.job = {job_lit} AND v.custom_id = l.custom_id
                     AND v.input_hash <> l.current_hash
                JOIN best b ON b.input_hash = v.input_hash
                WHERE l.current_hash NOT IN (SELECT input_hash FROM best)
                GROUP BY l.custom_id, l.key_json, l.current_hash
            )
            SELECT * FROM picked
    """)


def current_sql(con: duckdb.DuckDBPyConnection, job: Job) -> str:
    """One row per key (after `pick_current`): its picked answer, answer text streaming past the picks."""
    return _projection(con, job) + """
        FROM (
            SELECT p.custom_id, p.key_json, p.current_hash, r.*
            FROM bb_state.responses r JOIN bb_picked p ON r.rowid = p.rid
        ) h
    """


# Rows per Parquet row group. The writer holds one group in memory, so DuckDB's default of 122,880 rows
# of answer text costs tens of MB per file being written; 16,384 keeps that small and still lets
# readers skip groups by min/max.
ROW_GROUP_ROWS = 16_384
# ... and at most this many bytes: 16,384 answers of 6 KB made a 100 MB column chunk, one allocation
# larger than a 128MB memory_limit leaves (measured). Needs preserve_insertion_order = false (state._configure).
ROW_GROUP_BYTES = 8 * 1024 * 1024
PARQUET = f"FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS}, ROW_GROUP_SIZE_BYTES {ROW_GROUP_BYTES}"


def _write(con: duckdb.DuckDBPyConnection, query: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    con.execute(f"COPY ({query}) TO {quote_literal(str(tmp))} ({PARQUET})")
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)


def _unpublished_batches(con: duckdb.DuckDBPyConnection, job: Job, parts: Path) -> list[str]:
    """Collected batches of the job without a history part: this command's, and those of a command
    killed between its load's COMMIT and its publish (so a crash never loses a history part)."""
    have = {p.stem for p in parts.glob("*.parquet")}
    rows = con.execute(
        "SELECT batch_id FROM bb_state.batches WHERE job = ? AND local_state = 'collected' ORDER BY batch_id",
        [job.name]).fetchall()
    return [r[0] for r in rows if r[0] not in have]


def publish(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job) -> Path:
    """(Re)write the job's current results and rejections, and the history part of every collected
    batch that has none yet. Called once at the end of each command that loads or submits.

    History is append-only: one part per collected batch (`history/<batch_id>.parquet`) plus an empty
    `history/_schema.parquet`, so `read_parquet('.../history/*.parquet')` always resolves and a collect
    costs time in proportion to what it loaded, not to everything ever collected. `current.parquet` is
    written before the parts, so a part that is missing always means a publish is still owed.
    """
    # Writing Parquet is I/O, and its row-group buffers are per thread; answers (the wide rows) are
    # streamed past hash tables built from keys and hashes, never built into one (joins_as_written).
    with single_threaded(con), joins_as_written(con), room_for_rows(con, settings, _answer_bytes(con, job)):
        return _publish(con, settings, job)


def _answer_bytes(con: duckdb.DuckDBPyConnection, job: Job) -> float:
    """The mean result-line width of the job's widest collected batch: how wide the rows published are."""
    (width,) = con.execute(
        "SELECT max(result_bytes / result_lines) FROM bb_state.batches "
        "WHERE job = ? AND local_state = 'collected' AND result_lines > 0", [job.name]).fetchone()
    return float(width or 0)


def _publish(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job) -> Path:
    out = settings.results_dir(job.name)
    parts = out / "history"
    parts.mkdir(parents=True, exist_ok=True)
    todo = _unpublished_batches(con, job, parts)
    pick_current(con, job)
    _write(con, current_sql(con, job), out / "current.parquet")  # unordered: sorting 1M wide rows costs seconds
    con.execute("DROP TABLE bb_picked")
    _write(
        con,
        f"SELECT key_json, reason, detail, seen_at FROM bb_state.rejections WHERE job = {quote_literal(job.name)} "
        "ORDER BY reason, key_json",
        out / "rejected.parquet",
    )
    _write(con, history_sql(con, job, []), parts / "_schema.parquet")  # the job's columns may have changed
    # One COPY per part: a COPY partitioned by batch held a row group per open part (11 parts of a 1M-row
    # run: 88 MB of buffers), and per batch is faster too (BENCHMARKS.md).
    for b in todo:
        _write(con, history_sql(con, job, [b]), parts / f"{b}.parquet")
    shutil.rmtree(parts / ".incoming", ignore_errors=True)  # left by a partitioned COPY of older versions
    return out / "current.parquet"
