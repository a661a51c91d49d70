"""The results source dbt reads: Parquet files per job, written atomically, never a lock on anything.

`current.parquet` holds one row per key: the latest answer for the key's current input, or, when the
input changed and has no answer yet, the latest earlier answer flagged `is_stale`. `history.parquet`
holds every (key, answer) pair. Keys get their original names and types back from `jobs.key_types`;
schema fields become typed columns through `json_transform`. An identical request sent once for
several keys is attributed to the key that was sent (`cost_usd`), the others are `deduplicated`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from .config import Settings
from .jobs import Job, quote_ident, quote_literal
from .outputs import field_structures

COLUMNS_AFTER_KEYS = (
    "custom_id", "status", "output_text", "output_json", "stop_reason", "model", "input_tokens", "output_tokens",
    "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "deduplicated", "is_stale",
    "error_type", "error_message", "attempt", "batch_id", "request_custom_id", "input_hash",
    "submitted_at", "collected_at",
)


def _key_types(con: duckdb.DuckDBPyConnection, job: Job) -> list[tuple[str, str]]:
    row = con.execute("SELECT key_types FROM bb_state.jobs WHERE job = ?", [job.name]).fetchone()
    if row and row[0]:
        return [tuple(x) for x in json.loads(row[0])]
    return [(k, "VARCHAR") for k in job.key]


def history_sql(con: duckdb.DuckDBPyConnection, job: Job) -> str:
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
    job_lit = quote_literal(job.name)
    return f"""
        WITH versions AS (
            SELECT DISTINCT custom_id, input_hash FROM bb_state.key_versions WHERE job = {job_lit}
        ),
        latest AS (
            SELECT custom_id, arg_max(input_hash, seen_at) AS current_hash, arg_max(key_json, seen_at) AS key_json
            FROM bb_state.key_versions WHERE job = {job_lit} GROUP BY custom_id
        ),
        h AS (
            SELECT l.custom_id, l.key_json, l.current_hash, r.*
            FROM latest l
            JOIN versions v ON v.custom_id = l.custom_id
            JOIN bb_state.responses r ON r.job = {job_lit} AND r.input_hash = v.input_hash
        )
        SELECT {keys},
               h.custom_id, h.status, h.output_text, h.output_json{fields},
               h.stop_reason, h.model, h.input_tokens, h.output_tokens,
               h.cache_creation_input_tokens, h.cache_read_input_tokens,
               CASE WHEN h.request_custom_id = h.custom_id THEN h.cost_usd ELSE 0 END AS cost_usd,
               h.request_custom_id <> h.custom_id AS deduplicated,
               h.input_hash <> h.current_hash AS is_stale,
               h.error_type, h.error_message, h.attempt, h.batch_id, h.request_custom_id, h.input_hash,
               h.submitted_at, h.collected_at
        FROM h
    """


def current_sql(con: duckdb.DuckDBPyConnection, job: Job) -> str:
    return (
        f"SELECT * FROM ({history_sql(con, job)}) "
        "QUALIFY row_number() OVER (PARTITION BY custom_id ORDER BY is_stale, collected_at DESC, attempt DESC) = 1"
    )


def _write(con: duckdb.DuckDBPyConnection, query: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    con.execute(f"COPY ({query}) TO {quote_literal(str(tmp))} (FORMAT parquet)")
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)


def publish(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job) -> Path:
    """(Re)write the job's results files; an empty file with the right columns before any results."""
    out = settings.results_dir(job.name)
    out.mkdir(parents=True, exist_ok=True)
    _write(con, current_sql(con, job) + " ORDER BY custom_id", out / "current.parquet")
    _write(con, f"SELECT * FROM ({history_sql(con, job)}) ORDER BY custom_id, collected_at", out / "history.parquet")
    _write(
        con,
        f"SELECT key_json, reason, detail, seen_at FROM bb_state.rejections WHERE job = {quote_literal(job.name)} "
        "ORDER BY reason, key_json",
        out / "rejected.parquet",
    )
    return out / "current.parquet"
