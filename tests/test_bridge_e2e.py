"""The bridge end to end: real dbt, real DuckDB files, the official SDK over HTTP to the emulator."""

from __future__ import annotations

import json
import time

import duckdb
import pytest

from batch_bridge import api, bridge, dbt_runner, state
from batch_bridge.export import CUSTOM_ID_PATTERN
from batch_bridge.progress import Recorder
from helpers import current, load_staging, settings_for, write_project

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "topics": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "integer", "description": "1 to 5"},
    },
    "required": ["sentiment", "topics", "score"],
    "additionalProperties": False,
}


def job_meta(**over):
    meta = {
        "job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 200,
        "system": "You label short texts.", "prompt_column": "prompt", "output_schema": SCHEMA,
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def rows_sql(n: int, changed: dict[int, str] | None = None) -> str:
    cases = "".join(f" WHEN i = {k} THEN '{v}'" for k, v in (changed or {}).items())
    text = f"CASE{cases} ELSE 'review ' || i || ' is great' END" if cases else "'review ' || i || ' is great'"
    return f"SELECT 'r' || lpad(i::VARCHAR, 6, '0') AS id, {text} AS prompt FROM range({n}) t(i)"


@pytest.fixture
def project(tmp_path, emulator):
    def make(meta=None, sql=None):
        write_project(tmp_path, job_meta() if meta is None else meta)
        s = settings_for(tmp_path, emulator.base_url)
        if sql:
            load_staging(s, sql)
        return s

    return make


def run(settings, **kw):
    jobs = bridge.load_jobs(settings)
    return bridge.run(settings, jobs, api.build_client(settings), **kw)


def plan_of(settings):
    jobs = bridge.load_jobs(settings)
    plans, est = bridge.plan(settings, jobs)
    return bridge.plan_to_json(plans[0], est[plans[0].job.name])


def test_first_run_through_real_dbt_then_rerun_sends_nothing(tmp_path, emulator):
    write_project(tmp_path, job_meta(), sql=rows_sql(300))
    s = settings_for(tmp_path, emulator.base_url)
    dbt_runner.invoke(s, ["build"])  # the real staging model, built by dbt into the warehouse file
    assert plan_of(s)["rows_to_send"] == 300

    sub, w = run(s)
    assert len(sub.batches) == 1 and w.collected == {"items": 300}
    rows = current(s, "items")
    assert len(rows) == 300
    assert {r["status"] for r in rows} == {"succeeded"}
    assert all(r["sentiment"] in ("positive", "neutral", "negative") for r in rows)
    assert all(isinstance(r["topics"], list) and 1 <= r["score"] <= 5 for r in rows)
    assert all(r["cost_usd"] > 0 and r["input_tokens"] > 0 for r in rows)

    before = emulator.counters()
    sub2, _ = run(s)
    assert sub2.batches == []
    assert emulator.counters()["create_posts"] == before["create_posts"]
    assert plan_of(s)["up_to_date_rows"] == 300
    assert current(s, "items") == rows  # the second run changed nothing


def test_one_changed_row_is_resent_alone(project):
    s = project(sql=rows_sql(50))
    run(s)
    first = {r["id"]: r for r in current(s, "items")}
    load_staging(s, rows_sql(50, {7: "review 7 is now terrible"}))
    p = plan_of(s)
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (1, 49)
    sub, _ = run(s)
    after = {r["id"]: r for r in current(s, "items")}
    assert after["r000007"]["batch_id"] == sub.batches[0] != first["r000007"]["batch_id"]
    assert after["r000007"]["is_stale"] is False
    assert after["r000007"]["input_hash"] != first["r000007"]["input_hash"]
    unchanged = [k for k in first if k != "r000007"]
    assert all(after[k] == first[k] for k in unchanged)
    con = duckdb.connect()
    hist = con.execute(
        f"SELECT count(*) FROM read_parquet('{s.results_dir('items') / 'history' / '*.parquet'}') WHERE id = 'r000007'"
    ).fetchone()[0]
    assert hist == 2  # full history kept


def test_changing_the_prompt_resends_every_row(project, tmp_path):
    s = project(sql=rows_sql(20))
    run(s)
    write_project(tmp_path, job_meta(system="You label short texts. Be terse."))
    assert plan_of(s)["rows_to_send"] == 20


def test_errored_and_expired_rows_are_retried_then_capped(project, emulator):
    s = project(meta=job_meta(max_attempts=2), sql=rows_sql(40))
    emulator.set_faults(errored_fraction=1.0, errored_types=("overloaded_error",))
    run(s)
    rows = current(s, "items")
    assert {(r["status"], r["error_type"], r["attempt"]) for r in rows} == {("errored", "overloaded_error", 1)}
    assert all(r["cost_usd"] == 0 for r in rows)  # errored requests are not billed

    emulator.clear_faults()
    emulator.set_faults(expired_fraction=1.0)
    assert plan_of(s)["requests_to_send"] == 40
    run(s)
    assert {(r["status"], r["attempt"]) for r in current(s, "items")} == {("expired", 2)}

    p = plan_of(s)  # two retryable failures each: max_attempts reached
    assert p["rows_to_send"] == 0 and p["skipped"]["attempts_exhausted"]["rows"] == 40

    emulator.clear_faults()
    write_project(s.project_dir.parent, job_meta(max_attempts=3))
    run(s)
    assert {(r["status"], r["attempt"]) for r in current(s, "items")} == {("succeeded", 3)}


def test_invalid_requests_are_reported_and_not_resent(project, emulator):
    s = project(sql=rows_sql(10))
    emulator.set_faults(errored_fraction=1.0, errored_types=("invalid_request_error",))
    run(s)
    emulator.clear_faults()
    rows = current(s, "items")
    assert {(r["status"], r["error_type"]) for r in rows} == {("errored", "invalid_request_error")}
    assert all(r["error_message"] for r in rows)
    p = plan_of(s)
    assert p["rows_to_send"] == 0 and p["skipped"]["invalid_request"]["rows"] == 10


def test_awkward_and_composite_keys_round_trip(tmp_path, emulator):
    long_key = "k" * 80
    meta = job_meta(key=["shop", "day", "sku"], output_schema=None, prompt_column=None,
                    prompt_template="Review of {sku}: {body}")
    write_project(tmp_path, meta)
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, f"""
        SELECT * FROM (VALUES
            (1, DATE '2026-01-02', 'plain', 'fine'),
            (1, DATE '2026-01-02', 'with space', 'ok'),
            (2, DATE '2026-01-03', 'rév/ü#1', 'unicode'),
            (2, DATE '2026-01-03', '{long_key}', 'long'),
            (3, DATE '2026-01-04', 'bbk-abc', 'prefix'),
            (3, DATE '2026-01-04', 'quote''s', 'quote')
        ) v(shop, day, sku, body)""")
    run(s)
    rows = current(s, "items")
    got = {(r["shop"], str(r["day"]), r["sku"]) for r in rows}
    assert got == {(1, "2026-01-02", "plain"), (1, "2026-01-02", "with space"), (2, "2026-01-03", "rév/ü#1"),
                   (2, "2026-01-03", long_key), (3, "2026-01-04", "bbk-abc"), (3, "2026-01-04", "quote's")}
    assert all(r["status"] == "succeeded" for r in rows)
    import re

    assert all(re.fullmatch(CUSTOM_ID_PATTERN, r["custom_id"]) for r in rows)
    assert len({r["custom_id"] for r in rows}) == 6
    con = duckdb.connect()
    types = dict(con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{s.results_dir('items') / 'current.parquet'}')").fetchall()[i][:2]
        for i in range(3))
    assert types == {"shop": "INTEGER", "day": "DATE", "sku": "VARCHAR"}


def test_single_key_that_is_a_valid_custom_id_is_used_as_is(project):
    s = project(sql="SELECT * FROM (VALUES ('A-1_b', 'x'), ('with space', 'y'), ('bbk-1', 'z')) v(id, prompt)")
    run(s)
    ids = {r["id"]: r["custom_id"] for r in current(s, "items")}
    assert ids["A-1_b"] == "A-1_b"
    assert ids["with space"].startswith("bbk-") and ids["bbk-1"].startswith("bbk-") and ids["bbk-1"] != "bbk-1"


def test_null_duplicate_and_empty_rows_are_recorded_not_sent(project):
    s = project(sql="""SELECT * FROM (VALUES ('a', 'one'), (NULL, 'no key'), ('d', 'dup 1'), ('d', 'dup 2'),
                       ('e', '   '), ('f', NULL), ('g', 'good')) v(id, prompt)""")
    p = plan_of(s)
    assert p["rows_to_send"] == 2
    assert {k: v["rows"] for k, v in p["skipped"].items()} == {"null_key": 1, "duplicate_key": 2, "empty_prompt": 2}
    run(s)
    assert {r["id"] for r in current(s, "items")} == {"a", "g"}
    con = duckdb.connect()
    rejected = con.execute(
        f"SELECT reason, count(*) FROM read_parquet('{s.results_dir('items') / 'rejected.parquet'}') GROUP BY ALL"
    ).fetchall()
    assert dict(rejected) == {"null_key": 1, "duplicate_key": 2, "empty_prompt": 2}


def test_identical_requests_are_sent_once_and_fanned_out(project, emulator):
    s = project(sql="SELECT * FROM (VALUES ('a', 'same text'), ('b', 'same text'), ('c', 'other')) v(id, prompt)")
    p = plan_of(s)
    assert (p["rows_to_send"], p["requests_to_send"], p["deduplicated_rows"]) == (3, 2, 1)
    run(s)
    assert emulator.counters()["requests_created"] == 2
    rows = {r["id"]: r for r in current(s, "items")}
    assert rows["a"]["output_text"] == rows["b"]["output_text"]
    assert rows["a"]["deduplicated"] is False and rows["b"]["deduplicated"] is True
    assert rows["b"]["cost_usd"] == 0 and rows["a"]["cost_usd"] > 0
    # A key added later with an input already answered gets the answer without a new request.
    load_staging(s, "SELECT * FROM (VALUES ('a', 'same text'), ('b', 'same text'), ('c', 'other'), ('d', 'other')) v(id, prompt)")
    sub, _ = run(s)
    assert sub.batches == [] and emulator.counters()["requests_created"] == 2
    rows = {r["id"]: r for r in current(s, "items")}
    assert set(rows) == {"a", "b", "c", "d"}
    assert rows["d"]["status"] == "succeeded" and rows["d"]["output_text"] == rows["c"]["output_text"]
    assert rows["d"]["deduplicated"] is True and rows["d"]["cost_usd"] == 0
    assert rows["d"]["batch_id"] == rows["c"]["batch_id"]


def test_150k_rows_are_split_into_two_batches(project, emulator):
    s = project(sql="SELECT 'r' || i AS id, 'text ' || i AS prompt FROM range(150000) t(i)")
    s = s.with_(concurrency=2)
    p = plan_of(s)
    assert [b["requests"] for b in p["batches"]] == [100000, 50000]  # the 2nd holds at most 99,999
    sub, w = run(s)
    assert len(sub.batches) == 2 and w.collected == {"items": 150000}
    con = duckdb.connect()
    n, ok = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'succeeded') "
        f"FROM read_parquet('{s.results_dir('items') / 'current.parquet'}')").fetchone()
    assert n == ok == 150000


def test_byte_cap_splits_batches(project):
    s = project(meta=job_meta(max_bytes_per_batch=20_000), sql=rows_sql(200))
    p = plan_of(s)
    assert len(p["batches"]) > 1
    assert all(b["bytes"] <= 20_000 for b in p["batches"])
    assert sum(b["requests"] for b in p["batches"]) == 200
    sub, w = run(s)
    assert w.collected == {"items": 200} and len(sub.batches) == len(p["batches"])


def test_result_lines_longer_than_a_slice_are_loaded_whole(project):
    """A batch loads in slices of its file; a line longer than a slice is a slice of its own, read with
    a buffer that follows it, and every line lands once."""
    s = project(sql=rows_sql(12))
    s = s.with_(load_slice_bytes=200)  # every emulator answer line is longer than this
    sub, w = run(s)
    assert w.collected == {"items": 12}
    with state.connect(s) as con:
        assert con.execute("SELECT sum(loaded_lines), sum(result_lines), count(*) FROM bb_state.batches").fetchone() == (12, 12, 1)
        assert con.execute("SELECT count(DISTINCT request_custom_id), count(*) FROM bb_state.responses").fetchone() == (12, 12)
    out = duckdb.connect().execute(
        f"SELECT count(*), count(sentiment) FROM read_parquet('{s.results_dir('items') / 'current.parquet'}')"
    ).fetchone()
    assert out == (12, 12)


def test_batches_load_one_transaction_each_and_results_publish_once(project):
    """A job of several batches is loaded batch by batch (bounded memory), and all its answers land."""
    s = project(meta=job_meta(max_bytes_per_batch=20_000), sql=rows_sql(200))
    sub, w = run(s)
    assert len(sub.batches) > 1 and w.collected == {"items": 200}
    rows = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT batch_id) FROM read_parquet('{s.results_dir('items') / 'current.parquet'}')"
    ).fetchone()
    assert rows == (200, len(sub.batches))


def test_results_join_back_by_key_in_sql(project):
    s = project(sql=rows_sql(30))
    run(s)
    con = duckdb.connect(str(s.warehouse), read_only=True)
    n = con.execute(
        f"""SELECT count(*) FROM stg_items s JOIN read_parquet('{s.results_dir('items') / 'current.parquet'}') r
            USING (id) WHERE r.status = 'succeeded' AND r.sentiment IS NOT NULL"""
    ).fetchone()[0]
    con.close()
    assert n == 30


def test_request_files_are_archived_and_match_what_was_sent(project):
    s = project(sql=rows_sql(25))
    run(s)
    files = list(s.requests_dir.glob("*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(lines) == 25
    assert lines[0]["params"]["output_config"]["format"]["schema"] == SCHEMA
    assert lines[0]["params"]["messages"][-1]["role"] == "user"
    assert (files[0].stat().st_mode & 0o777) == 0o600


def test_batches_cut_by_count_hold_the_cap_give_or_take_a_few():
    from batch_bridge.export import cut_chunks

    # A cap large enough: runs of four consecutive batches have different counts (created together).
    sizes = [b - a + 1 for a, b, _ in cut_chunks([10] * 500, max_requests=50, max_body=10**9)]
    assert sizes == [50, 49, 48, 47, 50, 49, 48, 47, 50, 49, 13] and sum(sizes) == 500
    # A small cap: every batch holds the cap (same counts are created one after the other).
    chunks = cut_chunks([10] * 35, max_requests=10, max_body=10**9)
    assert [b - a + 1 for a, b, _ in chunks] == [10, 10, 10, 5]
    assert all(body <= 10**9 for *_, body in chunks)


def test_count_only_cut_matches_the_greedy_cut():
    from batch_bridge.export import _count_ranges, cut_chunks

    for n, cap in ((0, 5), (1, 5), (35, 10), (100, 7), (21, 3), (500, 50), (2329, 50), (100_001, 100_000)):
        greedy = [(a, b) for a, b, _ in cut_chunks([100] * n, max_requests=cap, max_body=10**9)]
        assert _count_ranges(n, cap) == greedy


def test_the_poll_interval_counts_from_each_polls_start(project, emulator):
    """A poll's own work does not stretch the interval: after a poll that took 0.3 s (its progress
    report is slow here), the pause before the next is at most the interval less those 0.3 s."""
    s = project(sql=rows_sql(50)).with_(poll_interval=1.0, max_poll_interval=1.0)
    emulator.configure(latency=3.0)
    pauses: list[float] = []

    class SlowTicks(Recorder):
        def tick(self, what: str, done: int, total: int | None = None) -> None:
            super().tick(what, done, total)
            if what == "batches ended":
                time.sleep(0.3)

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    _, w = run(s, sleep=sleep, progress=SlowTicks())
    assert w.collected == {"items": 50}
    assert len(pauses) >= 2, pauses  # a 3 s batch polled about every second
    assert all(0.0 <= p <= 0.7 + 1e-9 for p in pauses), pauses


def test_a_young_batch_is_polled_at_its_age_not_after_the_poll_interval(project, emulator):
    """`pipeline --wait` on a small job: first polls at a batch age of about 1, 2, 4... s, not 30 s."""
    s = project(sql=rows_sql(100)).with_(poll_interval=30.0, max_poll_interval=60.0)
    emulator.configure(latency=3.0)
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    _, w = run(s, sleep=sleep)
    assert w.collected == {"items": 100}
    assert pauses and pauses[0] <= 1.5 and max(pauses) < 30.0, pauses
    assert all(b >= a * 0.9 for a, b in zip(pauses, pauses[1:])), pauses  # growing with the batch's age
