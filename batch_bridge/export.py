"""Staging rows -> what to send: custom_ids, input hashes, dispositions and request files, all set-wise.

Four steps, none of which holds prompt text for every row in memory:
1. `stage`: read the staging relation (warehouse ATTACHed read-only). A first scan takes each row's
   custom_id and a cheap 64-bit fingerprint of its prompt, and looks the pair up in `key_inputs`:
   a key whose prompt is unchanged since its input was answered is up to date without hashing its
   prompt again. A second read (a table's by rowid, so DuckDB reads just those rows) builds the
   narrow temp table `bb_staged` only for the other rows (changed or new keys, NULL or duplicate
   keys): key columns, custom_id, input_hash (md5_number of the static request part and the
   prompt), prompt size (also as JSON, which is what its request line will carry) and emptiness.
   No prompt text, and no key JSON (built later, only for rows whose key is stored). A view's rows
   have no rowid: those read again (by key values) are copied into a temp table, whose rowids the
   later steps use.
2. `classify`: join those rows with `input_outcomes` (what the answers so far say of each input) and
   the submissions in flight to give each row one disposition (send, up_to_date, in_flight, or a
   reason for not sending it).
3. `measure`: number the requests to send and cut them into batches that respect both caps, by
   line sizes summed from the staged sizes (no line is built, the staging relation is not read).
4. `write_requests`: only for rows to send, build each request line in SQL
   (`prefix || to_json(prompt) || suffix`) and let DuckDB write each batch file in one COPY.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

import duckdb

from .config import Settings
from .errors import JobDefinitionError, WarehouseError, WarehouseLocked
from .jobs import Job, quote_ident, quote_literal, template_columns
from .state import VECTOR_ROWS, joins_as_written, single_threaded, wait_for_lock

# Dispositions of a staged row. "send" goes out; the others are counted, and the "not sendable"
# ones are recorded in `rejections` with their reason so that nothing is silently dropped.
SEND = "send"
UP_TO_DATE = "up_to_date"
IN_FLIGHT = "in_flight"
REJECTED_REASONS = {
    "null_key": "a key column is NULL",
    "duplicate_key": "the key appears on more than one row (none of them is sent)",
    "empty_prompt": "the prompt is NULL or blank",
    "too_large": "the request is larger than a batch may be",
    "too_long": "the prompt is longer than the model's context window (max_input_tokens)",
    "invalid_request": "the API answered invalid_request_error for this exact input; change the input or job",
    "attempts_exhausted": "retryable failures reached max_attempts for this input",
    "parse_failed": "the answer did not match the output schema (retry_parse_failed is false)",
    "create_rejected": "the API rejected the batch holding this input for good (its message is the detail); "
                       "change the rows or the job and the next run sends them",
}
CUSTOM_ID_PATTERN = "[a-zA-Z0-9_-]{1,64}"
ENCODED_PREFIX = "bbk-"
BODY_OVERHEAD = len(b'{"requests":[') + len(b"]}")
# DuckDB's hash() may change between versions; fingerprints taken by another version are not used.
HASH_VERSION = duckdb.__version__
FINGERPRINT_SHIFT = "bbfp"  # 4 bytes: the second hash sees every byte at another offset in its 8-byte block


@dataclass
class Chunk:
    """One future batch: a range of request rows."""

    index: int
    first: int
    last: int
    requests: int
    body_bytes: int


@dataclass(frozen=True)
class InputLimit:
    """The model's context window and how a row's input tokens are counted, as SQL over a `bb_staged`
    row `s` (`estimate.input_tokens_sql`: the calibrated rule). A counter that asks the API
    (count_tokens) plugs in here with SQL that reads its counts, e.g. from a temp table it filled
    for the rows the rule puts near the limit."""

    max_input_tokens: int
    tokens_sql: str


@dataclass
class JobPlan:
    job: Job
    staged: int = 0
    dispositions: dict[str, int] = field(default_factory=dict)
    send_keys: int = 0
    send_requests: int = 0
    prompt_bytes: int = 0  # of the requests to send
    prompt_chars: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    lane: str = "batch"  # where this run's requests go (lanes.route): batch | sync
    lane_why: str = ""
    preflight: dict | None = None  # what the preflight found (preflight.JobPreflight.to_json)

    @property
    def deduplicated(self) -> int:
        return self.send_keys - self.send_requests

    @property
    def body_bytes(self) -> int:
        return sum(c.body_bytes for c in self.chunks)

    @property
    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in self.dispositions.items() if k in REJECTED_REASONS}


@contextmanager
def warehouse_attached(
    con: duckdb.DuckDBPyConnection, settings: Settings, catalog: str, *, sleep: Callable[[float], None] = time.sleep
) -> Iterator[None]:
    """ATTACH the warehouse read-only under dbt's catalog name (views refer to it), then DETACH.

    The catalog decides the file: a staging model built into a database the profile attaches
    (`attach:` with `database: <alias>` on the model) is read from that database's file."""
    location = settings.database_location(catalog)
    if isinstance(location, Path) and not location.exists():
        raise WarehouseError(
            f"the warehouse {location} does not exist (target {settings.target!r} of "
            f"{settings.profiles_dir / 'profiles.yml'}, or BATCH_BRIDGE_WAREHOUSE when set)",
            hint="run `dbt build` (or `batch-bridge pipeline`) first, or set BATCH_BRIDGE_WAREHOUSE",
        )
    if catalog in {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}:
        raise WarehouseError(f"the warehouse catalog name {catalog!r} clashes with the bridge's own files")
    wait_for_lock(
        lambda: con.execute(f"ATTACH {quote_literal(str(location))} AS {quote_ident(catalog)} (READ_ONLY)"),
        timeout=settings.lock_timeout, sleep=sleep, first_delay=0.1, max_delay=2.0,
        failed=lambda e: WarehouseError(f"cannot open the warehouse {location}: {e}"),
        locked=lambda: WarehouseLocked(
            f"the warehouse {location} is held by another process (is dbt running?)",
            hint="the bridge reads the warehouse between dbt runs; run it after `dbt build` "
            f"finishes (waited {settings.lock_timeout:g}s, BATCH_BRIDGE_LOCK_TIMEOUT)",
        ),
    )
    try:
        yield
    finally:
        con.execute(f"DETACH {quote_ident(catalog)}")


# How a plan reaches the staging relations of one warehouse catalog: the bridge's state connection,
# the catalog name, the jobs read from it. The CLI ATTACHes the file read-only (`warehouse_attached`);
# inside dbt, which holds the file, the rows come through dbt's own connection (`read_through`).
WarehouseAccess = Callable[[duckdb.DuckDBPyConnection, Settings, str, list[Job]], ContextManager[None]]


def read_through(source: duckdb.DuckDBPyConnection) -> WarehouseAccess:
    """Warehouse access for a process that holds the warehouse already (dbt running the plugin).

    DuckDB refuses a second open of a file held read-write, even by the same process in another
    configuration, so the bridge never opens it: each job's key and prompt columns are streamed as
    Arrow from `source` (a cursor on dbt's connection) into a table of the same name and column types
    in an in-memory catalog of the state connection. Planning then runs the CLI's SQL unchanged, and
    the same types give the same custom_ids and input hashes as the CLI's plan of the same rows."""

    @contextmanager
    def copied(con: duckdb.DuckDBPyConnection, settings: Settings, catalog: str, jobs: list[Job]) -> Iterator[None]:
        if catalog in {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}:
            raise WarehouseError(f"the warehouse catalog name {catalog!r} clashes with the bridge's own files")
        con.execute(f"ATTACH ':memory:' AS {quote_ident(catalog)}")
        try:
            for job in jobs:
                _copy_relation(source, con, job)
            yield
        finally:
            con.execute(f"DETACH {quote_ident(catalog)}")

    return copied


def _row_columns(job: Job) -> set[str]:
    """The staging columns a plan reads: the key columns and the prompt column or template's columns."""
    return set(job.key) | ({job.prompt_column} if job.prompt_column else set(template_columns(job.prompt_template or "")))


def _copy_relation(source: duckdb.DuckDBPyConnection, con: duckdb.DuckDBPyConnection, job: Job) -> None:
    columns = relation_columns(source, job)
    _check_columns(job, columns)
    wanted = _row_columns(job)
    keep = [(c, t) for c, t in columns.items() if c in wanted]
    rel = job.relation
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(rel.database)}.{quote_ident(rel.schema)}")
    con.execute(f"CREATE OR REPLACE TABLE {rel.sql()} ({', '.join(f'{quote_ident(c)} {t}' for c, t in keep)})")
    names = ", ".join(quote_ident(c) for c, _ in keep)
    # Small Arrow batches: the copy then spills past the state connection's memory_limit as it fills
    # (300,000 prompts of 1 KB copied at 311 MB peak RSS in batches of 4,096 rows, 497 MB in 65,536).
    reader = source.sql(f"SELECT {names} FROM {rel.sql()}").to_arrow_reader(2 * VECTOR_ROWS)
    con.register("bb_warehouse_rows", reader)
    try:
        con.execute(f"INSERT INTO {rel.sql()} SELECT * FROM bb_warehouse_rows")
    finally:
        con.unregister("bb_warehouse_rows")


def relation_columns(con: duckdb.DuckDBPyConnection, job: Job) -> dict[str, str]:
    """Column name -> DuckDB type of the staging relation; a clear error when it is missing."""
    rel = job.relation
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = ? AND table_name = ? ORDER BY column_index",
        [rel.database, rel.schema, rel.identifier],
    ).fetchall()
    if not rows:
        raise WarehouseError(
            f"job {job.name!r}: the staging relation {rel.sql()} does not exist in {rel.database!r}",
            hint=f"build it first: dbt build --select {job.node.split('.')[-1]}",
        )
    return {name: typ for name, typ in rows}


def _check_columns(job: Job, columns: dict[str, str]) -> None:
    have = ", ".join(columns)
    for k in job.key:
        if k not in columns:
            raise JobDefinitionError(job.name, "key", k, f"columns of {job.relation.identifier}: {have}")
    if job.prompt_column and job.prompt_column not in columns:
        raise JobDefinitionError(job.name, "prompt_column", job.prompt_column, f"columns of {job.relation.identifier}: {have}")
    for c in template_columns(job.prompt_template or ""):
        if c not in columns:
            raise JobDefinitionError(
                job.name, "prompt_template", "{" + c + "}", f"placeholders naming columns of {job.relation.identifier}: {have}"
            )


def prompt_sql(job: Job, alias: str = "s") -> str:
    """SQL text of the row's prompt."""
    if job.prompt_column:
        return f"CAST({alias}.{quote_ident(job.prompt_column)} AS VARCHAR)"
    parts: list[str] = []
    pos = 0
    template = job.prompt_template or ""
    import re

    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_ ]*)\}", template):
        if m.start() > pos:
            parts.append(quote_literal(template[pos : m.start()]))
        parts.append(f"coalesce(CAST({alias}.{quote_ident(m.group(1))} AS VARCHAR), '')")
        pos = m.end()
    if pos < len(template):
        parts.append(quote_literal(template[pos:]))
    return "(" + " || ".join(parts) + ")"


def empty_prompt_sql(job: Job, alias: str = "s", prompt: str | None = None) -> str:
    """True when the prompt is NULL or only whitespace (for a template: every placeholder is).

    `trim()` strips spaces only, and `trim(x, chars)` is ~15x slower than RE2 on long text.
    """
    if job.prompt_column:
        p = prompt or prompt_sql(job, alias)
        return f"({p} IS NULL OR regexp_full_match({p}, '\\s*'))"
    cols = template_columns(job.prompt_template or "")
    return "(" + " AND ".join(
        f"regexp_full_match(coalesce(CAST({alias}.{quote_ident(c)} AS VARCHAR), ''), '\\s*')" for c in cols
    ) + ")"


# Key types whose every value's text already is a valid custom_id (digits and '-', at most 40 characters;
# a UUID's 36 hex digits and dashes) and never starts with ENCODED_PREFIX: the pattern need not be matched
# per row (an RE2 match cost ~0.2 s of CPU per 5M keys).
VALID_AS_TEXT_TYPES = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                                 "UINTEGER", "UBIGINT", "UHUGEINT", "UUID"})


def custom_id_sql(job: Job, alias: str = "s", key_types: dict[str, str] | None = None) -> str:
    """SQL of the row's custom_id: a single key's text where it matches CUSTOM_ID_PATTERN (and does not
    start with ENCODED_PREFIX), else ENCODED_PREFIX and 40 hex digits of the SHA-256 of the key values'
    JSON; NULL when a key value is. With the key columns' types, a key of a type in VALID_AS_TEXT_TYPES
    is its text, unchecked (the same custom_id)."""
    keys = [f"{alias}.{quote_ident(k)}" for k in job.key]
    any_null = " OR ".join(f"{k} IS NULL" for k in keys)
    key_json = f"CAST(json_array({', '.join(keys)}) AS VARCHAR)"
    encoded = f"'{ENCODED_PREFIX}' || left(sha256({key_json}), 40)"
    if len(keys) == 1:
        txt = f"CAST({keys[0]} AS VARCHAR)"
        if key_types and key_types.get(job.key[0]) in VALID_AS_TEXT_TYPES:
            return txt
        return (
            f"CASE WHEN {any_null} THEN NULL "
            f"WHEN regexp_full_match({txt}, '{CUSTOM_ID_PATTERN}') AND NOT starts_with({txt}, '{ENCODED_PREFIX}') "
            f"THEN {txt} ELSE {encoded} END"
        )
    return f"CASE WHEN {any_null} THEN NULL ELSE {encoded} END"


def key_json_sql(job: Job, alias: str = "c") -> str:
    """The key values as a JSON array, computed only where a row's key must be stored."""
    return f"CAST(json_array({', '.join(f'{alias}.{quote_ident(k)}' for k in job.key)}) AS VARCHAR)"


def fingerprint_sql(prompt: str) -> str:
    """A 64-bit fingerprint of the prompt text, ~15x cheaper than its md5: DuckDB's hash() of the text
    XOR its hash() shifted by four bytes. Used only together with the key and the byte length, to
    recognise a key's unchanged prompt (docs/DESIGN.md, "Unchanged prompts are not hashed again")."""
    return f"hash({prompt}, {quote_literal(FINGERPRINT_SHIFT)} || {prompt})"


def is_table(con: duckdb.DuckDBPyConnection, job: Job) -> bool:
    """Whether the staging relation is a table, whose rows can be found again by rowid (a view's cannot)."""
    rel = job.relation
    return bool(con.execute(
        "SELECT count(*) > 0 FROM duckdb_tables() WHERE database_name = ? AND schema_name = ? AND table_name = ?",
        [rel.database, rel.schema, rel.identifier],
    ).fetchone()[0])


def rows_copy(job: Job) -> str:
    """The temp table a plan reads the rows of a job staged by a view from (`stage` fills it)."""
    return "bb_rows_" + hashlib.md5(job.name.encode()).hexdigest()[:12]


def rows_source(con: duckdb.DuckDBPyConnection, job: Job) -> str:
    """The relation a plan reads the job's staging rows from, each found again by its rowid: the staging
    table itself, or the copy `stage` made of a view's rows."""
    copy = rows_copy(job)
    copied = con.execute(
        "SELECT count(*) > 0 FROM duckdb_tables() WHERE temporary AND table_name = ?", [copy]
    ).fetchone()[0]
    return copy if copied else job.relation.sql()


def release_rows(con: duckdb.DuckDBPyConnection, job: Job) -> None:
    """Drop the copy of a view's rows once the job's request files are written (it holds every prompt)."""
    con.execute(f"DROP TABLE IF EXISTS temp.main.{rows_copy(job)}")


def _copy_view_rows(con: duckdb.DuckDBPyConnection, job: Job, columns: dict[str, str], where: str = "") -> str:
    """The rows of a job's view (those `where`, over the view as `s`, selects) copied into a temp table,
    key and prompt columns only; returns the copy's name.

    A view has no rowid, so its rows could only be found again by key values, in a scan of the whole
    view per statement, and a batch's keys (a range in key order) are spread over all of a view whose
    rows are not stored in key order: the request files, one such scan per batch, were quadratic in rows
    (3M rows in 31 batches: 22.6 s against 8.8 s for the same rows as a table). The rows `stage` hashes
    are copied as they are read, and every later step reads the copy by rowid, as it reads a table; what
    was hashed is then what is written, even when the view's query is not deterministic. The copy spills
    to the bridge's temp directory beyond the plan's memory limit."""
    wanted = _row_columns(job)
    names = ", ".join(f"s.{quote_ident(c)}" for c in columns if c in wanted)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {rows_copy(job)} AS SELECT {names} FROM {job.relation.sql()} AS s {where}")
    return rows_copy(job)


def _staged_select(job: Job, source: str, key_types: dict[str, str]) -> str:
    """Rows of `source` (the staging relation, or part of it, with a `bb_rowid` column) with custom_id,
    input hash, size and emptiness; no prompt text."""
    keys = ", ".join(f"s.{quote_ident(k)}" for k in job.key)
    names = ", ".join(quote_ident(k) for k in job.key)
    empty = empty_prompt_sql(job, prompt=prompt_sql(job)) if job.prompt_column else empty_prompt_sql(job)
    return f"""
        SELECT {names}, bb_rowid, custom_id, custom_id IS NULL AS key_null, prompt_empty,
               CASE WHEN NOT prompt_empty THEN md5_number({quote_literal(job.static_hash)} || bb_prompt) END AS input_hash,
               coalesce(strlen(bb_prompt), 0) AS prompt_bytes,
               CASE WHEN NOT prompt_empty THEN length(bb_prompt) END AS prompt_chars,
               CASE WHEN NOT prompt_empty THEN strlen(CAST(to_json(bb_prompt) AS VARCHAR)) END AS json_bytes,
               CASE WHEN NOT prompt_empty THEN {fingerprint_sql('bb_prompt')} END AS fingerprint
        FROM (
            SELECT {keys}, s.bb_rowid, {prompt_sql(job)} AS bb_prompt, {custom_id_sql(job, key_types=key_types)} AS custom_id, {empty} AS prompt_empty
            FROM {source} AS s
        )
    """


def stage(con: duckdb.DuckDBPyConnection, job: Job) -> dict[str, str]:
    """Pass 1: `bb_keys` (custom_id, rowid or a view's key values, hit) for every row, `bb_dups`, and
    `bb_staged` for the rows that are not hits; `bb_hits` counts the hits that are up to date, and
    `bb_keys` is dropped. Returns the key column types.

    A hit is a row whose key, prompt fingerprint and prompt length equal those recorded in
    `key_inputs` for an input that already has a succeeded answer: it is up to date, and its prompt
    is not md5-hashed. When the job has no usable fingerprints (first plan, changed job definition,
    another DuckDB version), every row is staged in one scan, as before fingerprints existed.
    """
    columns = relation_columns(con, job)
    _check_columns(job, columns)
    release_rows(con, job)  # a copy left by an earlier plan of the job on this connection
    view = not is_table(con, job)
    rel = job.relation.sql()
    names = ", ".join(quote_ident(k) for k in job.key)
    known = {"job": job.name, "static_hash": job.static_hash, "hash_version": HASH_VERSION}
    usable = ("job = $job AND answered AND static_hash = $static_hash AND hash_version = $hash_version "
              "AND fingerprint IS NOT NULL")
    has_fingerprints = con.execute(f"SELECT count(*) > 0 FROM bb_state.key_inputs WHERE {usable}", known).fetchone()[0]
    # Rows are found again by rowid (DuckDB then reads just those): a table's, or those of the copy of
    # the view's rows staged.
    if not has_fingerprints:
        source = _copy_view_rows(con, job, columns) if view else rel
        con.execute("CREATE OR REPLACE TEMP TABLE bb_hits AS SELECT 0::BIGINT AS n")
        con.execute("CREATE OR REPLACE TEMP TABLE bb_staged AS "
                    + _staged_select(job, f"(SELECT s.rowid AS bb_rowid, s.* FROM {source} AS s)", columns))
        con.execute(
            "CREATE OR REPLACE TEMP TABLE bb_dups AS "
            "SELECT custom_id FROM bb_staged WHERE NOT key_null GROUP BY custom_id HAVING count(*) > 1"
        )
        return {k: columns[k] for k in job.key}
    # Only the custom_id, what finds the row again (a view's: its key values), and a flag are kept; the
    # prompt text is not.
    found_by = ", ".join(f"s.{quote_ident(k)}" for k in job.key) if view else "s.rowid AS bb_rowid"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bb_keys AS
        SELECT s.* EXCLUDE (prompt_bytes, fingerprint),
               EXISTS (SELECT 1 FROM bb_state.key_inputs k
                       WHERE k.job = $job AND k.answered AND k.static_hash = $static_hash AND k.hash_version = $hash_version
                         AND k.custom_id = s.custom_id AND k.fingerprint = s.fingerprint AND k.prompt_bytes = s.prompt_bytes) AS hit
        FROM (
            SELECT * EXCLUDE (bb_prompt), strlen(bb_prompt) AS prompt_bytes, {fingerprint_sql('bb_prompt')} AS fingerprint
            FROM (SELECT {found_by}, {custom_id_sql(job, key_types=columns)} AS custom_id, {prompt_sql(job)} AS bb_prompt FROM {rel} AS s)
        ) s
        """,
        known,
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_dups AS "
        "SELECT custom_id FROM bb_keys WHERE custom_id IS NOT NULL GROUP BY custom_id HAVING count(*) > 1"
    )
    # Every row that is not a hit of a unique key: new or changed inputs, NULL and duplicate keys.
    todo = "SELECT {} FROM bb_keys WHERE NOT hit OR custom_id IN (SELECT custom_id FROM bb_dups)"
    if view:  # read again by key values (NULL keys match none: read apart), as the copy
        match = " AND ".join(f"s.{quote_ident(k)} = m.{quote_ident(k)}" for k in job.key)
        any_null = " OR ".join(f"s.{quote_ident(k)} IS NULL" for k in job.key)
        copy = _copy_view_rows(con, job, columns,
                               f"WHERE EXISTS (SELECT 1 FROM ({todo.format(names)}) m WHERE {match}) OR {any_null}")
        source = f"(SELECT s.rowid AS bb_rowid, s.* FROM {copy} AS s)"
    else:
        source = (f"(SELECT s.rowid AS bb_rowid, s.* FROM {rel} AS s "
                  f"SEMI JOIN ({todo.format('bb_rowid')}) m ON s.rowid = m.bb_rowid)")
    con.execute("CREATE OR REPLACE TEMP TABLE bb_staged AS " + _staged_select(job, source, columns))
    # Hits are up to date, unless their key is duplicated (those rows were staged, and are classified).
    # Counted now so that `bb_keys`, a row per staged row, is dropped before `measure` and
    # `write_requests` need memory: DuckDB would write its blocks to its temp file to make room
    # (0.15 s of a 5M-row plan, measured).
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_hits AS SELECT count(*) FILTER (WHERE hit) "
        "- (SELECT count(*) FROM bb_keys k JOIN bb_dups d USING (custom_id) WHERE k.hit) AS n FROM bb_keys"
    )
    con.execute("DROP TABLE bb_keys")
    return {k: columns[k] for k in job.key}


def classify(con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, input_limit: InputLimit | None = None) -> None:
    """Pass 2: one disposition per staged row, in `bb_classified`; counts (hits included) into `plan`.

    With an `input_limit`, a row whose input would exceed the model's context window is `too_long`."""
    prefix, suffix = job.params_split()
    # A request line is {"custom_id":<id>,"params":<prefix><json prompt><suffix>}; JSON escaping can only
    # grow the prompt, so a prompt whose raw bytes already exceed the cap can never fit.
    fixed = len('{"custom_id":"","params":}'.encode()) + len(prefix.encode()) + len(suffix.encode()) + 2 + 64
    limit = job.max_bytes_per_batch - BODY_OVERHEAD - fixed
    # Failures that count against max_attempts; parse failures count only when they are retried.
    failures = "coalesce(o.retryable, 0)" + (" + coalesce(o.parse_failed, 0)" if job.retry_parse_failed else "")
    unparsable = "false" if job.retry_parse_failed else "coalesce(o.parse_failed, 0) > 0"
    tokens = f"CAST({input_limit.tokens_sql} AS BIGINT)" if input_limit else "NULL::BIGINT"
    window = input_limit.max_input_tokens if input_limit else None
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bb_classified AS
        WITH flying AS (
            SELECT DISTINCT sr.input_hash
            FROM bb_state.sent_requests sr
            JOIN bb_state.submissions su USING (submission_id)
            LEFT JOIN bb_state.batches b ON b.batch_id = su.batch_id
            WHERE sr.job = $job AND (su.state IN ('prepared', 'creating')
                  OR (su.state = 'created' AND coalesce(b.local_state, 'submitted') IN ('submitted', 'downloaded')))
        )
        SELECT s.*,
               {failures} AS failures,
               {tokens} AS input_tokens_est,
               CASE
                 WHEN s.key_null THEN 'null_key'
                 WHEN d.custom_id IS NOT NULL THEN 'duplicate_key'
                 WHEN s.prompt_empty THEN 'empty_prompt'
                 WHEN o.succeeded THEN '{UP_TO_DATE}'
                 WHEN f.input_hash IS NOT NULL THEN '{IN_FLIGHT}'
                 WHEN r.input_hash IS NOT NULL THEN 'create_rejected'
                 WHEN o.invalid THEN 'invalid_request'
                 WHEN {unparsable} THEN 'parse_failed'
                 WHEN {failures} >= $max_attempts THEN 'attempts_exhausted'
                 WHEN s.prompt_bytes > $limit THEN 'too_large'
                 WHEN $window IS NOT NULL AND {tokens} > $window THEN 'too_long'
                 ELSE '{SEND}'
               END AS disposition,
               r.refusal
        FROM bb_staged s
        LEFT JOIN bb_dups d ON d.custom_id = s.custom_id
        LEFT JOIN (SELECT * FROM bb_state.input_outcomes WHERE job = $job) o ON o.input_hash = s.input_hash
        LEFT JOIN flying f ON f.input_hash = s.input_hash
        LEFT JOIN (SELECT input_hash, any_value(reason) AS refusal FROM bb_state.refused_inputs
                   WHERE job = $job AND definition_hash = $definition GROUP BY input_hash) r ON r.input_hash = s.input_hash
        """,
        {"job": job.name, "max_attempts": job.max_attempts, "limit": limit, "window": window,
         "definition": job.definition_hash},
    )
    rows = con.execute("SELECT disposition, count(*) FROM bb_classified GROUP BY ALL").fetchall()
    plan.dispositions = {d: n for d, n in rows}
    (hits,) = con.execute("SELECT n FROM bb_hits").fetchone()
    if hits:
        plan.dispositions[UP_TO_DATE] = plan.dispositions.get(UP_TO_DATE, 0) + int(hits)
    plan.staged = sum(plan.dispositions.values())
    plan.send_keys = plan.dispositions.get(SEND, 0)
    # One request per distinct input. Inputs shared by several keys are few; the other rows are their
    # own request as they are, so only the shared ones are aggregated: one aggregate of all the rows,
    # nine states per input, ran out of a 64MB limit at 1M rows on two threads, and took 1.25-1.4x as
    # long at 1M and 3M rows.
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_shared AS SELECT input_hash FROM bb_classified "
        "WHERE disposition = 'send' GROUP BY input_hash HAVING count(*) > 1"
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bb_send AS
        SELECT c.input_hash, c.custom_id AS request_custom_id, 1::BIGINT AS key_count, c.failures + 1 AS attempt,
               c.prompt_bytes, c.prompt_chars, c.json_bytes, c.bb_rowid
        FROM bb_classified c ANTI JOIN bb_shared d ON d.input_hash = c.input_hash
        WHERE c.disposition = 'send'
        UNION ALL BY NAME
        SELECT input_hash,
               min(custom_id) AS request_custom_id,
               count(*) AS key_count,
               max(failures) + 1 AS attempt,
               max(prompt_bytes) AS prompt_bytes,
               max(prompt_chars) AS prompt_chars,
               max(json_bytes) AS json_bytes,
               arg_min(bb_rowid, custom_id) AS bb_rowid
        FROM bb_classified c SEMI JOIN bb_shared d ON d.input_hash = c.input_hash
        WHERE disposition = 'send' GROUP BY input_hash
        """
    )
    con.execute("DROP TABLE bb_shared")
    n, pb = con.execute("SELECT count(*), coalesce(sum(prompt_bytes), 0) FROM bb_send").fetchone()
    plan.send_requests, plan.prompt_bytes = int(n), int(pb)


def widest_prompts(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes of the widest vector of staged prompts as JSON (the sum of the `VECTOR_ROWS` widest): what
    statements reading them hold per vector, for `state.room_for_joining`."""
    (n,) = con.execute(
        f"SELECT coalesce(sum(json_bytes), 0) FROM (SELECT json_bytes FROM bb_staged ORDER BY json_bytes DESC NULLS LAST "
        f"LIMIT {VECTOR_ROWS})"
    ).fetchone()
    return int(n)


def params_sql(job: Job, alias: str = "s") -> str:
    """SQL of a row's request params as JSON text: the body of its batch line, and of a preview call."""
    prefix, suffix = job.params_split()
    return f"{quote_literal(prefix)} || CAST(to_json({prompt_sql(job, alias)}) AS VARCHAR) || {quote_literal(suffix)}"


def line_sql(job: Job, alias: str = "s", custom_id: str = "q.request_custom_id") -> str:
    return (
        f"""'{{"custom_id":' || CAST(to_json({custom_id}) AS VARCHAR) || ',"params":' || """
        f"{params_sql(job, alias)} || '}}'"
    )


def _lines_query(source: str, columns: str, requests: str, alias: str) -> str:
    """Rows of `requests` (a range of `bb_lines`, or the sample of them) joined back by rowid to the staging
    rows `s` (`rows_source`) for their prompt text. Run under `joins_as_written`: the staging rows, prompts
    and all, stream past a hash table of the (narrow) requests, never the other way round."""
    return f"""
        SELECT {columns}
        FROM {source} s
        JOIN {requests} {alias} ON s.rowid = {alias}.bb_rowid
    """


# Batches that may be in the create window together must have different request counts (an interrupted
# create is recognised in `list` by its count; see submit.py). Runs of this many consecutive batches get
# counts one apart (cap, cap - 1, ...), so that many can be created at once, at the price of at most a
# few requests per batch. Caps too small for that give every batch the cap: those are created in turn.
DISTINCT_COUNTS = 4


def _batch_cap(max_requests: int, k: int) -> int:
    """The most requests the k-th batch of a cut may hold."""
    if max_requests < 10 * DISTINCT_COUNTS:
        return max_requests
    return max_requests - k % DISTINCT_COUNTS


def cut_chunks(sizes: Iterable[int], max_requests: int, max_body: int) -> list[tuple[int, int, int]]:
    """Greedy cut of line sizes (in order) into (first, last, body_bytes) ranges within both caps
    (the k-th batch holds at most `_batch_cap(max_requests, k)` requests)."""
    out: list[tuple[int, int, int]] = []
    first, body, last = 0, BODY_OVERHEAD, -1
    for i, size in enumerate(sizes):
        last = i
        grown = body + size + (1 if i > first else 0)
        cap = _batch_cap(max_requests, len(out))
        if i > first and (i - first >= cap or grown > max_body):
            out.append((first, i - 1, body))
            first, body = i, BODY_OVERHEAD + size
        else:
            body = grown
    if last >= 0:
        out.append((first, last, body))
    return out


def _count_ranges(n: int, max_requests: int) -> list[tuple[int, int]]:
    """The ranges `cut_chunks` makes when only the request count binds, without looking at sizes."""
    out, first = [], 0
    while first < n:
        cap = _batch_cap(max_requests, len(out))
        out.append((first, min(n, first + cap) - 1))
        first += cap
    return out


def _streamed_sizes(con: duckdb.DuckDBPyConnection) -> Iterator[int]:
    cur = con.execute("SELECT nbytes FROM bb_lines ORDER BY rn")
    while rows := cur.fetchmany(65536):
        for (n,) in rows:
            yield n


def measure(con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, max_requests: int | None = None) -> None:
    """Exact line sizes of the requests to send, numbered, and the batches they make (`bb_lines`).

    Batches hold at most the job's `max_requests_per_batch`, and at most `max_requests` (the
    workspace's processing-queue room, so that every batch can be queued on its own)."""
    # One thread: a sort holds its runs per thread, so the memory this needs would grow with the cores,
    # not only with the limit (two threads sort 3M requests in ~0.75x the time).
    with single_threaded(con):
        _measure(con, job, plan, min(job.max_requests_per_batch, max_requests or job.max_requests_per_batch))


def line_framing_bytes(job: Job) -> int:
    """Bytes of a request line besides its custom_id's and its prompt's JSON (see `line_sql`)."""
    prefix, suffix = job.params_split()
    return len(b'{"custom_id":,"params":}') + len(prefix.encode()) + len(suffix.encode())


def _measure(con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, cap: int) -> None:
    # A line's size is its framing, its custom_id's JSON and its prompt's JSON (measured when the row
    # was staged): no line is built and the staging relation is not read again.
    #
    # The rows are numbered in rowid order (of the staging table, or of the copy of a view's rows): each
    # batch's COPY joins its rows back to the staging rows for their prompts, and a batch that is a
    # narrow range of the table lets that join's filter skip the table's other row groups, where a batch
    # of rows scattered over the table reads all of it, once per batch (`bench_plan_scale.py --shuffled`,
    # staging rows stored in an order unrelated to their keys: 10.7 s to write 3M rows numbered in
    # custom_id order, 7.2 s in rowid order). The subquery sorts and the numbering streams behind it, in
    # about half the time of `row_number() OVER (ORDER BY ...)`. The order is for speed only: nothing
    # reads a batch's requests in any order.
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_lines AS "
        "SELECT row_number() OVER () - 1 AS rn, request_custom_id, bb_rowid, "
        "input_hash, attempt, key_count, prompt_chars, "
        f"{line_framing_bytes(job)} + strlen(CAST(to_json(request_custom_id) AS VARCHAR)) + json_bytes AS nbytes "
        "FROM (SELECT * FROM bb_send ORDER BY bb_rowid)"
    )
    con.execute("DROP TABLE bb_send")
    n, biggest, chars = con.execute(
        "SELECT count(*), coalesce(max(nbytes), 0), coalesce(sum(prompt_chars), 0) FROM bb_lines"
    ).fetchall()[0]
    plan.prompt_chars = int(chars)
    limit = job.max_bytes_per_batch
    if BODY_OVERHEAD + cap * (biggest + 1) <= limit:
        # Even a full batch of the largest line fits the byte cap: cut by count, sizes summed in SQL.
        spans = _count_ranges(int(n), cap)
        _record_chunks(con, spans)
        # One sum per batch over its own range: `bb_lines` is stored in `rn` order, so each reads only
        # its rows. (A range join of every line with the batches sorts all the lines: 1.2 s for 5M of
        # them in 51 batches, against 0.2 s for the 51 sums, measured.)
        ranges = [(a, b, BODY_OVERHEAD + int(con.execute(
            "SELECT sum(nbytes) + count(*) - 1 FROM bb_lines WHERE rn BETWEEN ? AND ?", [a, b]).fetchone()[0]))
            for a, b in spans]
    else:
        ranges = cut_chunks(_streamed_sizes(con), cap, limit)
        _record_chunks(con, [(a, b) for a, b, _ in ranges])
    plan.chunks = [Chunk(i, a, b, b - a + 1, body) for i, (a, b, body) in enumerate(ranges)]


def _record_chunks(con: duckdb.DuckDBPyConnection, spans: list[tuple[int, int]]) -> None:
    """`bb_chunks`: each batch's index and range of `bb_lines` rows, in one statement (one row per batch)."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_chunks AS "
        "SELECT CAST(unnest($k) AS INTEGER) AS k, CAST(unnest($first) AS BIGINT) AS first, "
        "CAST(unnest($last) AS BIGINT) AS last",
        {"k": list(range(len(spans))), "first": [a for a, _ in spans], "last": [b for _, b in spans]},
    )


@dataclass
class Sample:
    """Request lines to count, and the strata (groups of similar prompt length) they represent."""

    lines: list[tuple[int, int, int, str]]  # (stratum, input_hash, prompt_chars, request line)
    strata: dict[int, tuple[int, int]]  # stratum -> (requests, prompt characters) of all requests to send


def sample_lines(con: duckdb.DuckDBPyConnection, job: Job, size: int, strata: int = 10) -> Sample:
    """The exact request lines (as `write_requests` writes them) of a sample of the requests in `bb_lines`:
    all of them when there are at most `size`, else `size / strata` from each of `strata` groups of
    similar prompt length. Rows are picked by a hash of their input, so a second plan picks the same ones."""
    (n,) = con.execute("SELECT count(*) FROM bb_lines").fetchone()
    groups = 1 if n <= size else max(1, min(strata, size // 2))
    each = size if groups == 1 else max(2, size // groups)
    picked = strata_of_lines(con, n, groups, each)
    counts = {k: (r, c) for k, r, c, _ in picked}
    sampled = [(k, rn) for k, _, _, rns in picked for rn in rns]
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_sample AS SELECT l.*, t.stratum FROM bb_lines l JOIN ("
        "  SELECT unnest($k) AS stratum, unnest($rn) AS rn) t USING (rn)",
        {"k": [k for k, _ in sampled], "rn": [rn for _, rn in sampled]},
    )
    with joins_as_written(con):
        rows = con.execute(_lines_query(
            rows_source(con, job), f"q.stratum, q.input_hash, q.prompt_chars, {line_sql(job)} AS line", "bb_sample", "q"
        )).fetchall()
    con.execute("DROP TABLE bb_sample")
    return Sample([(int(k), int(h), int(c), line) for k, h, c, line in rows], counts)


def strata_of_lines(con: duckdb.DuckDBPyConnection, n: int, groups: int, each: int
                    ) -> list[tuple[int, int, int, list[int]]]:
    """The `n` requests in `bb_lines` cut into `groups` strata of similar prompt length: per stratum (1 to
    `groups`), its requests, their prompts' characters, and the `rn` of `each` of them picked by a hash
    of their input."""
    # The strata `ntile` over (prompt length, a hash of the input) would cut, without ordering every
    # request: each length's requests take their place in that order from the counts per length (one row
    # per length), and are spread over it by a hash of their input, so that a length shared by many
    # requests is cut as evenly as `ntile` would. A window over every request holds them all (at 10M
    # requests, more than the plan's 64 MiB). Per stratum, its size and characters, and the `each` rows of
    # lowest (hash of input, rn): a bounded heap per stratum, in the same pass.
    picked = con.execute(
        "WITH lengths AS ("
        "  SELECT chars, rows, coalesce(sum(rows) OVER (ORDER BY chars ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before"
        "  FROM (SELECT coalesce(prompt_chars, 0) AS chars, count(*) AS rows FROM bb_lines GROUP BY 1)) "
        "SELECT stratum, count(*), sum(prompt_chars), min_by(rn, struct_pack(h := hash(input_hash), rn := rn), $each) "
        "FROM (SELECT l.rn, l.input_hash, l.prompt_chars, "
        "             least($g, 1 + CAST(floor((d.before + d.rows * (hash(l.input_hash, 'stratum') / 18446744073709551616.0))"
        "                                      * $g / $n) AS BIGINT)) AS stratum "
        "      FROM bb_lines l JOIN lengths d ON coalesce(l.prompt_chars, 0) = d.chars) "
        "GROUP BY stratum",
        {"g": groups, "n": max(n, 1), "each": each},
    ).fetchall()
    return [(int(k), int(r), int(c or 0), [int(x) for x in rns]) for k, r, c, rns in picked]


def write_requests(con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, out_dir: Path, names: list[str]) -> list[Path]:
    """Write one request JSONL per chunk, atomically (temp name, fsync, rename). Returns the paths.

    One COPY per batch, with no ORDER BY and no partitioning, so DuckDB streams the lines to disk
    instead of holding a batch (up to 256 MB of request text) in memory.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    source = rows_source(con, job)
    # Writing lines is I/O, and each thread would buffer its own share; prompts stream (joins_as_written).
    with single_threaded(con), joins_as_written(con):
        return _write_request_files(con, job, plan, out_dir, names, source)


def _write_request_files(
    con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, out_dir: Path, names: list[str], source: str
) -> list[Path]:
    paths = []
    for c, name in zip(plan.chunks, names):
        tmp = out_dir / f".{name}.jsonl.tmp"
        con.execute(
            f"""
            COPY (
                {_lines_query(source, f"{line_sql(job, custom_id='l.request_custom_id')} AS line",
                              f"(SELECT * FROM bb_lines WHERE rn BETWEEN {int(c.first)} AND {int(c.last)})", "l")}
            ) TO {quote_literal(str(tmp))}
            (FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\x01')
            """
        )
        size = tmp.stat().st_size
        expected = c.body_bytes - BODY_OVERHEAD + 1  # lines + newlines == body minus wrapper plus final newline
        if size != expected:
            tmp.unlink()
            raise WarehouseError(f"request file for chunk {c.index} has {size} bytes, expected {expected}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        dest = out_dir / f"{name}.jsonl"
        os.replace(tmp, dest)
        paths.append(dest)
    return paths
