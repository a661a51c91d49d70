"""The results source dbt reads: Parquet files per job, written atomically, never a lock on anything.

`current.parquet` holds one row per key: the latest answer for the key's current input, or, when the
input changed and has no answer yet, the latest earlier answer flagged `is_stale`. It is a directory of
bucket files (keys split by hash; a large bucket in parts), which `read_parquet` reads as one table: a
publish rewrites only the files whose keys changed, so one new answer in a 1M-row job is published in a fraction of a second.
`history/` holds one part per collected batch with every (key, answer) pair it produced. Keys get their
original names and types back from `jobs.key_types`; schema fields become typed columns through `json_transform`. An identical request sent once for
several keys is attributed to the key that was sent (`cost_usd`), the others are `deduplicated`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from typing import Callable, get_args

import duckdb

from .config import Settings
from .jobs import Job, quote_ident, quote_literal
from .outputs import field_structures
from .state import (ResultType, grown_until_it_fits, joins_as_written, record_published,
                    room_for_rows, room_for_streaming, single_threaded)

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


def _projection(con: duckdb.DuckDBPyConnection, job: Job, stale: str = "h.input_hash <> h.current_hash") -> str:
    """Result columns over a relation `h` of (custom_id, key_json, current_hash, response columns...),
    or with `stale` (whether the answer is for an earlier input) in place of current_hash."""
    keys = ", ".join(
        f"CAST(json_extract_string(h.key_json, '$[{i}]') AS {typ}) AS {quote_ident(name)}"
        for i, (name, typ) in enumerate(_key_types(con, job))
    )
    fields = ""
    schema = job.answer_schema
    if schema is not None and field_structures(schema):
        struct = json.dumps(field_structures(schema))
        # Typed only for answers that matched the schema: a parse_failed answer's JSON may hold values
        # the schema forbids (an enum's stray value), which the source's tests would then fail on.
        fields = "".join(
            f", CASE WHEN h.status = 'succeeded' THEN json_transform(h.output_json, {quote_literal(struct)})"
            f".{quote_ident(k)} END AS {quote_ident(k)}"
            for k in field_structures(schema)
        )
    return f"""
        SELECT {keys},
               h.custom_id, h.status, h.output_text, h.output_json{fields},
               h.stop_reason, h.model, h.input_tokens, h.output_tokens,
               h.cache_creation_input_tokens, h.cache_read_input_tokens,
               CASE WHEN h.request_custom_id = h.custom_id THEN h.cost_usd ELSE 0 END AS cost_usd,
               h.request_custom_id <> h.custom_id AS deduplicated,
               {stale} AS is_stale,
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


# An answer's place in time as one BIGINT: when it was collected, then its attempt (at most max_attempts + 1,
# and max_attempts is at most 100; jobs.py). arg_max over a struct of the two keeps a variable-size state
# per group: a full rewrite's pass of ~625,000 keys (a 10M-key job) spilled at 128MB and picked in 2.8 s,
# against 1.2 s without spilling over this key (measured apart; bench_full_rewrite.py's 10M rewrite: 84 s
# against 129 s). Exact until the year 2255.
LATEST = "epoch_us(collected_at) * 1024 + least(attempt, 1023)"


def pick_current(con: duckdb.DuckDBPyConnection, job: Job, buckets: int = 1, keys: str | None = None,
                 bucket: int | None = None) -> None:
    """`bb_picked`: one row per key with the rowid (`rid`) of the answer the results source shows for it:
    the latest answer for its current input, else its latest earlier answer (`stale`); a hash of that
    answer's input (`answer_key`, see `current_sql`), the key's values and its bucket
    (`hash(custom_id) % buckets`). With `keys` (a relation with a `custom_id` column), just those keys;
    with `bucket`, just the keys of that bucket. Either way just their answers are aggregated: picking a
    few keys costs milliseconds, whatever the job's size, and a bucket holds ~1/`buckets` of the picks.

    Each key's current input and key values are one row of `key_inputs`; only keys without an answer
    for their current input look at their earlier versions (in `key_versions`). Hash aggregates only
    (the rowid of the latest answer per input), no window over history and no row-sized aggregate
    state, so the cost grows with the number of keys. One statement per table, each holding at most two
    hash tables of the keys: in one statement with CTEs, a full rewrite's pass of ~625,000 keys (a
    10M-key job) needed the default 128MB (141 MB above the process's RSS before it); in these, within the
    publish's 52 MiB (76 MB above), in the same 1.1-1.3 s (measured apart on a 10M-key state).
    """
    job_lit = quote_literal(job.name)
    only = [f"job = {job_lit}"]
    if keys is not None:
        only.append(f"custom_id IN (SELECT custom_id FROM {keys})")
    if bucket is not None:
        only.append(f"hash(custom_id) % {int(buckets)} = {int(bucket)}")
    # The keys once, in a table: read three times below (measured at 10M keys, a bucket of ~625,000
    # picked in 2.4-3.0 s, against 3.2 s when their versions were aggregated for the current input and key).
    con.execute(f"""CREATE OR REPLACE TEMP TABLE bb_latest AS
                    SELECT custom_id, input_hash AS current_hash, key_json FROM bb_state.key_inputs
                    WHERE {" AND ".join(only)}""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE bb_best AS
                    SELECT input_hash, arg_max(rowid, {LATEST}) AS rid FROM bb_state.responses
                    WHERE job = {job_lit} AND input_hash IN (SELECT current_hash FROM bb_latest)
                    GROUP BY input_hash""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE bb_picked AS
                    SELECT l.custom_id, l.key_json, b.rid, hash(l.current_hash) AS answer_key, false AS stale,
                           hash(l.custom_id) % {int(buckets)} AS bucket
                    FROM bb_latest l LEFT JOIN bb_best b ON b.input_hash = l.current_hash""")
    con.execute("DROP TABLE bb_best")
    (missing,) = con.execute("SELECT count(*) FROM bb_picked WHERE rid IS NULL").fetchone()
    if missing:  # keys without an answer for their current input: their latest earlier answer, if any
        con.execute(f"""
            INSERT INTO bb_picked
            WITH earlier AS (
                SELECT l.custom_id, l.key_json, v.input_hash
                FROM bb_state.key_versions v
                JOIN (SELECT * FROM bb_latest WHERE custom_id IN (SELECT custom_id FROM bb_picked WHERE rid IS NULL)) l
                  ON v.custom_id = l.custom_id AND v.input_hash <> l.current_hash
                WHERE v.job = {job_lit}
            ),
            best_earlier AS (
                SELECT input_hash, arg_max(rowid, {LATEST}) AS rid, max(collected_at) AS at
                FROM bb_state.responses
                WHERE job = {job_lit} AND input_hash IN (SELECT input_hash FROM earlier) GROUP BY input_hash
            )
            SELECT e.custom_id, e.key_json, e.a.rid, hash(e.a.input_hash), true, hash(e.custom_id) % {int(buckets)}
            FROM (SELECT e.custom_id, e.key_json,
                         arg_max(struct_pack(rid := b.rid, input_hash := b.input_hash), b.at) AS a
                  FROM earlier e JOIN best_earlier b ON b.input_hash = e.input_hash
                  GROUP BY e.custom_id, e.key_json) e
        """)
        con.execute("DELETE FROM bb_picked WHERE rid IS NULL")
    con.execute("DROP TABLE bb_latest")


def current_sql(con: duckdb.DuckDBPyConnection, job: Job, bucket: int | None = None,
                rids: tuple[int, int] | None = None) -> str:
    """One row per key (after `pick_current`), or per key of one bucket: its picked answer, answer text
    streaming past the picks. With `rids` (lo, hi), only the picks of answers whose rowid is in (lo, hi]:
    DuckDB then reads only the answers' row groups in that range.

    Joined on a hash of the answer's input as well as its rowid: joined on the rowid alone, DuckDB held
    memory outside its memory_limit that grew with the answers scanned (measured at 1M answers: each
    bucket's write peaked ~40 MB higher). A hash (8 bytes) rather than the input hash (16) and the
    staleness rather than the current input keep the hash table of the picks small."""
    only = [] if bucket is None else [f"p.bucket = {int(bucket)}"]
    if rids is not None:
        lo, hi = (int(x) for x in rids)
        only += [f"p.rid > {lo}", f"p.rid <= {hi}", f"r.rowid > {lo}", f"r.rowid <= {hi}"]
    where = f" WHERE {' AND '.join(only)}" if only else ""
    return _projection(con, job, stale="h.stale") + f"""
        FROM (
            SELECT p.custom_id, p.key_json, p.stale, r.*
            FROM bb_state.responses r JOIN bb_picked p ON hash(r.input_hash) = p.answer_key AND r.rowid = p.rid{where}
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


def _write(con: duckdb.DuckDBPyConnection, query: str, dest: Path, tmp: Path | None = None) -> None:
    tmp = tmp or dest.with_name(f".{dest.name}.tmp")
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


# --- the current answers: a directory of bucket files -------------------------------------------------

# `current.parquet` is a directory (as Spark writes a dataset): DuckDB reads a directory path as all the
# Parquet files in it, so `read_parquet('.../current.parquet')`, the location sources have always used,
# reads the union of the buckets. Each key lives in exactly one file, so the union is one row per key.
CURRENT = "current.parquet"
# A full rewrite writes each bucket in a pass of its own over the answers (a partitioned COPY held a row
# group per open bucket and ran out of 128MB at 64 buckets): capping the count keeps it linear in rows.
MAX_BUCKETS = 16


def bucket_file(bucket: int, buckets: int, part: int = 0) -> str:
    """The file of one bucket, or of a part of it after the first; the count is in the name, so files of
    another split are recognized."""
    return f"{bucket:03d}-of-{buckets:03d}.parquet" if part == 0 else f"{bucket:03d}-of-{buckets:03d}.{part}.parquet"


_BUCKET_FILE = re.compile(r"(\d{3})-of-(\d{3})(?:\.([1-9]\d*))?\.parquet")


def _bucket_files(current: Path, buckets: int) -> dict[int, list[Path]] | None:
    """Each bucket's files under `current`, its first file first; None unless every file there is a file
    of this split and every bucket has its first."""
    if not current.is_dir():
        return None
    found: dict[int, list[tuple[int, Path]]] = {}
    for p in current.iterdir():
        m = _BUCKET_FILE.fullmatch(p.name)
        if not m or int(m.group(2)) != buckets or int(m.group(1)) >= buckets:
            return None
        found.setdefault(int(m.group(1)), []).append((int(m.group(3) or 0), p))
    if any(b not in found or min(found[b])[0] != 0 for b in range(buckets)):
        return None
    return {b: [p for _, p in sorted(found[b])] for b in range(buckets)}


def bucket_count(keys: int, bucket_rows: int) -> int:
    """Buckets for a job of `keys` keys: about `bucket_rows` keys each, at least 1, at most MAX_BUCKETS."""
    return max(1, min(MAX_BUCKETS, -(-keys // bucket_rows)))


def _layout(con: duckdb.DuckDBPyConnection, job: Job) -> str:
    """What every bucket file was written under: the row projection (key types, schema fields) and the
    DuckDB whose hash() split the keys (its hash is not promised across versions)."""
    return hashlib.md5((_projection(con, job) + duckdb.__version__).encode()).hexdigest()


def _marks(con: duckdb.DuckDBPyConnection, table: str, column: str, job: Job, until: object) -> tuple[object, int, int]:
    """(latest `column` now, rows now, rows at or before `until`) of the job's rows in `table`."""
    max_at, rows, before = con.execute(
        f"SELECT max({column}), count(*), count(*) FILTER (WHERE {column} <= ?) FROM bb_state.{table} WHERE job = ?",
        [until, job.name]).fetchone()
    return max_at, rows, before


def _dirty_keys(con: duckdb.DuckDBPyConnection, job: Job, buckets: int, versions_until: object,
                responses_until: object) -> int:
    """`bb_dirty`: the keys with a new input since the marks, or one of whose inputs got a new answer,
    with their buckets. Returns how many."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bb_dirty AS
        SELECT DISTINCT custom_id, hash(custom_id) % {int(buckets)} AS bucket FROM bb_state.key_versions
        WHERE job = $job AND (seen_at > coalesce($vu::TIMESTAMP, '-infinity'::TIMESTAMP) OR input_hash IN (
            SELECT input_hash FROM bb_state.responses
            WHERE job = $job AND collected_at > coalesce($ru::TIMESTAMP, '-infinity'::TIMESTAMP)))
        """, {"job": job.name, "vu": versions_until, "ru": responses_until})
    return con.execute("SELECT count(*) FROM bb_dirty").fetchone()[0]


def _publish_current(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, out: Path,
                     fault: Callable[[str], None]) -> None:
    """Rewrite the buckets whose keys changed since the last publish, or all of them when the marks,
    the layout or the files cannot be trusted, or when an eighth of the keys or more changed.

    A changed bucket is merged: its file's rows of unchanged keys, and the changed keys picked again, so
    one new answer costs a read and a write of one bucket, never a pass over every answer. Its file is
    replaced atomically: every key is in one file, so a reader sees each key once, old or new. A full
    rewrite builds a new directory and swaps it in, so a reader never sees two splits at once. The marks
    (`state.record_published`) move only after the files: a publish killed in between leaves them behind,
    and the next one merges at least the same keys again (merging a key twice gives the same row)."""
    current, fresh, old = out / CURRENT, out / f".{CURRENT}.new", out / f".{CURRENT}.old"
    shutil.rmtree(fresh, ignore_errors=True)  # left by a publish killed before its swap
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    for tmp in out.glob(".bucket-*.tmp"):
        tmp.unlink()
    row = con.execute(
        "SELECT buckets, layout, versions_until, versions_rows, responses_until, responses_rows "
        "FROM bb_state.published WHERE job = ?", [job.name]).fetchone()
    (keys,) = con.execute("SELECT count(*) FROM bb_state.key_inputs WHERE job = ?", [job.name]).fetchone()
    want = bucket_count(keys, settings.publish_bucket_rows)
    layout = _layout(con, job)
    v_until, v_rows, v_before = _marks(con, "key_versions", "seen_at", job, row[2] if row else None)
    r_until, r_rows, r_before = _marks(con, "responses", "collected_at", job, row[4] if row else None)
    merge = False
    split: dict[int, list[Path]] | None = None  # each bucket's files, when they are exactly the recorded split
    if row is not None:
        buckets, had_layout, vu, vrows, ru, rrows = row
        split = _bucket_files(current, buckets)
        # The split is kept while the job is within a factor 2 of its size; beyond, all is rewritten once.
        if (had_layout == layout and want < 2 * buckets and 2 * want > buckets
                and split is not None
                and (v_before, r_before) == (vrows, rrows)):  # else rows went back in time or were removed
            want = buckets
            changed = _dirty_keys(con, job, buckets, vu, ru)
            if changed == 0:
                return  # nothing new since the marks (so the marks are those of now)
            # Merging costs time per changed key, the full rewrite per key: at 1M keys, 10% changed merged in
            # 4-8 s (bench_publish.py), 40% in 14 s (measured once on that state), all written in 10 s: below an
            # eighth, merging is the faster.
            merge = 8 * changed < keys
    try:
        if merge:
            # Under the limit for streaming: up to an eighth of the keys are picked at once, but the pick
            # reads no answer text (100,000 keys of a 10M-key job picked within 32MiB), and under more
            # room DuckDB keeps what it read cached up to it (bench_publish.py). Run again with more
            # room if it runs out: merging a bucket twice gives the same file.
            grown_until_it_fits(con, settings, lambda: _merge_buckets(con, job, want, split, out, fault))
        else:
            fresh.mkdir()
            row_bytes = _answer_bytes(con, job)
            for b in range(want):
                # A pass per bucket, its keys picked: it holds ~1/`want` of the picks (all 1M picks at once
                # held 70 MB, docs/PERFORMANCE.md). Past the cap (~625,000 keys a bucket at 10M) the bucket is
                # written in parts (`_part_ranges`), each a file of its own, so a write's hash table holds
                # at most ~`publish_bucket_rows` picks: in one file, its 625,000 picks took 76-77 MB above
                # the RSS before the write (with room for them beyond the limit for streaming), in parts
                # of 62,500 45-49 MB, in the same 4-5 s (measured apart on a 10M-key state). A part
                # reads only its answers' row groups, so the parts of a bucket read its answers once.
                # Each step runs again with more room if DuckDB runs out: a hash table just too large for
                # its limit did not spill (1M picks at 128MB, measured), and picking or writing twice
                # gives the same.
                grown_until_it_fits(con, settings, lambda: pick_current(con, job, want, bucket=b))
                for part, rids in enumerate(_part_ranges(con, settings.publish_bucket_rows)):
                    in_part = "" if rids is None else f" WHERE rid > {rids[0]} AND rid <= {rids[1]}"
                    picks, key_bytes = con.execute(
                        "SELECT count(*), coalesce(avg(strlen(custom_id) + strlen(key_json)), 0) FROM bb_picked"
                        + in_part).fetchone()
                    dest = fresh / bucket_file(b, want, part)
                    with room_for_streaming(con, settings, row_bytes, picks, key_bytes):
                        grown_until_it_fits(con, settings, lambda: _write(con, current_sql(con, job, b, rids), dest))
                if b == 0:
                    fault("publish_between_buckets")
            _swap(fresh, current, old)
    finally:
        for t in ("bb_latest", "bb_best", "bb_picked", "bb_dirty", "bb_changed", "bb_home", "bb_changed_here"):
            con.execute(f"DROP TABLE IF EXISTS {t}")
    record_published(con, job.name, want, layout, (v_until, v_rows), (r_until, r_rows))


def _part_ranges(con: duckdb.DuckDBPyConnection, part_rows: int) -> list[tuple[int, int] | None]:
    """Ranges (lo, hi] of answer rowids splitting `bb_picked` into parts of about `part_rows` picks (keys
    sharing one answer stay in one part), or [None]: one part of every pick. Rounded to the nearest count
    of parts, so buckets a little over `part_rows` (the hash's spread below the bucket cap) stay whole."""
    picks, lo, hi = con.execute("SELECT count(*), min(rid), max(rid) FROM bb_picked").fetchone()
    parts = int(picks / max(1, part_rows) + 0.5)
    if parts <= 1:
        return [None]
    (cuts,) = con.execute(
        f"SELECT quantile_disc(rid, {[i / parts for i in range(1, parts)]}) FROM bb_picked").fetchone()
    bounds = sorted({lo - 1, hi, *cuts})
    return list(zip(bounds, bounds[1:]))


def _merge_buckets(con: duckdb.DuckDBPyConnection, job: Job, buckets: int, split: dict[int, list[Path]],
                   out: Path, fault: Callable[[str], None]) -> None:
    """Rewrite each file holding a key of `bb_dirty`: its unchanged rows as they are in the file, and its
    changed keys' rows picked again (`bb_changed`, one join over the answers for all of them). A key
    stays in the file it is in (a bucket a full rewrite wrote in parts has several), and a key in none
    goes to its bucket's first file: each file is replaced on its own, and a reader sees every key once."""
    pick_current(con, job, buckets, "bb_dirty")
    con.execute(f"CREATE OR REPLACE TEMP TABLE bb_changed AS {current_sql(con, job)}")
    cols = [(r[0], r[1]) for r in con.execute("DESCRIBE bb_changed").fetchall()]
    # The file's rows cast to the types the projection gives now (the layout check says they are the same).
    from_file = ", ".join(f"CAST({quote_ident(c)} AS {t}) AS {quote_ident(c)}" for c, t in cols)
    qualified = ", ".join(f"c.{quote_ident(c)}" for c, _ in cols)  # beside bb_home's columns, whatever the keys' names
    con.execute("CREATE OR REPLACE TEMP TABLE bb_home (custom_id VARCHAR, file VARCHAR)")
    touched = [r[0] for r in con.execute("SELECT DISTINCT bucket FROM bb_dirty ORDER BY 1").fetchall()]
    for b in touched:
        paths = [str(p) for p in split[b]]
        if len(paths) > 1:  # which of the bucket's files each changed key is in
            con.execute(f"""INSERT INTO bb_home SELECT custom_id, filename
                            FROM read_parquet([{", ".join(quote_literal(p) for p in paths)}], filename = true)
                            WHERE custom_id IN (SELECT custom_id FROM bb_dirty WHERE bucket = {b})""")
        home = f"coalesce(h.file, {quote_literal(paths[0])})"
        targets = [r[0] for r in con.execute(
            f"SELECT DISTINCT {home} FROM bb_dirty d LEFT JOIN bb_home h ON h.custom_id = d.custom_id "
            f"WHERE d.bucket = {b} ORDER BY 1").fetchall()]
        changed = f"(SELECT * FROM bb_changed WHERE hash(custom_id) % {buckets} = {b})"
        if len(targets) > 1:  # the bucket's changed rows taken out once, not once per file
            con.execute(f"CREATE OR REPLACE TEMP TABLE bb_changed_here AS SELECT * FROM {changed}")
            changed = "bb_changed_here"
        for target in targets:
            query = f"""
                SELECT {from_file} FROM read_parquet({quote_literal(target)})
                WHERE custom_id NOT IN (SELECT custom_id FROM bb_dirty WHERE bucket = {b})
                UNION ALL
                SELECT {qualified} FROM {changed} c LEFT JOIN bb_home h ON h.custom_id = c.custom_id
                WHERE {home} = {quote_literal(target)}
            """
            _write(con, query, Path(target), out / f".bucket-{b}.tmp")
        if b == touched[0]:
            fault("publish_between_buckets")


def _swap(fresh: Path, current: Path, old: Path) -> None:
    """Put the directory `fresh` where `current` is (a directory, an old single file, or nothing).
    Between the two renames `current` is missing: a reader then fails, it never reads a mix."""
    if current.exists():
        os.replace(current, old)
    os.replace(fresh, current)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _no_fault(point: str) -> None:
    pass


def publish(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job,
            fault: Callable[[str], None] = _no_fault) -> Path:
    """(Re)write the job's current results and rejections, and the history part of every collected
    batch that has none yet. Called once at the end of each command that loads or submits.

    History is append-only: one part per collected batch (`history/<batch_id>.parquet`) plus an empty
    `history/_schema.parquet`, so `read_parquet('.../history/*.parquet')` always resolves and a collect
    costs time in proportion to what it loaded, not to everything ever collected. `current.parquet` is
    written before the parts, so a part that is missing always means a publish is still owed. `fault`
    is called at named points (crash-safety tests kill the process there).
    """
    # Writing Parquet is I/O, and its row-group buffers are per thread; answers (the wide rows) are
    # streamed past hash tables built from keys and hashes, never built into one (joins_as_written).
    # The room for wide rows is set first (its exit checkpoints); within it, the limit for streaming.
    row_bytes = _answer_bytes(con, job)
    with (single_threaded(con), joins_as_written(con), room_for_rows(con, settings, row_bytes),
          room_for_streaming(con, settings, row_bytes)):
        return _publish(con, settings, job, fault)


def _answer_bytes(con: duckdb.DuckDBPyConnection, job: Job) -> float:
    """The mean result-line width of the job's widest collected batch: how wide the rows published are."""
    (width,) = con.execute(
        "SELECT max(result_bytes / result_lines) FROM bb_state.batches "
        "WHERE job = ? AND local_state = 'collected' AND result_lines > 0", [job.name]).fetchone()
    return float(width or 0)


def _publish(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, fault: Callable[[str], None]) -> Path:
    out = settings.results_dir(job.name)
    parts = out / "history"
    parts.mkdir(parents=True, exist_ok=True)
    todo = _unpublished_batches(con, job, parts)
    _publish_current(con, settings, job, out, fault)  # unordered: sorting 1M wide rows costs seconds
    _write(
        con,
        f"SELECT key_json, reason, detail, seen_at FROM bb_state.rejections WHERE job = {quote_literal(job.name)} "
        "ORDER BY reason, key_json",
        out / "rejected.parquet",
    )
    _write(con, history_sql(con, job, []), parts / "_schema.parquet")  # the job's columns may have changed
    # One COPY per part: a COPY partitioned by batch held a row group per open part (11 parts of a 1M-row
    # run: 88 MB of buffers), and per batch is faster too (docs/DESIGN.md, Results source). A part's
    # typed columns are parsed from the answers' JSON, which holds copies of each vector of answers
    # beyond their width: run again with more room when that runs out (each part is rewritten whole).
    for b in todo:
        grown_until_it_fits(con, settings, lambda b=b: _write(con, history_sql(con, job, [b]), parts / f"{b}.parquet"))
    shutil.rmtree(parts / ".incoming", ignore_errors=True)  # left by a partitioned COPY of older versions
    return out / CURRENT
