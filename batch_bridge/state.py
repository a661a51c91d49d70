"""The bridge's own state: a DuckDB file that dbt never opens, with append-only named migrations.

Connections are short-lived (open, do one step, close) so that `status` can read while `wait` polls,
and a DuckDB lock held by another bridge process is waited for, up to `lock_timeout`. Commands that
change what is sent or loaded also take an exclusive process lock (`exclusive`), so two schedulers
starting `batch-bridge sync` at once cannot both submit.

State changes are named functions that refuse illegal moves (`InvalidStateTransition`).

Submission journal (one row per request file; written *before* the create call):
    prepared -> creating -> created
    prepared -> created                   (sync lane: its calls go out under a local id, `msg_run_...`;
                                           answers are appended to its answers file as they arrive)
    creating -> creating                  (the create's outcome became unknown: `outcome_unknown_at` is set)
    creating -> prepared                  (the API refused the create with 429/529, or the account cannot
                                           create: nothing exists, the file is sent again later)
    creating -> abandoned                 (the API rejected the create for good, 400/413: its rows are
                                           recorded in `refused_inputs` with the API's message)
    created -> creating                   (the batch adopted for it proved foreign: the search goes on)
Local batch life (`batches.local_state`, beside the API's own `processing_status`):
    submitted -> downloaded -> collected  (loaded in slices of its file: each slice's rows and the
                                           position after it, `loaded_lines`/`loaded_bytes`, commit
                                           together, and the last slice marks it collected; a sync-lane run: submitted while its calls go out, downloaded
                                           once its answers file holds an answer to every request)
    downloaded -> submitted               (the result file is unreadable: download it again)
    submitted | downloaded -> lost        (results deleted or past retention; rows go back to pending)
    submitted | downloaded -> foreign     (adopted on its request count, its answers are another
                                           client's: never loaded, cancelled or deleted)
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Literal, TypeVar

import duckdb

from .config import Settings, size_bytes
from .errors import BatchBridgeError, ConfigError, InvalidStateTransition, StateError, StateLocked

T = TypeVar("T")

SubmissionState = Literal["prepared", "creating", "created", "abandoned"]
LocalBatchState = Literal["submitted", "downloaded", "collected", "lost", "foreign"]
ProcessingStatus = Literal["in_progress", "canceling", "ended"]
ResultType = Literal["succeeded", "errored", "canceled", "expired"]


def utcnow() -> datetime:
    """Naive UTC, the form DuckDB TIMESTAMP columns hold."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def m001_initial(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """
        CREATE TABLE jobs (
            job VARCHAR PRIMARY KEY,
            definition JSON,           -- the validated job, for status and for the results export
            static_hash VARCHAR,
            key_types JSON,            -- [[column, duckdb type], ...] from the staging relation
            updated_at TIMESTAMP
        );
        CREATE TABLE submissions (
            submission_id VARCHAR PRIMARY KEY,
            job VARCHAR NOT NULL,
            state VARCHAR NOT NULL,    -- prepared | creating | created | abandoned
            request_file VARCHAR NOT NULL,
            request_count BIGINT NOT NULL,
            body_bytes BIGINT NOT NULL,
            estimated_cost_usd DOUBLE,
            prepared_at TIMESTAMP NOT NULL,
            create_started_at TIMESTAMP,
            batch_id VARCHAR,
            created_at TIMESTAMP,
            note VARCHAR
        );
        CREATE TABLE sent_requests (   -- one row per request line of a submission
            submission_id VARCHAR NOT NULL,
            job VARCHAR NOT NULL,
            request_custom_id VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,  -- md5_number(): 128 bits, hashed and joined faster than hex text
            attempt INTEGER NOT NULL,
            key_count INTEGER NOT NULL, -- how many keys share this request (dedupe fan-out)
            prompt_chars BIGINT NOT NULL -- for calibrating token estimates against billed usage
        );
        CREATE TABLE batches (
            batch_id VARCHAR PRIMARY KEY,
            job VARCHAR NOT NULL,
            submission_id VARCHAR NOT NULL,
            processing_status VARCHAR NOT NULL,   -- the API's words: in_progress | canceling | ended
            local_state VARCHAR NOT NULL,         -- submitted | downloaded | collected | lost
            request_count BIGINT NOT NULL,
            processing BIGINT DEFAULT 0, succeeded BIGINT DEFAULT 0, errored BIGINT DEFAULT 0,
            canceled BIGINT DEFAULT 0, expired BIGINT DEFAULT 0,
            created_at TIMESTAMP, expires_at TIMESTAMP, ended_at TIMESTAMP,
            cancel_initiated_at TIMESTAMP, archived_at TIMESTAMP,
            results_url VARCHAR,
            polled_at TIMESTAMP,
            result_file VARCHAR,
            result_lines BIGINT,
            collected_at TIMESTAMP,
            note VARCHAR
        );
        CREATE TABLE key_versions (   -- which input each key had, appended when it changes
            job VARCHAR NOT NULL,
            custom_id VARCHAR NOT NULL,
            key_json VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,  -- md5_number(): 128 bits, hashed and joined faster than hex text
            seen_at TIMESTAMP NOT NULL
        );
        CREATE TABLE responses (      -- one row per result line loaded; full history
            job VARCHAR NOT NULL,
            batch_id VARCHAR NOT NULL,
            request_custom_id VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,  -- md5_number(): 128 bits, hashed and joined faster than hex text
            attempt INTEGER NOT NULL,
            status VARCHAR NOT NULL,  -- succeeded | errored | canceled | expired | parse_failed
            output_text VARCHAR,
            output_json JSON,
            stop_reason VARCHAR,
            model VARCHAR,
            input_tokens BIGINT, output_tokens BIGINT,
            cache_creation_input_tokens BIGINT, cache_read_input_tokens BIGINT,
            cache_creation_5m BIGINT, cache_creation_1h BIGINT,
            cost_usd DOUBLE,
            error_type VARCHAR, error_message VARCHAR,
            submitted_at TIMESTAMP,
            collected_at TIMESTAMP NOT NULL
        );
        CREATE TABLE rejections (     -- rows of the latest snapshot that were not sent, and why
            job VARCHAR NOT NULL,
            key_json VARCHAR,
            reason VARCHAR NOT NULL,
            detail VARCHAR,
            seen_at TIMESTAMP NOT NULL
        );
        """
    )


# Errors after which the same input may be sent again (counted against max_attempts); any other
# `errored` result (invalid_request_error, ...) says the input itself is refused, except ...
RETRYABLE_ERRORS = ("overloaded_error", "api_error", "rate_limit_error", "timeout_error")
# ... errors of the account or the job's configuration (a key without permission, unpaid billing, a model
# the workspace cannot see): the input is fine, so they neither refuse it nor count against max_attempts,
# and the collect that loads them stops and says what to fix.
ACCOUNT_ERRORS = ("authentication_error", "billing_error", "permission_error", "not_found_error")


def outcomes_select(where: str) -> str:
    """`input_outcomes` rows (job, input_hash, succeeded, retryable, parse_failed, invalid) of the
    `responses` rows matching `where`. Changing what counts as retryable needs a migration that
    rebuilds `input_outcomes` with it."""
    errors = ", ".join("'" + e + "'" for e in RETRYABLE_ERRORS)
    account = ", ".join("'" + e + "'" for e in ACCOUNT_ERRORS)
    retryable = f"(status IN ('expired', 'canceled') OR (status = 'errored' AND coalesce(error_type, 'api_error') IN ({errors})))"
    return f"""
        SELECT job, input_hash,
               bool_or(status = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE {retryable}) AS retryable,
               count(*) FILTER (WHERE status = 'parse_failed') AS parse_failed,
               bool_or(status = 'errored' AND NOT {retryable} AND coalesce(error_type, '') NOT IN ({account})) AS invalid
        FROM bb_state.responses WHERE {where} GROUP BY job, input_hash
    """


def m002_input_outcomes(con: duckdb.DuckDBPyConnection) -> None:
    """What the answers so far say of each distinct input, so that `plan` joins one row per input
    instead of aggregating the whole `responses` history every time."""
    con.execute(
        """
        CREATE TABLE input_outcomes (  -- one row per (job, input_hash) with responses; kept at load
            job VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,
            succeeded BOOLEAN NOT NULL,   -- some answer succeeded (and matched the output schema)
            retryable BIGINT NOT NULL,    -- expired, canceled, or errored with a retryable error type
            parse_failed BIGINT NOT NULL, -- answers that did not match the output schema
            invalid BOOLEAN NOT NULL      -- errored with a non-retryable error (the input is refused)
        )
        """
    )
    con.execute("INSERT INTO input_outcomes " + outcomes_select("true"))


def m003_key_inputs(con: duckdb.DuckDBPyConnection) -> None:
    """Each key's current input (the latest `key_versions` row) with a fingerprint of its prompt text,
    so that `plan` hashes (md5) only the prompts that changed. Old files get no fingerprints: their
    first plan hashes every prompt, and their next submit records the fingerprints."""
    con.execute(
        """
        CREATE TABLE key_inputs (  -- one row per (job, custom_id); written with key_versions
            job VARCHAR NOT NULL,
            custom_id VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,  -- = the key's latest key_versions.input_hash
            answered BOOLEAN NOT NULL,     -- = input_outcomes.succeeded of that input_hash
            static_hash VARCHAR,           -- the job definition the fingerprint was taken under
            hash_version VARCHAR,          -- the DuckDB version whose hash() made it
            prompt_bytes BIGINT,
            fingerprint UBIGINT            -- hash(prompt, 'bbfp' || prompt): see docs/DESIGN.md
        )
        """
    )
    con.execute(
        """
        INSERT INTO key_inputs
        SELECT k.job, k.custom_id, k.input_hash, coalesce(o.succeeded, false), NULL, NULL, NULL, NULL
        FROM (SELECT job, custom_id, arg_max(input_hash, seen_at) AS input_hash FROM key_versions GROUP BY job, custom_id) k
        LEFT JOIN input_outcomes o ON o.job = k.job AND o.input_hash = k.input_hash
        """
    )


def m004_result_bytes(con: duckdb.DuckDBPyConnection) -> None:
    """The size of each batch's result file, so that the steps over its answers know how wide its rows
    are (`room_for_rows`). Batches collected before it get the size of their answers as stored."""
    con.execute("ALTER TABLE batches ADD COLUMN result_bytes BIGINT")
    con.execute(
        """
        UPDATE batches SET result_bytes = s.bytes
        FROM (SELECT batch_id,
                     sum(coalesce(strlen(output_text), 0) + coalesce(strlen(CAST(output_json AS VARCHAR)), 0)
                         + coalesce(strlen(error_message), 0) + 400) AS bytes  -- 400: ids, usage, envelope
              FROM responses GROUP BY batch_id) s
        WHERE batches.batch_id = s.batch_id
        """
    )


def m005_unknown_outcomes(con: duckdb.DuckDBPyConnection) -> None:
    """What reconciling a create against a shared workspace needs: when each create's outcome became
    unknown (the grace counts from there) and when its first attempt started (the oldest a batch of it
    can be), whether a batch was adopted (it is confirmed by its answers before anything is loaded),
    batches proven foreign, and the inputs of creates the API rejected for good. `input_outcomes` is
    rebuilt because account errors no longer make an input invalid."""
    con.execute("ALTER TABLE submissions ADD COLUMN outcome_unknown_at TIMESTAMP")
    con.execute("ALTER TABLE submissions ADD COLUMN first_create_at TIMESTAMP")
    con.execute("UPDATE submissions SET first_create_at = create_started_at")
    con.execute("ALTER TABLE submissions ADD COLUMN adopted BOOLEAN DEFAULT false")
    con.execute("UPDATE submissions SET adopted = coalesce(note LIKE 'adopted%', false)")
    con.execute(
        """
        CREATE TABLE foreign_batches (  -- batches of the workspace proven not to be a submission's
            batch_id VARCHAR NOT NULL,
            submission_id VARCHAR NOT NULL,
            job VARCHAR NOT NULL,
            request_count BIGINT,
            created_at TIMESTAMP,
            found_at TIMESTAMP NOT NULL,
            why VARCHAR
        );
        CREATE TABLE refused_inputs (  -- inputs of a create the API rejected for good (400/413)
            job VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,
            definition_hash VARCHAR NOT NULL,  -- the whole job definition: changing it sends them again
            submission_id VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,           -- the API's message
            refused_at TIMESTAMP NOT NULL
        )
        """
    )
    con.execute("DELETE FROM input_outcomes")
    con.execute("INSERT INTO input_outcomes " + outcomes_select("true"))


def m006_report_estimates(con: duckdb.DuckDBPyConnection) -> None:
    """The estimate made before each submission, split like billed usage, so that `report` can set it
    next to what was billed. `estimated_cost_usd` (m001) holds the batch-price total; submissions
    prepared before this stay without an estimate."""
    for col in ("estimated_input_tokens", "estimated_output_tokens", "estimated_cache_write_tokens",
                "estimated_cache_read_tokens"):
        con.execute(f"ALTER TABLE submissions ADD COLUMN {col} BIGINT")
    con.execute("ALTER TABLE submissions ADD COLUMN estimated_sync_usd DOUBLE")


def m007_model_info(con: duckdb.DuckDBPyConnection) -> None:
    """What the Models API said of each model, so that a preflight asks at most once an hour."""
    con.execute(
        """
        CREATE TABLE model_info (
            api VARCHAR NOT NULL,          -- the API's base URL: the emulator and the real API may differ
            model VARCHAR NOT NULL,        -- the id as the job names it (an alias or a dated id)
            info JSON NOT NULL,            -- model_info.ModelFacts
            fetched_at TIMESTAMP NOT NULL,
            PRIMARY KEY (api, model)
        )
        """
    )


def m008_token_counts(con: duckdb.DuckDBPyConnection) -> None:
    """Input tokens counted by the token counting endpoint, per exact request (its input hash) and API,
    so that a second plan of the same rows counts nothing again."""
    con.execute(
        """
        CREATE TABLE token_counts (
            endpoint VARCHAR NOT NULL,     -- the API's base URL: the emulator's counts are not the real API's
            input_hash UHUGEINT NOT NULL,  -- the request's input hash (sent_requests.input_hash)
            input_tokens BIGINT NOT NULL,
            counted_at TIMESTAMP NOT NULL,
            PRIMARY KEY (endpoint, input_hash)
        )
        """
    )


def m009_lanes(con: duckdb.DuckDBPyConnection) -> None:
    """The lane of each submission, batch and answer (`batch` or `sync`): synchronous answers go through
    the same journal and the same loader as batches (a sync submission's answers file stands in for a
    batch's result file), so one column is all that tells them apart, for cost and for `status`."""
    for table in ("submissions", "batches", "responses"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN lane VARCHAR DEFAULT 'batch'")
        con.execute(f"UPDATE {table} SET lane = 'batch'")


def m010_published(con: duckdb.DuckDBPyConnection) -> None:
    """What each job's results source shows: its buckets, the layout of its rows, and how far into
    `key_versions` and `responses` it reaches. Written after the files, so a publish killed between
    them leaves the marks where they were and the next publish rewrites at least the same buckets."""
    con.execute(
        """
        CREATE TABLE published (
            job VARCHAR PRIMARY KEY,
            buckets INTEGER NOT NULL,        -- files in results/<job>/current.parquet/, keys split by hash(custom_id)
            layout VARCHAR NOT NULL,         -- md5 of the row projection and the DuckDB whose hash() split the keys
            versions_until TIMESTAMP,        -- key_versions up to this seen_at are shown ...
            versions_rows BIGINT NOT NULL,   -- ... and there were this many of them
            responses_until TIMESTAMP,       -- responses up to this collected_at are shown ...
            responses_rows BIGINT NOT NULL,  -- ... and there were this many of them
            published_at TIMESTAMP NOT NULL
        )
        """
    )


def m011_load_slices(con: duckdb.DuckDBPyConnection) -> None:
    """How far into its result file a downloaded batch is loaded: a batch loads in slices, each
    committed with the position after it, so that a load cut short resumes at the next slice (lines
    and bytes, the byte offset being where the next slice starts). Batches loaded before are whole."""
    con.execute("ALTER TABLE batches ADD COLUMN loaded_lines BIGINT DEFAULT 0")
    con.execute("ALTER TABLE batches ADD COLUMN loaded_bytes BIGINT DEFAULT 0")
    con.execute("UPDATE batches SET loaded_lines = 0, loaded_bytes = 0")


def m012_unfolded_batches(con: duckdb.DuckDBPyConnection) -> None:
    """Collected batches whose answers are not yet folded into `input_outcomes` and
    `key_inputs.answered`: a fold scans the job's whole summaries, so it runs once for many batches
    (`fold_outcomes`) instead of once per batch. Batches collected before are folded already."""
    con.execute(
        """
        CREATE TABLE unfolded_batches (
            job VARCHAR NOT NULL,
            batch_id VARCHAR NOT NULL,
            answers BIGINT NOT NULL  -- its result lines: what a fold of it reads
        )
        """
    )


def m013_key_inputs_key_json(con: duckdb.DuckDBPyConnection) -> None:
    """Each key's key values in `key_inputs` beside its current input (the `key_json` of its latest
    `key_versions` row), so that a publish finds a key's current input and key in one row instead of
    aggregating all its versions. The table is copied rather than updated: an UPDATE of every row of a
    10M-key table is held in memory until it commits, a copy is written to disk as it goes."""
    con.execute(
        """
        CREATE TABLE key_inputs_new (  -- one row per (job, custom_id); written with key_versions
            job VARCHAR NOT NULL,
            custom_id VARCHAR NOT NULL,
            input_hash UHUGEINT NOT NULL,  -- = the key's latest key_versions.input_hash
            answered BOOLEAN NOT NULL,     -- = input_outcomes.succeeded of that input_hash
            static_hash VARCHAR,           -- the job definition the fingerprint was taken under
            hash_version VARCHAR,          -- the DuckDB version whose hash() made it
            prompt_bytes BIGINT,
            fingerprint UBIGINT,           -- hash(prompt, 'bbfp' || prompt): see docs/DESIGN.md
            key_json VARCHAR               -- = the key's latest key_versions.key_json
        )
        """
    )
    con.execute(
        """
        INSERT INTO key_inputs_new
        SELECT k.*, l.key_json FROM key_inputs k
        LEFT JOIN (SELECT job, custom_id, arg_max(key_json, seen_at) AS key_json FROM key_versions
                   GROUP BY job, custom_id) l ON l.job = k.job AND l.custom_id = k.custom_id
        """
    )
    con.execute("DROP TABLE key_inputs")
    con.execute("ALTER TABLE key_inputs_new RENAME TO key_inputs")


MIGRATIONS: list[Callable[[duckdb.DuckDBPyConnection], None]] = [
    m001_initial, m002_input_outcomes, m003_key_inputs, m004_result_bytes, m005_unknown_outcomes,
    m006_report_estimates, m007_model_info, m008_token_counts, m009_lanes, m010_published,
    m011_load_slices, m012_unfolded_batches, m013_key_inputs_key_json]


# DuckDB reports running out of its memory_limit as OutOfMemoryException, or, when it happens at COMMIT,
# as a TransactionException that carries the same words.
_OOM_WORDS = ("Out of Memory", "could not allocate block", "failed to allocate data", "failed to pin block")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is DuckDB running out of the bridge's memory_limit (not a problem of the data)."""
    if type(e).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
        return False
    return type(e).__name__ == "OutOfMemoryException" or any(w in str(e) for w in _OOM_WORDS)


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """ROLLBACK after a failed statement. DuckDB may already have ended the transaction (an
    out-of-memory error does); a second error here must not hide the first, which the caller re-raises."""
    try:
        con.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass


def in_transaction(con: duckdb.DuckDBPyConnection, step: Callable[[], object]) -> None:
    """Run `step` in a transaction of its own: committed whole, or rolled back and re-raised."""
    con.execute("BEGIN")
    try:
        step()
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Apply every migration not yet applied; runs on every open, so old and new files match."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)")
    done = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
    for m in MIGRATIONS:
        if m.__name__ in done:
            continue
        con.execute("BEGIN")
        try:
            m(con)
            con.execute("INSERT INTO _migrations VALUES (?, ?)", [m.__name__, utcnow()])
            con.execute("COMMIT")
        except Exception:
            rollback(con)
            raise


def _configure(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Bound DuckDB's memory (it spills to the bridge's own temp dir beyond it) and let it stream."""
    tmp = settings.home / "tmp"
    tmp.mkdir(exist_ok=True)
    # The temp directory first: lowering memory_limit evicts what opening the file replayed from its WAL
    # (a load of wide answers can leave hundreds of MB there), and once DuckDB has spilled to a directory
    # it refuses any SET temp_directory, even to the same path. A second connection to the same
    # database in this process finds it set already.
    (current,) = con.execute("SELECT current_setting('temp_directory')").fetchone()
    if current != str(tmp):
        con.execute(f"SET temp_directory = '{str(tmp).replace(chr(39), chr(39) * 2)}'")
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    # Row order of exports and loads does not matter to us; without it DuckDB streams COPY and INSERT.
    con.execute("SET preserve_insertion_order = false")
    # The bridge reports its own progress on stderr; DuckDB's bar would draw over it in scheduler logs.
    con.execute("SET enable_progress_bar = false")


@contextmanager
def _setting(con: duckdb.DuckDBPyConnection, name: str, value: str) -> Iterator[None]:
    """Run the enclosed statements with DuckDB setting `name` = `value` (a SQL literal), then restore it.

    A statement that failed inside a transaction leaves it aborted, and an aborted transaction refuses
    SET: it is rolled back first (all it can still do), so the setting is restored and the first
    error, which the caller re-raises, is the one reported."""
    (before,) = con.execute(f"SELECT current_setting('{name}')").fetchone()
    con.execute(f"SET {name} = {value}")
    restore = f"SET {name} = " + "'" + str(before if before is not None else "").replace("'", "''") + "'"
    try:
        yield
    finally:
        try:
            con.execute(restore)
        except duckdb.TransactionException:
            rollback(con)
            con.execute(restore)


def single_threaded(con: duckdb.DuckDBPyConnection) -> ContextManager[None]:
    """Run the enclosed statements on one DuckDB thread, then restore the thread count.

    For the steps that move data rather than compute (reading result files, writing Parquet and
    request files): their memory is per thread (a JSON read buffer of 32 MB, a Parquet row group, an
    insert's row group each), they are bound by disk and parsing rather than CPU, and with one thread
    a large INSERT flushes its row groups to disk as they fill instead of holding them per thread.
    Planning keeps every core: hashing and joining millions of staged rows is CPU work.
    """
    return _setting(con, "threads", "1")


# DuckDB's vector: the rows each operator of a statement holds at once while streaming.
VECTOR_ROWS = 2048
# Vectors of wide rows a streaming statement holds outside what DuckDB can spill: the vector read, its
# extracted or encoded copies, the writer's buffer. Measured: at 64MB, 100,000 answers of
# 6 KB failed to load (and passed at 96MB) and 2,000 of 20 KB failed at 112MB; at 128MB, 2,000 of 60 KB.
WIDE_ROW_VECTORS = 4
# The default limit was measured with rows up to this wide (100,000 answers of 6 KB load within 128MB):
# only the width beyond it gets room, so ordinary jobs run exactly at the default.
ORDINARY_ROW_BYTES = 4096
ROOM_CAP_BYTES = 4 * 2**30


def room_for_rows(
    con: duckdb.DuckDBPyConnection, settings: Settings, row_bytes: float, rows: int = VECTOR_ROWS
) -> ContextManager[None]:
    """Run the enclosed statements with room for a few vectors of rows `row_bytes` wide (of `rows`, when
    there are fewer than a vector) on top of the default memory_limit, then restore it.

    The default limit is sized for rows of ordinary width, where everything that grows with the job
    (hash tables, sorts, uncommitted inserts) spills to disk; what does not spill is a few vectors of
    the rows being streamed, which grows with their width: 2,048 answers of 60 KB are 120 MB per copy.
    A limit the user set is theirs, a cap that is never raised."""
    if settings.memory_limit_set or row_bytes <= ORDINARY_ROW_BYTES:
        return nullcontext()
    return _room(con, _rows_limit(settings, row_bytes, rows))


# A batch's load (`room_for_loading`): each slice read, extracted and INSERTed, and the batch's committed
# rows, which DuckDB holds until the batch's one checkpoint (spilling them beyond the limit). Measured:
# 100,000 answers of 4 KB (the ordinary width) loaded at 80MB and not at 64MB; at 128MB a 100,000-answer
# batch held ~30 MB more than at this limit, in the same time (bench_scale.py).
LOADING_BASE_BYTES = 96 * 2**20


def room_for_loading(
    con: duckdb.DuckDBPyConnection, settings: Settings, row_bytes: float, rows: int = VECTOR_ROWS,
    at_least: int = 0,
) -> ContextManager[None]:
    """Run the enclosed statements (a batch's load) under LOADING_BASE_BYTES plus the room `room_for_rows`
    gives rows `row_bytes` wide, or `at_least` (what an earlier batch of the job grew to, `grow_room`),
    then checkpoint and restore the limit. A limit the user set is kept."""
    if settings.memory_limit_set:
        return nullcontext()
    return _room(con, max(_rows_limit(settings, row_bytes, rows, LOADING_BASE_BYTES), at_least))


def memory_limit(con: duckdb.DuckDBPyConnection) -> int:
    """DuckDB's current memory_limit, in bytes."""
    (current,) = con.execute("SELECT current_setting('memory_limit')").fetchone()
    return size_bytes(current)


def _rows_limit(settings: Settings, row_bytes: float, rows: int = VECTOR_ROWS, base: int | None = None) -> int:
    """The default memory_limit (or `base`) plus a few vectors of rows `row_bytes` wide beyond the
    ordinary width (of `rows`, when there are fewer than a vector), capped at ROOM_CAP_BYTES."""
    base = size_bytes(settings.memory_limit) if base is None else base
    room = int(WIDE_ROW_VECTORS * min(max(rows, 1), VECTOR_ROWS) * max(0.0, row_bytes - ORDINARY_ROW_BYTES))
    return min(base + room, max(base, ROOM_CAP_BYTES))


# What statements streaming rows past small tables hold besides the rows (a full publish's pass: the
# picks and hash tables of one bucket's ~65,000 keys, a Parquet row group of 8 MB). Under a higher limit
# DuckDB keeps the table blocks it read cached up to the limit, and such a pass, reading every answer
# once per bucket, gains nothing from them: at 1M keys they were 94 MB of the publish's peak RSS.
STREAMING_BASE_BYTES = 48 * 2**20
# The picks that base holds room for (a bucket of a 1M-key job, a part of a larger job's bucket at the
# default BATCH_BRIDGE_PUBLISH_BUCKET_ROWS), and what each pick beyond them holds in the hash table a write
# streams the answers past (`results.current_sql`): its rowid, answer hash and staleness and the table's
# own entry, besides its key's strings. More picks in one write come from a larger
# BATCH_BRIDGE_PUBLISH_BUCKET_ROWS or many keys sharing one answer. Measured on a 10M-key job (~625,000
# picks in one write, keys of 9 and 15 characters): written in 3.3 s within 80 MiB, spilled at 64 MiB (33 s).
STREAMED_PICKS = 65_536
PICK_BYTES = 32


def room_for_streaming(con: duckdb.DuckDBPyConnection, settings: Settings, row_bytes: float, picks: int = 0,
                       key_bytes: float = 0.0) -> ContextManager[None]:
    """Run the enclosed statements, which stream rows `row_bytes` wide past small tables into files, under
    a memory_limit sized to that: STREAMING_BASE_BYTES, a few vectors of the rows, and room for `picks`
    beyond STREAMED_PICKS whose key strings take `key_bytes` on average; without picks never above what
    `room_for_rows` gives. Then restore it. Lowering the limit also lets go of what an earlier step (a
    load) left cached beyond it. A limit the user set is theirs and is kept as it is."""
    if settings.memory_limit_set:
        return nullcontext()
    rows = min(STREAMING_BASE_BYTES + int(WIDE_ROW_VECTORS * VECTOR_ROWS * row_bytes), _rows_limit(settings, row_bytes))
    limit = min(rows + int(max(0, picks - STREAMED_PICKS) * (PICK_BYTES + key_bytes)), max(rows, ROOM_CAP_BYTES))
    return _setting(con, "memory_limit", f"'{limit // 2**20}MiB'")


# What the steps that hash and join a job's whole state need (the plan's staging, classifying and
# request files, the fold of answers into the per-input summaries): their hash tables and temp tables
# spill to disk beyond it. Under the default limit DuckDB keeps the blocks they read cached up to it, and
# at 1M keys that was the run's peak RSS (bench_scale.py: 297 MB in the plan, 229 MB at this limit).
JOINING_BASE_BYTES = 64 * 2**20
# Vectors of prompts the statements that read them hold at once: the vector read, its JSON text
# (`to_json` builds each vector's in an arena of several copies), the line built from it, the writer's
# buffer. Measured writing 100,000 requests on one thread: prompts of 2 KB needed 96MB, 4 KB 144MB.
PROMPT_VECTORS = 16


def room_for_joining(con: duckdb.DuckDBPyConnection, settings: Settings, prompt_vector_bytes: int = 0
                     ) -> ContextManager[None]:
    """Run the enclosed statements, which hash and join a job's whole state (and read its prompts, the
    widest vector of them `prompt_vector_bytes`), under JOINING_BASE_BYTES plus PROMPT_VECTORS such
    vectors, capped at ROOM_CAP_BYTES, then restore the limit. A limit the user set is theirs and is kept."""
    if settings.memory_limit_set:
        return nullcontext()
    limit = min(JOINING_BASE_BYTES + PROMPT_VECTORS * max(0, prompt_vector_bytes), max(JOINING_BASE_BYTES, ROOM_CAP_BYTES))
    return _setting(con, "memory_limit", f"'{limit // 2**20}MiB'")


def grown_until_it_fits(con: duckdb.DuckDBPyConnection, settings: Settings, step: Callable[[], T]) -> T:
    """`step()` (statements that can be run again from the start: temp tables replaced, files rewritten
    whole), run again with twice the memory_limit, up to ROOM_CAP_BYTES, while DuckDB runs out of it;
    the limit is restored after. For the statements that read prompts before their width is known.
    Not for a step inside a transaction begun before it: running out of memory aborts that transaction,
    and the step would run again outside it. A limit the user set is a cap: `step` runs once, under it."""
    if settings.memory_limit_set:
        return step()
    limit = memory_limit(con)
    while True:
        try:
            with _setting(con, "memory_limit", f"'{limit // 2**20}MiB'"):
                return step()
        except duckdb.Error as e:
            if not is_out_of_memory(e) or limit >= ROOM_CAP_BYTES:
                raise
            limit = min(2 * limit, ROOM_CAP_BYTES)


def grow_room(con: duckdb.DuckDBPyConnection, settings: Settings) -> bool:
    """Double the memory_limit, up to ROOM_CAP_BYTES, for statements that ran out of it and will run
    again from the start; only inside a context that restores the limit (`room_for_loading`). False
    when it cannot grow: a limit the user set (a cap), or the cap reached."""
    if settings.memory_limit_set:
        return False
    limit = memory_limit(con)
    if limit >= ROOM_CAP_BYTES:
        return False
    con.execute(f"SET memory_limit = '{min(2 * limit, ROOM_CAP_BYTES) // 2**20}MiB'")
    return True


@contextmanager
def _room(con: duckdb.DuckDBPyConnection, limit: int) -> Iterator[None]:
    with _setting(con, "memory_limit", f"'{limit // 2**20}MiB'"):
        yield
        # What was written with the room is checkpointed with it: DuckDB would otherwise checkpoint the
        # WAL when the connection closes, under the default limit, which fails for rows this wide
        # (2,000 answers of 100 KB at 128MB) and leaves the WAL to be replayed on every open.
        con.execute("CHECKPOINT")


# DuckDB checkpoints whenever its WAL passes checkpoint_threshold (16 MB by default), and a checkpoint
# rewrites a table's last, partly filled row group (up to 122,880 answers): a load committing a slice at
# a time would do that every slice or two. Measured (slices of 8 MB): 60 commits of 14,000 rows of 500 bytes took
# 8.3 s with automatic checkpoints, 1.7 s without, at the same peak RSS.
LOAD_WAL_LIMIT = "4GB"


@contextmanager
def one_checkpoint(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Run the enclosed commits (a batch's load, slice by slice) without automatic checkpoints, then
    checkpoint once: the WAL holds at most what they committed, replayed on the next open after a crash."""
    with _setting(con, "checkpoint_threshold", f"'{LOAD_WAL_LIMIT}'"):
        yield
        con.execute("CHECKPOINT")


def joins_as_written(con: duckdb.DuckDBPyConnection) -> ContextManager[None]:
    """Run the enclosed statements with joins in the order written: the right side of each join is
    the one built into a hash table, the left side streams past it.

    For the statements that move answers and prompts (loading result files, publishing Parquet,
    sizing and writing request lines): their wide rows belong on the streaming side, but DuckDB
    guesses a result file at a few dozen rows whatever its size, and its optimizers would build the
    hash table from it, answer text and all (measured: a 100,000-line batch then did not load within
    a 128MB memory_limit). Those statements are written with the wide rows on the left.
    """
    return _setting(con, "disabled_optimizers", "'join_order,build_side_probe_side'")


def is_lock_error(e: Exception) -> bool:
    """DuckDB's answer when another process holds a file (one writer, or readers, at a time)."""
    text = str(e)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set" in text)


def wait_for_lock(
    action: Callable[[], T], *, timeout: float, locked: Callable[[], BatchBridgeError],
    failed: Callable[[Exception], BatchBridgeError], sleep: Callable[[float], None] = time.sleep,
    first_delay: float = 0.05, max_delay: float = 1.0,
) -> T:
    """Run a DuckDB open or ATTACH, retrying with backoff while another process holds the file.

    `locked()` is raised once `timeout` seconds have passed; any other IO error is `failed(e)`.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            return action()
        except duckdb.IOException as e:
            if not is_lock_error(e):
                raise failed(e) from e
            if time.monotonic() >= deadline:
                raise locked() from e
            sleep(delay)
            delay = min(delay * 2, max_delay)


# The name of the warehouse a home serves, in a plain file the user can read and correct.
OWNER_FILE = "warehouse"


def _warehouse_name(settings: Settings) -> str:
    return settings.warehouse.name if isinstance(settings.warehouse, Path) else str(settings.warehouse)


def claim_home(settings: Settings) -> None:
    """Record which warehouse the home serves, or stop if it serves another one.

    The default home is `.batch_bridge/` next to the warehouse, so two targets whose warehouse files
    share a folder (dev.duckdb, ci.duckdb) would share one state and one results source, and each
    would publish its answers over the other's. By file name, so a project folder moved or copied
    whole keeps its home."""
    marker = settings.home / OWNER_FILE
    name = _warehouse_name(settings)
    try:
        recorded = marker.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    if not recorded:
        marker.write_text(name + "\n")
        return
    if recorded != name:
        raise ConfigError(
            f"the bridge home {settings.home} holds the state and results of the warehouse {recorded!r}, and "
            f"this command's warehouse is {name!r} (target {settings.target!r}): sharing one home, the two "
            "would overwrite each other's answers",
            hint=f"give each target its own home: set BATCH_BRIDGE_HOME for this target, for batch-bridge and "
            f"for dbt alike (for example BATCH_BRIDGE_HOME=.batch_bridge_{settings.target or 'dev'}); if the "
            f"warehouse was renamed and this home is its own, write {name!r} into {marker}",
        )


def _open(settings: Settings, *, sleep: Callable[[float], None], read_only: bool) -> duckdb.DuckDBPyConnection:
    """Open the state file (creating and migrating it), waiting out another process's lock."""
    settings.home.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.home, 0o700)
    claim_home(settings)
    path = settings.state_path

    def open_state() -> duckdb.DuckDBPyConnection:
        if read_only and path.exists():
            return duckdb.connect(str(path), read_only=True)
        c = duckdb.connect(str(path))
        os.chmod(path, 0o600)
        return c

    con = wait_for_lock(
        open_state, timeout=settings.lock_timeout, sleep=sleep,
        failed=lambda e: StateError(f"cannot open the bridge state {path}: {e}"),
        locked=lambda: StateLocked(
            f"the bridge state {path} is held by another process",
            hint="another batch-bridge command is running; retry when it ends "
            f"(waited {settings.lock_timeout:g}s, BATCH_BRIDGE_LOCK_TIMEOUT)",
        ),
    )
    try:
        _configure(con, settings)
        if not read_only:
            migrate(con)
    except BaseException:
        con.close()
        raise
    return con


class _Kept:
    """The state database held open by `kept_open`: `con` is None while `let_go` has released it."""

    def __init__(self, con: duckdb.DuckDBPyConnection | None) -> None:
        self.con = con


_kept: dict[str, _Kept] = {}  # by state path: at most one per database in this process


@contextmanager
def connect(
    settings: Settings, *, sleep: Callable[[float], None] = time.sleep, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the state database: a cursor of the one `kept_open` holds, else the file opened
    now (creating and migrating it, waiting out another process's lock) and closed at the end."""
    kept = _kept.get(str(settings.state_path))
    con = kept.con.cursor() if kept is not None and kept.con is not None else _open(settings, sleep=sleep, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def kept_open(settings: Settings) -> Iterator[None]:
    """Hold the state database open across the steps inside, so that each `connect` in them is a cursor
    (~0.5 ms) instead of opening the file (~25 ms, and a checkpoint at each close): a small `run` opens
    it about 15 times before its batch is created. The file stays locked to other processes meanwhile,
    so a step that waits (a create, a download, a retry's sleep, the sync lane's calls) runs under
    `let_go`, and another command (`status`) gets in then, as between separate opens."""
    key = str(settings.state_path)
    if key in _kept:  # nested: the outer one holds it
        yield
        return
    kept = _kept[key] = _Kept(_open(settings, sleep=time.sleep, read_only=False))
    try:
        yield
    finally:
        del _kept[key]
        if kept.con is not None:
            kept.con.close()


@contextmanager
def let_go(settings: Settings) -> Iterator[None]:
    """Release the database `kept_open` holds for a step that waits, and take it again after."""
    kept = _kept.get(str(settings.state_path))
    if kept is None or kept.con is None:
        yield
        return
    kept.con.close()
    kept.con = None
    yield  # after an error it stays released: each `connect` opens the file, as without kept_open
    kept.con = _open(settings, sleep=time.sleep, read_only=False)


@contextmanager
def exclusive(settings: Settings, *, wait: float | None = None, sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
    """Hold the project's process lock: only one submit/collect/sync/run/cancel at a time."""
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "bridge.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    wait = settings.lock_timeout if wait is None else wait
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = Path(path).read_text().strip() or "unknown"
                    raise StateLocked(
                        f"another batch-bridge process ({holder}) is working on {settings.home}",
                        hint="two processes must not submit at once; this one sent nothing. "
                        "Retry after it ends, or raise BATCH_BRIDGE_LOCK_TIMEOUT to wait longer",
                    ) from None
                sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {utcnow().isoformat(timespec='seconds')}Z".encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


# --- named state transitions -------------------------------------------------------------------


def _move(
    con: duckdb.DuckDBPyConnection, table: str, id_col: str, ident: str, col: str,
    allowed_from: tuple[str, ...], to: str, sets: dict[str, object] | None = None,
) -> None:
    row = con.execute(f"SELECT {col} FROM {table} WHERE {id_col} = ?", [ident]).fetchone()
    if row is None:
        raise StateError(f"{table}: no row {ident!r}")
    if row[0] not in allowed_from:
        raise InvalidStateTransition(table.rstrip("s"), ident, row[0], to, allowed_from)
    sets = {col: to, **(sets or {})}
    assignments = ", ".join(f"{k} = ?" for k in sets)
    con.execute(f"UPDATE {table} SET {assignments} WHERE {id_col} = ?", [*sets.values(), ident])


def start_create(con: duckdb.DuckDBPyConnection, submission_id: str, now: datetime | None = None) -> None:
    """Journal that the create call is about to go out (the crash window starts here)."""
    now = now or utcnow()
    _move(con, "submissions", "submission_id", submission_id, "state", ("prepared", "creating"), "creating",
          {"create_started_at": now, "outcome_unknown_at": None})
    con.execute("UPDATE submissions SET first_create_at = coalesce(first_create_at, ?) WHERE submission_id = ?",
                [now, submission_id])


def mark_outcome_unknown(con: duckdb.DuckDBPyConnection, submission_id: str, at: datetime, why: str) -> None:
    """The create may or may not have happened (timeout, reset, 5xx, a crash): from `at` on, its batch
    is looked for in `list` for a whole grace before the file is sent again."""
    _move(con, "submissions", "submission_id", submission_id, "state", ("creating",), "creating",
          {"outcome_unknown_at": at, "note": why})


def record_created(con: duckdb.DuckDBPyConnection, submission_id: str, batch_id: str, note: str | None = None,
                   *, adopted: bool = False) -> None:
    _move(con, "submissions", "submission_id", submission_id, "state", ("creating",), "created",
          {"batch_id": batch_id, "created_at": utcnow(), "note": note, "adopted": adopted})


def start_sync(con: duckdb.DuckDBPyConnection, submission_id: str, run_id: str, request_count: int,
               now: datetime | None = None) -> None:
    """A sync-lane submission starts its calls: it gets a local run id and a `batches` row (lane sync,
    `in_progress`) whose result file is its answers file, so that the batch loader loads it."""
    now = now or utcnow()
    row = con.execute("SELECT job, lane FROM submissions WHERE submission_id = ?", [submission_id]).fetchone()
    if row is not None and row[1] != "sync":
        raise InvalidStateTransition("submission", submission_id, f"lane {row[1]}", "sync calls", ("lane sync",))
    _move(con, "submissions", "submission_id", submission_id, "state", ("prepared",), "created",
          {"batch_id": run_id, "created_at": now, "create_started_at": now, "first_create_at": now})
    con.execute(
        "INSERT INTO batches (batch_id, job, submission_id, processing_status, local_state, request_count, "
        "processing, created_at, polled_at, lane) VALUES (?, ?, ?, 'in_progress', 'submitted', ?, ?, ?, ?, 'sync')",
        [run_id, row[0], submission_id, request_count, request_count, now, now],
    )


def end_sync(con: duckdb.DuckDBPyConnection, run_id: str, answers_file: str, lines: int, size: int,
             counts: dict[str, int]) -> None:
    """Every request of a sync-lane run has its answer in the answers file: it is ended and ready to load."""
    now = utcnow()
    con.execute(
        "UPDATE batches SET processing_status = 'ended', ended_at = ?, processing = 0, succeeded = ?, errored = ? "
        "WHERE batch_id = ? AND lane = 'sync'",
        [now, counts.get("succeeded", 0), counts.get("errored", 0), run_id],
    )
    mark_downloaded(con, run_id, answers_file, lines, size)


def refuse_create(con: duckdb.DuckDBPyConnection, submission_id: str, why: str) -> None:
    """Nothing was created (429/529, or an account that cannot create): the file is sent again later."""
    _move(con, "submissions", "submission_id", submission_id, "state", ("creating",), "prepared",
          {"note": why, "outcome_unknown_at": None})


def abandon_submission(con: duckdb.DuckDBPyConnection, submission_id: str, why: str) -> None:
    """The create certainly did not happen and never will as it is: its rows are no longer in flight."""
    _move(con, "submissions", "submission_id", submission_id, "state", ("prepared", "creating"), "abandoned",
          {"note": why})


def release_foreign(con: duckdb.DuckDBPyConnection, batch_id: str, why: str) -> str:
    """A batch adopted on its request count holds another client's answers: it is recorded as foreign
    (never loaded, cancelled or deleted) and its submission goes back to looking for its own batch.
    Returns the submission id."""
    row = con.execute("SELECT b.submission_id, b.job, b.request_count, b.created_at, s.adopted FROM batches b "
                      "JOIN submissions s USING (submission_id) WHERE b.batch_id = ?", [batch_id]).fetchone()
    if row is None:
        raise StateError(f"batches: no row {batch_id!r}")
    sub, job, count, created, adopted = row
    if not adopted:
        raise StateError(f"batch {batch_id} was created by this bridge, not adopted: it cannot be foreign")
    forget_loaded_slices(con, batch_id)
    _move(con, "batches", "batch_id", batch_id, "local_state", ("submitted", "downloaded"), "foreign", {"note": why})
    con.execute("INSERT INTO foreign_batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                [batch_id, sub, job, count, created, utcnow(), why])
    _move(con, "submissions", "submission_id", sub, "state", ("created",), "creating",
          {"batch_id": None, "created_at": None, "adopted": False,
           "note": f"batch {batch_id} adopted for it proved foreign; looking for its own batch"})
    return sub


def mark_downloaded(con: duckdb.DuckDBPyConnection, batch_id: str, result_file: str, lines: int, size: int) -> None:
    _move(con, "batches", "batch_id", batch_id, "local_state", ("submitted", "downloaded"), "downloaded",
          {"result_file": result_file, "result_lines": lines, "result_bytes": size, "loaded_lines": 0,
           "loaded_bytes": 0})


def record_slice(con: duckdb.DuckDBPyConnection, batch_id: str, lines: int, end: int) -> None:
    """A slice of a downloaded batch's result file is loaded: the next one starts at line `lines`,
    byte `end`. Run in the slice's own transaction, with its INSERT."""
    _move(con, "batches", "batch_id", batch_id, "local_state", ("downloaded",), "downloaded",
          {"loaded_lines": lines, "loaded_bytes": end})


def forget_loaded_slices(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    """Remove what slices of a batch not yet collected put in `responses` (a batch's answers are
    loaded whole or not at all: it is marked collected with its last slice). Run in the
    transaction of the move that gives up the file."""
    con.execute("DELETE FROM responses WHERE batch_id = ?", [batch_id])
    con.execute("UPDATE batches SET loaded_lines = 0, loaded_bytes = 0 WHERE batch_id = ?", [batch_id])


def mark_collected(con: duckdb.DuckDBPyConnection, batch_id: str) -> None:
    _move(con, "batches", "batch_id", batch_id, "local_state", ("downloaded",), "collected",
          {"collected_at": utcnow()})


def discard_download(con: duckdb.DuckDBPyConnection, batch_id: str, why: str) -> None:
    """The downloaded file cannot be loaded (corrupt): forget it, and the slices of it already loaded
    (a new download may order its lines otherwise), so the next collect downloads and loads it again.
    Run in a transaction."""
    forget_loaded_slices(con, batch_id)
    _move(con, "batches", "batch_id", batch_id, "local_state", ("downloaded",), "submitted",
          {"result_file": None, "result_lines": None, "result_bytes": None, "note": why})


def mark_lost(con: duckdb.DuckDBPyConnection, batch_id: str, why: str) -> None:
    """Results can no longer be had (deleted, archived): its rows become pending again."""
    _move(con, "batches", "batch_id", batch_id, "local_state", ("submitted", "downloaded"), "lost", {"note": why})


def give_up(con: duckdb.DuckDBPyConnection, batch_id: str, cause: str) -> Literal["lost", "released"]:
    """A batch whose results can no longer be had (`cause`): lost (`mark_lost`, its rows are sent
    again), unless it was adopted on its request count and no answer of it has confirmed it as ours.
    Then it may be another client's batch that its owner deleted, while ours, of unknown outcome, is
    still in the workspace: sending the rows again would pay twice. It is released like a foreign
    batch (`release_foreign`), and its submission looks for its own batch in `list` again; if that
    batch is gone too, the reconcile grace has long passed and the rows are sent again."""
    row = con.execute("SELECT s.adopted FROM batches b JOIN submissions s USING (submission_id) "
                      "WHERE b.batch_id = ?", [batch_id]).fetchone()
    if row is not None and row[0]:
        in_transaction(con, lambda: release_foreign(
            con, batch_id, f"adopted on its request count, then gone ({cause}) before any answer showed it ours"))
        return "released"
    mark_lost(con, batch_id, f"{cause}; its rows are sent again by the next submit")
    return "lost"


# Answers folded into the summaries in one pass at most (whole batches; one larger batch alone): a pass
# scans the job's whole `input_outcomes` and `key_inputs` whatever it folds, so folding batch by batch
# made collecting quadratic (measured: 0.15 s a batch at 1M keys, 0.81 s at 10M), while the pass's hash
# tables grow with what it folds.
FOLD_ANSWERS = 1_000_000


def owe_outcomes(con: duckdb.DuckDBPyConnection, job: str, batch_id: str, answers: int) -> None:
    """A batch just collected still has to be folded into the summaries (`fold_outcomes`). Run in the
    transaction that marks it collected, so that no collected batch is ever left out of them."""
    con.execute("INSERT INTO bb_state.unfolded_batches VALUES (?, ?, ?)", [job, batch_id, answers])


def fold_outcomes(con: duckdb.DuckDBPyConnection, job: str | None = None, at_least: int = 0,
                  pass_answers: int = FOLD_ANSWERS) -> int:
    """Fold the answers of collected batches not yet folded (of `job`, or of every job) into
    `input_outcomes` and `key_inputs.answered`, in passes of whole batches of up to `pass_answers`
    answers, each in a transaction of its own. Does nothing while fewer than `at_least` answers wait.
    Returns the batches folded.

    Every reader of the summaries (plan, status, report) folds first, and each command that loads folds
    what it loaded before it ends, so they always say what `responses` says when they are read."""
    where, params = ("WHERE job = ?", [job]) if job is not None else ("", [])
    owed = con.execute(f"SELECT job, batch_id, answers FROM bb_state.unfolded_batches {where} ORDER BY rowid",
                       params).fetchall()
    if not owed or sum(a for _, _, a in owed) < at_least:
        return 0
    passes: list[tuple[str, list[str]]] = []
    size = 0
    for name, batch_id, answers in owed:
        if not passes or passes[-1][0] != name or size + answers > pass_answers:
            passes.append((name, []))
            size = 0
        passes[-1][1].append(batch_id)
        size += answers
    for name, ids in passes:
        in_transaction(con, lambda: _fold_pass(con, name, ids))
    return len(owed)


def _fold_pass(con: duckdb.DuckDBPyConnection, job: str, batch_ids: list[str]) -> None:
    _record_outcomes(con, job, batch_ids)
    con.execute("DELETE FROM bb_state.unfolded_batches WHERE job = ? AND list_contains(?, batch_id)", [job, batch_ids])


def _record_outcomes(con: duckdb.DuckDBPyConnection, job: str, batch_ids: list[str]) -> None:
    """Fold the responses of `batch_ids` into `input_outcomes`, and mark the keys whose current input
    now has an answer. Run inside the fold's transaction, so both stay exactly what `responses` says."""
    ids = ", ".join("'" + b.replace("'", "''") + "'" for b in batch_ids)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_new_outcomes AS " + outcomes_select(f"job = $job AND batch_id IN ({ids})"),
        {"job": job},
    )
    con.execute(
        """
        MERGE INTO bb_state.input_outcomes t
        USING bb_new_outcomes n ON t.job = n.job AND t.input_hash = n.input_hash
        WHEN MATCHED THEN UPDATE SET succeeded = t.succeeded OR n.succeeded, retryable = t.retryable + n.retryable,
                                     parse_failed = t.parse_failed + n.parse_failed, invalid = t.invalid OR n.invalid
        WHEN NOT MATCHED THEN INSERT VALUES (n.job, n.input_hash, n.succeeded, n.retryable, n.parse_failed, n.invalid)
        """
    )
    con.execute(
        """
        UPDATE bb_state.key_inputs SET answered = true
        WHERE job = $job AND NOT answered AND input_hash IN (SELECT input_hash FROM bb_new_outcomes WHERE succeeded)
        """,
        {"job": job},
    )
    con.execute("DROP TABLE bb_new_outcomes")


def record_published(con: duckdb.DuckDBPyConnection, job: str, buckets: int, layout: str,
                     versions: tuple[datetime | None, int], responses: tuple[datetime | None, int]) -> None:
    """The job's results files now show every `key_versions` and `responses` row up to these marks;
    called only once all of its bucket files are in place."""
    if buckets < 1:
        raise StateError(f"published: {buckets} buckets for job {job!r}; a results source has at least one file")
    con.execute(
        "INSERT OR REPLACE INTO bb_state.published VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [job, buckets, layout, versions[0], versions[1], responses[0], responses[1], utcnow()])
