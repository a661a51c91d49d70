"""Request files as `submit` prepares them (offline: no API call), checked line by line against the warehouse.

A line's size is known before it is built (its framing, its custom_id's JSON and its prompt's JSON,
measured when the row is staged), and batches are cut by those sizes; these tests check that what is
written is exactly what was measured and journalled, also for prompts whose JSON escaping grows them;
and that the strata the token-count sample is picked from follow prompt length."""

from __future__ import annotations

import json
import re

import duckdb
import pytest

from batch_bridge import bridge, export, state, submit
from batch_bridge.export import BODY_OVERHEAD
from helpers import settings_for, write_project

# Quotes, backslashes, newlines, tabs, a control character, accents, CJK and an emoji: JSON escapes
# some of them (\", \\, \n, \t, \u0001), and UTF-8 takes several bytes for others.
AWKWARD = ["say \"hi\"", "back\\slash", "two\nlines", "tab\there", "ctl\x01char", "café déjà vu",
           "漢字かな", "emoji 🎉 ok", "plain words"]


def rows_sql(n: int) -> str:
    cases = " ".join(f"WHEN i % {len(AWKWARD)} = {k} THEN {duckdb_literal(t)}" for k, t in enumerate(AWKWARD))
    return (f"SELECT 'r' || lpad(i::VARCHAR, 5, '0') AS id, "
            f"repeat('x', i % 37) || (CASE {cases} END) || ' #' || i AS prompt FROM range({n}) t(i)")


def duckdb_literal(text: str) -> str:
    return " || chr(1) || ".join("'" + part.replace("'", "''") + "'" for part in text.split("\x01"))


def prepared(tmp_path, materialized: str, n: int, shuffled: bool = False, **env: str):
    meta = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
            "system": "Label it.", "max_bytes_per_batch": 9_000}
    write_project(tmp_path, meta, materialized=materialized)
    s = settings_for(tmp_path, None, BATCH_BRIDGE_COUNT_SAMPLE="0", **env)
    con = duckdb.connect(str(s.warehouse))
    kind = "VIEW" if materialized == "view" else "TABLE"
    rows = f"SELECT * FROM ({rows_sql(n)}) ORDER BY hash(id)" if shuffled else rows_sql(n)  # rowids unrelated to keys
    con.execute(f'CREATE OR REPLACE {kind} main."stg_items" AS {rows}')
    prompts = dict(con.execute("SELECT id, prompt FROM main.stg_items").fetchall())
    con.close()
    report = submit.prepare_submissions(s, bridge.load_jobs(s))
    return s, report.plans[0], prompts


@pytest.mark.parametrize("materialized", ["table", "view"])
def test_request_files_hold_exactly_what_was_measured_and_journalled(tmp_path, materialized):
    s, plan, prompts = prepared(tmp_path, materialized, 300)
    assert len(plan.chunks) > 2  # the byte cap binds: several batches cut by line sizes
    with state.connect(s) as con:
        subs = con.execute("SELECT submission_id, request_file, request_count, body_bytes FROM bb_state.submissions "
                           "ORDER BY submission_id").fetchall()
        journal = {}
        for sub_id, cid, chars in con.execute(
                "SELECT submission_id, request_custom_id, prompt_chars FROM bb_state.sent_requests").fetchall():
            journal.setdefault(sub_id, {})[cid] = chars
    assert len(subs) == len(plan.chunks)
    seen: list[list[str]] = []
    for sub_id, path, count, body in subs:
        raw = open(path, "rb").read()
        assert len(raw) == body - BODY_OVERHEAD + 1 and body <= 9_000  # lines, commas become newlines
        lines = [json.loads(x) for x in raw.decode().splitlines()]
        assert len(lines) == count
        ids = [x["custom_id"] for x in lines]
        for x in lines:
            assert x["params"]["messages"][-1]["content"] == prompts[x["custom_id"]]
        assert journal[sub_id] == {i: len(prompts[i]) for i in ids}
        seen.append(sorted(ids))
    # Every row in exactly one batch (batches follow the table's order, not the custom_ids').
    assert sorted(i for ids in seen for i in ids) == sorted(prompts)


def test_each_batch_is_a_run_of_consecutive_table_rows_whatever_the_key_order(tmp_path):
    # Each batch's COPY joins its rows back to the staging table; rows numbered in rowid order make each
    # batch one narrow range of the table, which the join reads alone (custom_id order would scatter them).
    s, plan, prompts = prepared(tmp_path, "table", 120, shuffled=True, BATCH_BRIDGE_MAX_QUEUED_REQUESTS="25")
    con = duckdb.connect(str(s.warehouse), read_only=True)
    rowid = dict(con.execute("SELECT id, rowid FROM main.stg_items").fetchall())
    con.close()
    in_table_order = [k for k, _ in sorted(rowid.items(), key=lambda kv: kv[1])]
    assert in_table_order != sorted(in_table_order)  # the table is not stored in key order
    runs = []
    for f in sorted(s.requests_dir.glob("*.jsonl")):
        rows = sorted(rowid[json.loads(x)["custom_id"]] for x in f.read_text().splitlines())
        assert rows == list(range(rows[0], rows[0] + len(rows))), f.name
        runs.append((rows[0], rows[-1]))
    assert len(runs) == len(plan.chunks) == 5 and sum(b - a + 1 for a, b in runs) == 120


def test_a_view_is_read_once_so_its_request_files_carry_the_prompts_that_were_hashed(tmp_path):
    # A view's query runs again at every read, and this one's prompts change each time (as a view over
    # now() or random() does). The plan copies its rows once: the lines written are the ones whose input
    # hashes were journalled, in batches cut from the same read.
    meta = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
            "system": "Label it.", "max_bytes_per_batch": 2_000}
    write_project(tmp_path, meta, materialized="view")
    s = settings_for(tmp_path, None, BATCH_BRIDGE_COUNT_SAMPLE="0")
    con = duckdb.connect(str(s.warehouse))
    con.execute("CREATE OR REPLACE VIEW main.stg_items AS SELECT 'r' || lpad(i::VARCHAR, 4, '0') AS id, "
                "'prompt ' || i || ' drawn ' || CAST(random() * 1e12 AS BIGINT) AS prompt FROM range(120) t(i)")
    assert con.execute("SELECT count(*) FROM main.stg_items a JOIN main.stg_items b USING (id) "
                       "WHERE a.prompt <> b.prompt").fetchone()[0] > 0  # two reads differ
    con.close()
    job = bridge.load_jobs(s)[0]
    report = submit.prepare_submissions(s, [job])
    assert report.plans[0].send_requests == 120 and len(report.plans[0].chunks) > 2
    lines = [json.loads(x) for f in sorted(s.requests_dir.glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert len(lines) == 120
    with state.connect(s) as con:
        con.execute("CREATE TEMP TABLE written AS SELECT unnest($ids) AS custom_id, unnest($prompts) AS prompt",
                    {"ids": [x["custom_id"] for x in lines],
                     "prompts": [x["params"]["messages"][-1]["content"] for x in lines]})
        mismatched = con.execute(
            "SELECT count(*) FROM written w JOIN bb_state.sent_requests r ON r.request_custom_id = w.custom_id "
            "WHERE r.input_hash <> md5_number(? || w.prompt)", [job.static_hash]).fetchone()[0]
        journalled = con.execute("SELECT count(*) FROM bb_state.sent_requests").fetchone()[0]
    assert journalled == 120 and mismatched == 0


def test_count_cut_by_the_queue_limit_matches_the_sizes_written(tmp_path):
    s, plan, prompts = prepared(tmp_path, "table", 120, BATCH_BRIDGE_MAX_QUEUED_REQUESTS="25")
    assert [c.requests for c in plan.chunks] == [25, 25, 25, 25, 20]
    files = sorted(s.requests_dir.glob("*.jsonl"))
    assert sorted(f.stat().st_size for f in files) == sorted(c.body_bytes - BODY_OVERHEAD + 1 for c in plan.chunks)
    ids = sorted(json.loads(x)["custom_id"] for f in files for x in f.read_text().splitlines())
    assert ids == sorted(prompts)


def _lines(n: int, lengths_sql: str) -> duckdb.DuckDBPyConnection:
    """`bb_lines` of `n` requests (as `measure` numbers them) whose prompt lengths `lengths_sql` gives from i."""
    con = duckdb.connect()
    con.execute(f"CREATE TEMP TABLE bb_lines AS SELECT i AS rn, md5_number('input ' || i) AS input_hash, "
                f"({lengths_sql})::INTEGER AS prompt_chars FROM range({n}) t(i)")
    return con


def test_strata_follow_prompt_length_and_cut_a_shared_length_evenly():
    # Every prompt of one length: the ten strata split them by a hash, each about a tenth.
    same = export.strata_of_lines(_lines(20_000, "40"), 20_000, 10, 10)
    assert sorted(k for k, *_ in same) == list(range(1, 11))
    assert all(1_800 <= rows <= 2_200 and chars == 40 * rows for _, rows, chars, _ in same)
    assert sum(rows for _, rows, _, _ in same) == 20_000
    # Lengths 0..9,999, two prompts each: stratum k holds exactly the k-th tenth of the lengths, in order.
    con = _lines(20_000, "i // 2")
    varied = sorted(export.strata_of_lines(con, 20_000, 10, 10))
    for k, rows, chars, picks in varied:
        lo, hi = (k - 1) * 1_000, k * 1_000 - 1  # lengths of this tenth
        assert rows == 2_000 and chars == 2 * sum(range(lo, hi + 1))
        assert len(picks) == 10 and all(lo <= rn // 2 <= hi for rn in picks)
    # The picks are the same on a second pass (a second plan counts nothing new).
    assert sorted(export.strata_of_lines(con, 20_000, 10, 10)) == varied


@pytest.mark.parametrize("typ, values", [
    ("TINYINT", [-128, 0, 127]),
    ("BIGINT", [-(2**63), -1, 0, 2**63 - 1]),
    ("HUGEINT", [-(2**127), 2**127 - 1]),
    ("UBIGINT", [0, 2**64 - 1]),
    ("UHUGEINT", [2**128 - 1]),
    ("UUID", ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"]),
])
def test_integer_and_uuid_keys_are_their_own_custom_ids_at_every_extreme(tmp_path, typ, values):
    # These types' texts are taken as custom_ids without matching the pattern per row
    # (export.VALID_AS_TEXT_TYPES): each extreme value must still give a valid id that is its own text.
    meta = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
            "system": "Label it."}
    write_project(tmp_path, meta)
    s = settings_for(tmp_path, None, BATCH_BRIDGE_COUNT_SAMPLE="0")
    con = duckdb.connect(str(s.warehouse))
    con.execute(f'CREATE OR REPLACE TABLE main."stg_items" (id {typ}, prompt VARCHAR)')
    con.execute("INSERT INTO main.stg_items SELECT unnest($v)::" + typ + ", 'prompt ' || unnest($v)::VARCHAR",
                {"v": [str(v) for v in values]})
    assert con.execute("SELECT typeof(id) FROM main.stg_items LIMIT 1").fetchone()[0] == typ
    con.close()
    report = submit.prepare_submissions(s, bridge.load_jobs(s))
    assert report.plans[0].send_requests == len(values)
    ids = [json.loads(x)["custom_id"] for f in s.requests_dir.glob("*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(ids) == sorted(str(v) for v in values)
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i) for i in ids), ids
