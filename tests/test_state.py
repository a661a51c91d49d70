"""The bridge's own state: migrations of old files, and the summaries kept beside `responses` and
`key_versions` (`input_outcomes`, `key_inputs`) staying exactly what those tables say."""

from __future__ import annotations

import duckdb
import pytest

from batch_bridge import api, bridge, state
from batch_bridge.config import size_bytes
from batch_bridge.errors import ConfigError
from batch_bridge import collect as collect_mod
from batch_bridge.purge import purge
from helpers import current, load_staging, settings_for, write_project


def job_meta(**over):
    meta = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 100,
            "prompt_column": "prompt", "max_attempts": 5}
    meta.update(over)
    return meta


def rows_sql(n: int, template: str = "'review ' || lpad(i::VARCHAR, 9, '0') || ' is great, really great!'") -> str:
    return f"SELECT 'r' || lpad(i::VARCHAR, 6, '0') AS id, {template} AS prompt FROM range({n}) t(i)"


@pytest.fixture
def project(tmp_path, emulator):
    def make(sql: str, **meta):
        write_project(tmp_path, job_meta(**meta))
        s = settings_for(tmp_path, emulator.base_url)
        load_staging(s, sql)
        return s

    return make


def run(s):
    return bridge.run(s, bridge.load_jobs(s), api.build_client(s))


def plan(s) -> dict:
    jobs = bridge.load_jobs(s)
    plans, est = bridge.plan(s, jobs)
    return bridge.plan_to_json(plans[0], est[plans[0].job.name])


def fetch(s, sql: str) -> list[tuple]:
    with state.connect(s) as con:
        return sorted(con.execute(sql).fetchall(), key=repr)


def assert_summaries_match_history(s) -> None:
    """`input_outcomes` is the aggregate of `responses`; `key_inputs` is each key's latest
    `key_versions` input and key values, `answered` exactly when that input has a succeeded answer."""
    assert fetch(s, "SELECT * FROM bb_state.input_outcomes") == fetch(s, state.outcomes_select("true"))
    assert fetch(s, "SELECT job, custom_id, input_hash, key_json FROM bb_state.key_inputs") == fetch(
        s, "SELECT job, custom_id, arg_max(input_hash, seen_at), arg_max(key_json, seen_at) "
           "FROM bb_state.key_versions GROUP BY ALL")
    assert fetch(s, "SELECT count(*) FROM bb_state.key_inputs k LEFT JOIN bb_state.input_outcomes o "
                    "USING (job, input_hash) WHERE k.answered <> coalesce(o.succeeded, false)") == [(0,)]


def test_outcomes_stay_equal_to_the_responses_through_failures_retries_and_purge(project, emulator):
    s = project(rows_sql(60))
    emulator.set_faults(errored_fraction=0.3, errored_types=("overloaded_error", "invalid_request_error"),
                        expired_fraction=0.2)
    run(s)
    assert_summaries_match_history(s)
    before = plan(s)
    assert before["rows_to_send"] > 0 and before["skipped"].get("invalid_request")
    run(s)  # the retryable ones again, some failing again
    assert_summaries_match_history(s)
    emulator.clear_faults()
    run(s)
    assert_summaries_match_history(s)
    p = plan(s)
    assert p["rows_to_send"] == 0 and p["up_to_date_rows"] + p["skipped"]["invalid_request"]["rows"] == 60
    purge(s, older_than_days=0)
    assert_summaries_match_history(s)
    assert plan(s) == p


def test_batches_folded_in_passes_give_the_summaries_one_fold_gives(project, emulator):
    """Loading owes each batch's answers to the summaries; a fold in passes of whole batches leaves
    them exactly what `responses` says, and nothing is folded while less than `at_least` is owed."""
    s = project(rows_sql(25), max_requests_per_batch=10)  # batches of 10, 10 and 5 requests
    jobs = bridge.load_jobs(s)
    client = api.build_client(s)
    bridge.submit(s, jobs, client)
    bridge.wait(s, jobs, client, timeout=30)
    collect_mod.collect(client, s, {j.name: j for j in jobs})  # loads, does not publish
    with state.connect(s) as con:
        assert con.execute("SELECT count(*), sum(answers) FROM bb_state.unfolded_batches").fetchone() == (3, 25)
        assert state.fold_outcomes(con, at_least=26) == 0
        assert con.execute("SELECT count(*) FROM bb_state.input_outcomes").fetchone() == (0,)
        assert state.fold_outcomes(con, at_least=25, pass_answers=15) == 3  # passes: 10, then 10 + 5
        assert con.execute("SELECT count(*) FROM bb_state.unfolded_batches").fetchone() == (0,)
        assert state.fold_outcomes(con) == 0
    assert_summaries_match_history(s)
    assert fetch(s, "SELECT count(*) FROM bb_state.key_inputs WHERE answered") == [(25,)]
    assert plan(s)["rows_to_send"] == 0


def test_an_old_state_file_is_migrated_and_plans_the_same(project):
    s = project(rows_sql(40))
    run(s)
    # Take the file back to what the first release wrote: only m001's tables.
    with state.connect(s) as con:
        con.execute("DROP TABLE bb_state.input_outcomes")
        con.execute("DROP TABLE bb_state.key_inputs")
        con.execute("ALTER TABLE bb_state.batches DROP COLUMN result_bytes")
        for col in ("loaded_lines", "loaded_bytes"):
            con.execute(f"ALTER TABLE bb_state.batches DROP COLUMN {col}")
        for col in ("estimated_input_tokens", "estimated_output_tokens", "estimated_cache_write_tokens",
                    "estimated_cache_read_tokens", "estimated_sync_usd", "outcome_unknown_at", "first_create_at",
                    "adopted"):
            con.execute(f"ALTER TABLE bb_state.submissions DROP COLUMN {col}")
        con.execute("DROP TABLE bb_state.foreign_batches")
        con.execute("DROP TABLE bb_state.refused_inputs")
        con.execute("DROP TABLE bb_state.model_info")
        con.execute("DROP TABLE bb_state.token_counts")
        con.execute("DROP TABLE bb_state.published")
        con.execute("DROP TABLE bb_state.unfolded_batches")
        for table in ("submissions", "batches", "responses"):
            con.execute(f"ALTER TABLE bb_state.{table} DROP COLUMN lane")
        con.execute("DELETE FROM bb_state._migrations WHERE name <> 'm001_initial'")
    load_staging(s, rows_sql(40, "CASE WHEN i = 3 THEN 'review 3 changed' "
                                 "ELSE 'review ' || lpad(i::VARCHAR, 9, '0') || ' is great, really great!' END"))
    p = plan(s)  # opening the file migrates it
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (1, 39)
    assert fetch(s, "SELECT name FROM bb_state._migrations") == [
        ("m001_initial",), ("m002_input_outcomes",), ("m003_key_inputs",), ("m004_result_bytes",),
        ("m005_unknown_outcomes",), ("m006_report_estimates",), ("m007_model_info",), ("m008_token_counts",),
        ("m009_lanes",), ("m010_published",),
        ("m011_load_slices",), ("m012_unfolded_batches",), ("m013_key_inputs_key_json",)]
    assert_summaries_match_history(s)
    # Batches collected before m004 get the size of their stored answers (the result file may be gone).
    [(lines, size, answers)] = fetch(
        s, "SELECT result_lines, result_bytes, (SELECT sum(strlen(output_text)) FROM bb_state.responses) FROM bb_state.batches")
    assert lines == 40 and size > answers > 0
    assert fetch(s, "SELECT loaded_lines, loaded_bytes FROM bb_state.batches") == [(0, 0)]  # m011: loaded whole
    assert fetch(s, "SELECT count(fingerprint) FROM bb_state.key_inputs") == [(0,)]  # until the next submit
    run(s)
    assert_summaries_match_history(s)
    assert fetch(s, "SELECT count(fingerprint) FROM bb_state.key_inputs") == [(40,)]
    assert plan(s)["up_to_date_rows"] == 40


def test_a_jobs_first_submit_records_its_keys_as_a_later_submit_does(tmp_path, emulator):
    """A job's first submit inserts every key into `key_inputs`, a later one merges: the same rows
    (inputs, fingerprints, the job definition and DuckDB version they were taken under, key values)."""
    columns = ("SELECT custom_id, input_hash, answered, static_hash, hash_version, prompt_bytes, fingerprint, key_json "
               "FROM bb_state.key_inputs")
    rows = rows_sql(130) + " UNION ALL SELECT 'r000999', 'review 000000001 is great, really great!'"  # a shared input
    found = []
    for first in (None, rows_sql(8)):  # all at once; or 8 keys, then all of them
        root = tmp_path / ("once" if first is None else "twice")
        write_project(root, job_meta(max_requests_per_batch=40))  # batches of up to 40, 39, 38, 37 requests in turn
        s = settings_for(root, emulator.base_url)
        for sql in ([first] if first else []) + [rows]:
            load_staging(s, sql)
            bridge.submit(s, bridge.load_jobs(s), api.build_client(s))
        found.append(fetch(s, columns))
        assert_summaries_match_history(s)
        # Each batch journals exactly its own requests, each request once.
        assert fetch(s, "SELECT count(*), count(DISTINCT request_custom_id), count(DISTINCT input_hash) "
                        "FROM bb_state.sent_requests") == [(130, 130, 130)]
        journalled = fetch(s, "SELECT s.request_count, count(r.request_custom_id) FROM bb_state.submissions s "
                              "LEFT JOIN bb_state.sent_requests r USING (submission_id) GROUP BY s.submission_id, s.request_count")
        assert len(journalled) >= 4 and all(expected == n for expected, n in journalled), journalled
    assert len(found[0]) == 131 and all(r[6] is not None and r[3] and r[4] for r in found[0])
    assert found[0] == found[1]


def test_a_key_restaged_with_another_type_keeps_the_key_values_of_its_latest_version(project):
    """`key_inputs.key_json` is the key values as the key's latest `key_versions` row holds them: a key
    staged as a number, then as text with a changed prompt, has ["3"] there; the unchanged keys keep [n]."""
    s = project("SELECT i AS id, 'review number ' || i AS prompt FROM range(6) t(i)")
    run(s)
    load_staging(s, "SELECT CAST(i AS VARCHAR) AS id, 'review number ' || i || CASE WHEN i = 3 THEN ' changed' ELSE '' END "
                    "AS prompt FROM range(6) t(i)")
    run(s)
    assert_summaries_match_history(s)
    assert fetch(s, "SELECT custom_id, key_json FROM bb_state.key_inputs WHERE custom_id IN ('2', '3')") == [
        ("2", "[2]"), ("3", '["3"]')]
    assert sorted(r["id"] for r in current(s, "items")) == ["0", "1", "2", "3", "4", "5"]


def test_prompts_changed_without_changing_their_length_are_all_detected(project):
    # Same length, and changed only at bytes 7 and 15: DuckDB's hash() alone keeps changes confined to
    # the last byte of 8-byte blocks in 8 bits, so about 1 in 256 of these would collide with it.
    n = 2000
    s = project(rows_sql(n))
    run(s)
    assert plan(s)["up_to_date_rows"] == n
    changed = ("overlay(overlay('review ' || lpad(i::VARCHAR, 9, '0') || ' is great, really great!' "
               "PLACING chr(65 + (i % 26)::INT) FROM 8 FOR 1) PLACING chr(97 + (i // 26 % 26)::INT) FROM 16 FOR 1)")
    load_staging(s, rows_sql(n, changed))
    con = duckdb.connect(str(s.warehouse))
    assert con.execute("SELECT count(DISTINCT strlen(prompt)) FROM stg_items").fetchone() == (1,)
    con.close()
    p = plan(s)
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (n, 0)


def test_fingerprints_of_another_duckdb_version_or_job_definition_are_not_used(project):
    s = project(rows_sql(30))
    run(s)
    p = plan(s)
    assert p["up_to_date_rows"] == 30
    with state.connect(s) as con:
        con.execute("UPDATE bb_state.key_inputs SET hash_version = 'v0.0.1'")
    assert plan(s) == p  # every prompt hashed again (md5): the same answer
    load_staging(s, rows_sql(30, "'review ' || i || ' changed'"))
    with state.connect(s) as con:  # fingerprints would say "unchanged" for these new prompts ...
        con.execute(
            "UPDATE bb_state.key_inputs k SET hash_version = ?, fingerprint = hash(p, 'bbfp' || p), prompt_bytes = strlen(p) "
            "FROM (SELECT 'r' || lpad(i::VARCHAR, 6, '0') AS id, 'review ' || i || ' changed' AS p FROM range(30) t(i)) n "
            "WHERE k.custom_id = n.id", [duckdb.__version__])
        con.execute("UPDATE bb_state.key_inputs SET static_hash = 'another job definition'")
    assert plan(s)["rows_to_send"] == 30  # ... but they were taken under another job definition


def test_duplicate_keys_among_unchanged_rows_are_still_rejected(project):
    s = project(rows_sql(10))
    run(s)
    load_staging(s, rows_sql(10) + " UNION ALL SELECT 'r000004', 'review 000000004 is great, really great!'")
    p = plan(s)
    assert p["skipped"] == {"duplicate_key": {"rows": 2, "why": p["skipped"]["duplicate_key"]["why"]}}
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (0, 9)
    run(s)
    assert {r["id"] for r in current(s, "items")} == {f"r{i:06d}" for i in range(10)}


def test_a_view_as_staging_model_plans_the_same_as_a_table(tmp_path, emulator):
    """A view has no rowid: the rows a plan stages again are found by key values (NULL keys separately)
    and copied, and request lines are built from the copy by its rowids, a request shared by keys with
    the same input from the first of them."""
    sql = ("SELECT * FROM (VALUES ('a', 'one'), (NULL, 'no key'), ('d', 'dup 1'), ('d', 'dup 2'), "
           "('e', '   '), ('g', 'good'), ('h', 'fine'), ('i', 'fine')) v(id, prompt)")
    write_project(tmp_path, job_meta(), sql=sql, materialized="view")
    s = settings_for(tmp_path, emulator.base_url)
    from batch_bridge import dbt_runner

    dbt_runner.invoke(s, ["build"])
    p = plan(s)
    assert (p["rows_to_send"], p["requests_to_send"], p["deduplicated_rows"]) == (4, 3, 1)
    run(s)
    rows = {r["id"]: r for r in current(s, "items")}
    assert set(rows) == {"a", "g", "h", "i"}
    assert rows["h"]["output_text"] == rows["i"]["output_text"] and "fine" in rows["h"]["output_text"]
    assert (rows["h"]["deduplicated"], rows["i"]["deduplicated"]) == (False, True)
    p = plan(s)
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (0, 4)
    assert {k: v["rows"] for k, v in p["skipped"].items()} == {"null_key": 1, "duplicate_key": 2, "empty_prompt": 1}
    write_project(tmp_path, job_meta(), sql=sql.replace("'good'", "'goad'"), materialized="view")
    dbt_runner.invoke(s, ["build"])
    p = plan(s)
    assert (p["rows_to_send"], p["up_to_date_rows"]) == (1, 3)
    run(s)
    assert_summaries_match_history(s)


# A list aggregate cannot spill: its state is one allocation DuckDB doubles as it grows (3M BIGINTs ran
# out of memory at 8-64 MiB and fitted at 128 MiB, measured), so running out is certain under a small limit.
UNSPILLABLE = "CREATE OR REPLACE TEMP TABLE t AS SELECT list(i) AS l FROM range(3000000) r(i)"


def test_a_step_that_runs_out_of_memory_runs_again_with_more_room_and_the_limit_comes_back(tmp_path):
    write_project(tmp_path, job_meta())
    s = settings_for(tmp_path)
    con = duckdb.connect(str(tmp_path / "room.duckdb"))
    con.execute("SET memory_limit = '16MiB'")
    limits = []

    def step():
        limits.append(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        con.execute(UNSPILLABLE)
        return con.execute("SELECT len(l) FROM t").fetchone()[0]

    assert state.grown_until_it_fits(con, s, step) == 3_000_000
    assert len(limits) >= 2  # it ran out at 16 MiB at least once
    assert [size_bytes(x) for x in limits] == [16 * 2**20 * 2**i for i in range(len(limits))]
    assert size_bytes(con.execute("SELECT current_setting('memory_limit')").fetchone()[0]) == 16 * 2**20


def test_a_limit_the_user_set_is_never_raised_to_make_a_step_fit(tmp_path):
    write_project(tmp_path, job_meta())
    s = settings_for(tmp_path, BATCH_BRIDGE_MEMORY_LIMIT="16MiB")
    assert s.memory_limit_set
    con = duckdb.connect(str(tmp_path / "room.duckdb"))
    con.execute("SET memory_limit = '16MiB'")
    calls = []

    def step():
        calls.append(1)
        con.execute(UNSPILLABLE)

    with pytest.raises(duckdb.OutOfMemoryException):
        state.grown_until_it_fits(con, s, step)
    assert len(calls) == 1
    assert size_bytes(con.execute("SELECT current_setting('memory_limit')").fetchone()[0]) == 16 * 2**20


def test_one_home_serves_one_warehouse(tmp_path, emulator):
    """Two targets whose warehouse files share a folder would share the default home (state and results
    source) and publish over each other's answers: the second is stopped with the fix."""
    write_project(tmp_path, job_meta())
    dev = settings_for(tmp_path, emulator.base_url, BATCH_BRIDGE_WAREHOUSE=str(tmp_path / "dev.duckdb"))
    ci = settings_for(tmp_path, emulator.base_url, BATCH_BRIDGE_WAREHOUSE=str(tmp_path / "ci.duckdb"))
    assert dev.home == ci.home
    with state.connect(dev):
        pass
    with pytest.raises(ConfigError) as e:
        with state.connect(ci):
            pass
    assert "holds the state and results of the warehouse 'dev.duckdb'" in e.value.message
    assert "warehouse is 'ci.duckdb'" in e.value.message and "BATCH_BRIDGE_HOME" in e.value.hint
    # Its own home, as the hint says: both go on.
    ci_own = settings_for(tmp_path, emulator.base_url, BATCH_BRIDGE_WAREHOUSE=str(tmp_path / "ci.duckdb"),
                          BATCH_BRIDGE_HOME=str(tmp_path / ".batch_bridge_ci"))
    for s in (dev, ci_own):
        with state.connect(s) as con:
            assert con.execute("SELECT 1").fetchone() == (1,)
    # A warehouse renamed on purpose: the name written into the marker, as the hint says.
    (dev.home / state.OWNER_FILE).write_text("ci.duckdb\n")
    with state.connect(ci) as con:
        assert con.execute("SELECT 1").fetchone() == (1,)
