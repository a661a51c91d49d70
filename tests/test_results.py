"""The results source as bucket files: a change rewrites only its buckets, the union stays one row per key
and equals a full publish, a publish killed between two bucket files is repaired by the next run, and
dbt reads the source (the generated YAML) after a change.

Real dbt project and DuckDB files, the official SDK over HTTP to the emulator; a small bucket size
(BATCH_BRIDGE_PUBLISH_BUCKET_ROWS) gives a 60-row job 8 bucket files.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import duckdb
import pytest

from batch_bridge import api, bridge, dbt_runner, sources, state
from batch_bridge.results import CURRENT, bucket_file, current_sql, pick_current, publish
from helpers import load_staging, reset_home, settings_for, write_project

ROWS = 60
BUCKET_ROWS = 8  # 60 keys -> 8 buckets
META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt"}


def rows_sql(n: int, changed: tuple[int, ...] = ()) -> str:
    text = "'review ' || i || ' is great'"
    if changed:
        text = f"CASE WHEN i IN ({', '.join(map(str, changed))}) THEN 'changed review ' || i ELSE {text} END"
    return f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, {text} AS prompt FROM range({n}) t(i)"


@pytest.fixture(scope="module")
def project_root(tmp_path_factory):
    """One dbt project parsed once; each test starts from an empty bridge home (the parse is kept)."""
    root = tmp_path_factory.mktemp("publish")
    write_project(root, META)
    bridge.load_jobs(settings_for(root))
    return root


@pytest.fixture
def home(project_root, emulator):
    s = settings_for(project_root, emulator.base_url, BATCH_BRIDGE_PUBLISH_BUCKET_ROWS=str(BUCKET_ROWS))
    reset_home(s)
    return s


@pytest.fixture
def proj(home):
    load_staging(home, rows_sql(ROWS))
    run(home)
    return home


def run(s):
    return bridge.run(s, bridge.load_jobs(s), api.build_client(s))


def files(s) -> dict[str, tuple[int, int, str]]:
    """Each bucket file's (inode, mtime_ns, sha256): a rewrite (temp file renamed over it) changes all three."""
    out = {}
    for p in sorted((s.results_dir("items") / CURRENT).iterdir()):
        st = p.stat()
        out[p.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def rows(s) -> list[tuple]:
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT * FROM read_parquet('{s.results_dir('items') / CURRENT}') ORDER BY id").fetchall()
    finally:
        con.close()


def columns(s) -> list[str]:
    con = duckdb.connect()
    try:
        return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{s.results_dir('items') / CURRENT}')").fetchall()]
    finally:
        con.close()


def by_id(s) -> dict[str, dict]:
    cols = columns(s)
    return {r[0]: dict(zip(cols, r)) for r in rows(s)}


def bucket_of(s, custom_id: str, buckets: int) -> str:
    con = duckdb.connect()
    try:
        (b,) = con.execute(f"SELECT hash(?) % {buckets}", [custom_id]).fetchone()
    finally:
        con.close()
    return bucket_file(int(b), buckets)


def full_publish(s) -> list[tuple]:
    """What a publish from nothing shows: the marks forgotten, so every bucket is written again."""
    with state.connect(s) as con:
        con.execute("DELETE FROM bb_state.published")
        publish(con, s, bridge.load_jobs(s)[0])
    return rows(s)


def test_one_changed_row_rewrites_only_its_bucket_and_the_union_equals_a_full_publish(proj):
    s = proj
    before = files(s)
    assert sorted(before) == [bucket_file(b, 8) for b in range(8)]  # 60 keys in buckets of ~8
    old = by_id(s)
    assert len(old) == ROWS and {r["status"] for r in old.values()} == {"succeeded"}
    home_bucket = bucket_of(s, "r007", 8)

    load_staging(s, rows_sql(ROWS, changed=(7,)))
    jobs = bridge.load_jobs(s)
    bridge.submit(s, jobs, api.build_client(s))  # publishes: r007 now answers an earlier input
    stale = files(s)
    assert {n for n in before if stale[n] != before[n]} == {home_bucket}
    assert by_id(s)["r007"]["is_stale"] is True and by_id(s)["r007"]["output_text"] == old["r007"]["output_text"]
    assert sum(r["is_stale"] for r in by_id(s).values()) == 1

    run(s)  # waits, loads the one new answer, publishes
    after = files(s)
    assert {n for n in before if after[n] != before[n]} == {home_bucket}
    assert {n for n in stale if after[n] != stale[n]} == {home_bucket}
    new = by_id(s)
    assert len(new) == ROWS and len(rows(s)) == ROWS  # one row per key
    assert new["r007"]["is_stale"] is False and new["r007"]["input_hash"] != old["r007"]["input_hash"]
    assert {k for k in new if new[k] != old[k]} == {"r007"}

    with state.connect(s) as con:  # nothing new since: nothing written
        publish(con, s, bridge.load_jobs(s)[0])
    assert files(s) == after

    published = rows(s)
    assert full_publish(s) == published
    assert files(s).keys() == after.keys()


def file_of(s) -> dict[str, str]:
    """Each key's file in the results source."""
    con = duckdb.connect()
    try:
        return {k: os.path.basename(f) for k, f in con.execute(
            f"SELECT id, filename FROM read_parquet('{s.results_dir('items') / CURRENT}/*.parquet', filename = true)").fetchall()}
    finally:
        con.close()


def split_of(names, buckets: int) -> dict[int, list[str]]:
    """Bucket -> its file names, its first file first; every name must be a file of a bucket of the split."""
    named = {bucket_file(b, buckets, part): (b, part) for b in range(buckets) for part in range(8)}
    assert set(names) <= set(named), sorted(set(names) - set(named))
    out: dict[int, list[str]] = {}
    for n in sorted(names, key=lambda n: named[n]):
        out.setdefault(named[n][0], []).append(n)
    return out


def test_a_grown_job_is_split_again_and_no_file_of_the_old_split_is_left(proj):
    """Past the cap of 16 buckets a full rewrite writes a bucket in parts of about BUCKET_ROWS keys, each
    a file of its own; every key is in one file, that of its bucket."""
    s = proj
    load_staging(s, rows_sql(200))  # 200 keys: 25 buckets wanted, 16 at most; 2x beyond the 8 it has
    run(s)
    split = split_of(files(s), 16)
    assert sorted(split) == list(range(16)) and all(names[0] == bucket_file(b, 16) for b, names in split.items())
    assert any(len(names) > 1 for names in split.values())  # ~12 keys a bucket: written in parts
    assert len(rows(s)) == 200 and len({r[0] for r in rows(s)}) == 200
    where = file_of(s)
    assert len(where) == 200
    for key, name in where.items():
        assert name in split[int(bucket_of(s, key, 16)[:3])]
    per_file = {n: sum(1 for v in where.values() if v == n) for n in set(where.values())}
    assert max(per_file.values()) <= 1.5 * BUCKET_ROWS  # parts of about BUCKET_ROWS keys


def test_a_change_to_a_bucket_written_in_parts_rewrites_only_the_files_its_keys_are_in(proj):
    """A merge into a bucket of several files: each changed key is written back into the file it is in,
    a new key into its bucket's first file, and no other file is touched."""
    s = proj
    load_staging(s, rows_sql(200))
    run(s)
    before, where = files(s), file_of(s)
    old = by_id(s)
    later = min(k for k, n in where.items() if n.count(".") == 2)  # a key in a bucket's second part or later
    first = min(k for k, n in where.items() if n == where[later][:10] + ".parquet")  # one in that bucket's first file
    changed = {later, first}
    load_staging(s, rows_sql(201, changed=tuple(int(k[1:]) for k in changed)))  # r200 is new
    run(s)
    after, moved = files(s), file_of(s)
    first_of_new = bucket_of(s, "r200", 16)
    assert set(after) == set(before)
    assert {n for n in before if after[n] != before[n]} == {where[later], where[first], first_of_new}
    assert moved["r200"] == first_of_new and {k: moved[k] for k in where} == where
    new = by_id(s)
    assert len(rows(s)) == 201 and len(new) == 201
    for k in changed:
        assert new[k]["is_stale"] is False and new[k]["input_hash"] != old[k]["input_hash"]
    assert {k for k in old if new[k] != old[k]} == changed
    assert full_publish(s) == rows(s)


def test_an_old_single_file_is_replaced_by_the_directory(proj):
    s = proj
    current = s.results_dir("items") / CURRENT
    want = rows(s)
    for p in current.iterdir():
        p.unlink()
    current.rmdir()
    con = duckdb.connect()
    con.execute(f"COPY (SELECT 'stale' AS id) TO '{current}' (FORMAT parquet)")  # as an older bridge wrote it
    con.close()
    full_publish(s)
    assert current.is_dir() and rows(s) == want


def test_an_empty_job_still_resolves_with_every_column(home):
    s = home
    load_staging(s, rows_sql(3))
    jobs = bridge.load_jobs(s)
    bridge.collect(s, jobs, api.build_client(s))  # nothing sent yet: publishes the empty source
    assert sorted(files(s)) == [bucket_file(0, 1)]
    assert rows(s) == [] and columns(s)[:3] == ["id", "custom_id", "status"]


def run_killed_between_buckets(s) -> None:
    """`batch-bridge run` in a process of its own, killed by its publish after the first bucket file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
    env.update({"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": s.api_key or "",
                "ANTHROPIC_BASE_URL": s.base_url or "", "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
                "BATCH_BRIDGE_PUBLISH_BUCKET_ROWS": str(BUCKET_ROWS), "BATCH_BRIDGE_FAULT": "publish_between_buckets",
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"})
    r = subprocess.run([sys.executable, "-m", "batch_bridge.cli", "run", "--project-dir", str(s.project_dir),
                        "--profiles-dir", str(s.profiles_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_publish_killed_between_bucket_files_is_repaired_by_the_next_run(proj):
    s = proj
    changed = (3, 11, 19, 27, 35, 43, 51)
    homes = {bucket_of(s, f"r{i:03d}", 8) for i in changed}
    assert len(homes) >= 2  # the kill must fall between two files of one publish
    before = by_id(s)
    load_staging(s, rows_sql(ROWS, changed=changed))
    run_killed_between_buckets(s)
    torn = by_id(s)
    fresh = {k for k in torn if torn[k]["input_hash"] != before[k]["input_hash"]}
    assert fresh and fresh < {f"r{i:03d}" for i in changed}  # killed with one bucket written and the others not

    run(s)  # nothing left to send or load; its publish finds the marks behind and rewrites those buckets
    repaired = by_id(s)
    assert len(rows(s)) == ROWS
    for i in changed:
        r = repaired[f"r{i:03d}"]
        assert r["is_stale"] is False and r["status"] == "succeeded", r
    assert {k for k in repaired if repaired[k]["input_hash"] != torn[k]["input_hash"]} == {
        f"r{i:03d}" for i in changed} - fresh
    assert full_publish(s) == rows(s)


def test_a_full_rewrite_bucket_by_bucket_shows_what_one_pass_over_every_key_shows(home):
    """A full rewrite picks and writes one bucket at a time; its files hold the rows a single pick over
    every key gives, deduplicated answers shared across buckets and stale rows included, and no row for
    a key that never had an answer."""
    s = home
    # Keys 30..39 send the prompts of keys 0..9: each pair is one request, shown for both keys.
    twin = "CASE WHEN i BETWEEN 30 AND 39 THEN 'review ' || (i - 30) || ' is great' ELSE 'review ' || i || ' is great' END"
    load_staging(s, f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, {twin} AS prompt FROM range({ROWS}) t(i)")
    run(s)
    changed = (4, 17, 33, 48, 59)
    # Keys 60..62 are new: sent, never answered, so in no bucket (their keys stay 8 buckets' worth).
    load_staging(s, f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, CASE WHEN i IN {changed} THEN 'changed ' || i "
                    f"WHEN i >= {ROWS} THEN 'new ' || i ELSE {twin} END AS prompt FROM range({ROWS + 3}) t(i)")
    jobs = bridge.load_jobs(s)
    bridge.submit(s, jobs, api.build_client(s))  # the changed keys now show their earlier answers, stale

    got = full_publish(s)
    assert sorted(files(s)) == [bucket_file(b, 8) for b in range(8)]
    one_file = s.results_dir("items") / "one-pass.parquet"
    with state.connect(s) as con:
        pick_current(con, jobs[0])  # every key in one pass, as the results source was written as one file
        con.execute(f"COPY ({current_sql(con, jobs[0])}) TO '{one_file}' (FORMAT parquet)")
    con = duckdb.connect()
    try:
        want = con.execute(f"SELECT * FROM read_parquet('{one_file}') ORDER BY id").fetchall()
    finally:
        con.close()
    assert got == want

    rows_by_id = by_id(s)
    assert len(got) == ROWS and sorted(rows_by_id) == [f"r{i:03d}" for i in range(ROWS)]
    assert {k for k, r in rows_by_id.items() if r["is_stale"]} == {f"r{i:03d}" for i in changed}
    for i in range(10):  # each unchanged pair: one answer, sent for one key and shown for both
        if i + 30 in changed or i in changed:
            continue
        a, b = rows_by_id[f"r{i:03d}"], rows_by_id[f"r{i + 30:03d}"]
        assert a["output_text"] == b["output_text"] and a["input_hash"] == b["input_hash"]
        assert sorted([a["deduplicated"], b["deduplicated"]]) == [False, True]
    assert len({bucket_of(s, f"r{i:03d}", 8) for i in range(10)} | {bucket_of(s, f"r{i:03d}", 8) for i in range(30, 40)}) > 1


def test_the_source_shows_the_latest_collected_answer_and_of_one_load_the_latest_attempt(proj):
    """Answers of one input: the one collected last is shown, whatever its attempt; of answers collected
    at the same moment, the highest attempt. Rows inserted as `collect` writes them, the wrong one first."""
    s = proj
    with state.connect(s) as con:
        hashes = dict(con.execute("SELECT custom_id, input_hash FROM bb_state.key_inputs "
                                  "WHERE custom_id IN ('r003', 'r011')").fetchall())
        (first,) = con.execute("SELECT max(collected_at) FROM bb_state.responses").fetchone()
        rows_in = [  # (key, attempt, seconds after the run's collect, text)
            ("r003", 4, 60, "r003 later collect, lower attempt: wrong"),
            ("r003", 2, 120, "r003 latest collect: shown"),
            ("r011", 9, 60, "r011 same collect, lower attempt: wrong"),
            ("r011", 1000, 60, "r011 same collect, highest attempt: shown"),
            ("r011", 7, 60, "r011 same collect, lower attempt again: wrong"),
        ]
        for key, attempt, after, text in rows_in:
            con.execute(
                "INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, "
                "output_text, model, submitted_at, collected_at) SELECT 'items', 'msgbatch_extra', ?, ?, ?, "
                "'succeeded', ?, 'claude-haiku-4-5', now()::TIMESTAMP, "
                "?::TIMESTAMP + to_seconds(?)", [key, hashes[key], attempt, text, first, after])
        publish(con, s, bridge.load_jobs(s)[0])  # a merge of the two keys' buckets
    merged = by_id(s)
    assert merged["r003"]["output_text"] == "r003 latest collect: shown"
    assert merged["r011"]["output_text"] == "r011 same collect, highest attempt: shown"
    assert full_publish(s) == rows(s)  # a full rewrite's passes pick the same


def test_publish_killed_in_a_full_rewrite_leaves_the_old_split_whole(proj):
    """A grown job is written into a new directory bucket by bucket and swapped in: killed after its first
    bucket, readers still see the old split, whole, and the next run writes the new one."""
    s = proj
    old = rows(s)
    load_staging(s, rows_sql(200))  # 16 buckets wanted, 2x the 8 it has: a full rewrite
    run_killed_between_buckets(s)
    current = s.results_dir("items") / CURRENT
    assert sorted(p.name for p in current.iterdir()) == [bucket_file(b, 8) for b in range(8)]
    assert rows(s) == old
    written = [p.name for p in (s.results_dir("items") / f".{CURRENT}.new").iterdir()]
    assert list(split_of(written, 16)) == [0] and bucket_file(0, 16) in written  # bucket 0's file or parts

    run(s)  # nothing left to send or load: its publish rewrites every bucket of the new split
    assert sorted(split_of(files(s), 16)) == list(range(16))
    assert not (s.results_dir("items") / f".{CURRENT}.new").exists()
    new = rows(s)
    assert len(new) == 200 and len({r[0] for r in new}) == 200 and full_publish(s) == new


def test_dbt_reads_the_generated_source_after_a_change(tmp_path, emulator):
    write_project(tmp_path, META)  # a project of its own: the models added here would change the shared one
    s = settings_for(tmp_path, emulator.base_url, BATCH_BRIDGE_PUBLISH_BUCKET_ROWS=str(BUCKET_ROWS))
    load_staging(s, rows_sql(ROWS))
    run(s)
    models = s.project_dir / "models"
    (models / "bb_sources.yml").write_text(sources.render(s, bridge.load_jobs(s)))
    (models / "answers.sql").write_text(
        "{{ config(materialized='table') }}\nselect id, output_text, is_stale from {{ source('batch_bridge', 'items') }}\n")
    load_staging(s, rows_sql(ROWS, changed=(42,)))
    run(s)
    dbt_runner.invoke(s, ["run", "--select", "answers"])
    con = duckdb.connect(str(s.warehouse), read_only=True)
    try:
        n, keys, stale = con.execute("SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE is_stale) FROM answers").fetchone()
        (text,) = con.execute("SELECT output_text FROM answers WHERE id = 'r042'").fetchone()
    finally:
        con.close()
    assert (n, keys, stale) == (ROWS, ROWS, 0)
    assert text == by_id(s)["r042"]["output_text"] and text != "" and text is not None


def test_history_parts_of_several_batches_hold_each_key_with_each_answer_it_had(tmp_path, emulator):
    """The history parts of a command's batches (their keys found once for the group of them): each part
    holds exactly its batch's answers, once per key that had the answered input: both keys of a shared
    prompt (one deduplicated), and a changed key's earlier answer beside its new one (parts are written
    once: `is_stale` says what was stale when its batch was published)."""
    write_project(tmp_path, {**META, "max_requests_per_batch": 8})
    s = settings_for(tmp_path, emulator.base_url)
    pairs = "SELECT 'k' || lpad(i::VARCHAR, 3, '0') AS id, {} AS prompt FROM range(40) t(i)"
    load_staging(s, pairs.format("'review of pair ' || (i // 2)"))  # 40 keys, 20 distinct prompts
    first = run(s)[0].batches
    changed = tuple(range(0, 24, 2))  # 12 keys, one of each of 12 pairs
    load_staging(s, pairs.format(f"CASE WHEN i IN {changed} THEN 'changed review ' || i ELSE 'review of pair ' || (i // 2) END"))
    second = run(s)[0].batches
    assert len(first) >= 2 and len(second) >= 2, (first, second)
    parts = s.results_dir("items") / "history"
    con = duckdb.connect()
    for b in first + second:
        stems = con.execute(f"SELECT DISTINCT batch_id FROM read_parquet('{parts / (b + '.parquet')}')").fetchall()
        assert stems == [(b,)]
    rows = con.execute(
        f"SELECT id, batch_id, deduplicated, is_stale FROM read_parquet('{parts}/msgbatch_*.parquet')").fetchall()
    assert len(rows) == 40 + 12
    by_key: dict[str, list[tuple]] = {}
    for key, batch, dedup, stale in rows:
        by_key.setdefault(key, []).append((batch in second, dedup, stale))
    for i in range(40):
        had = sorted(by_key[f"k{i:03d}"])
        if i in changed:  # the pair's shared answer, and its own new one
            assert [(b, st) for b, _, st in had] == [(False, False), (True, False)], (i, had)
            assert had[1][1] is False
        else:
            assert [(b, st) for b, _, st in had] == [(False, False)], (i, had)
    assert sum(d for _, d, _ in (r[1:] for r in rows) if d) == 20  # one key of each pair in the first run
