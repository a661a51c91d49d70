"""The two lanes: synchronous Messages calls for small or urgent work, batches for the rest.

Through the CLI (CliRunner, or a subprocess for SIGKILL), a real dbt project and DuckDB warehouse, the
real SDK over HTTP to the emulator. What was sent is read from the emulator's own counters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx2
import pytest
from click.testing import CliRunner

from batch_bridge import state
from batch_bridge.cli import cli
from batch_bridge.pricing import load_prices
from helpers import current, load_staging, settings_for, write_project


def meta(**over):
    m = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
         "cache_ttl": "none", "lane": "auto"}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def rows_sql(n: int, changed: int = 0) -> str:
    """`n` rows; the first `changed` of them with a new text."""
    return (f"SELECT 'k' || lpad(i::VARCHAR, 5, '0') AS id, CASE WHEN i < {changed} THEN 'edited review ' "
            f"ELSE 'review number ' END || i AS prompt FROM range({n}) t(i)")


def setup(tmp_path, emulator, m, n=20):
    write_project(tmp_path, m)
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, rows_sql(n))
    env = {
        "BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-test-lanes",
        "ANTHROPIC_BASE_URL": emulator.base_url, "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
        "BATCH_BRIDGE_LOCK_TIMEOUT": "5", "DBT_PROJECT_DIR": str(s.project_dir), "DBT_PROFILES_DIR": str(s.profiles_dir),
    }
    return s, env


def invoke(args, env, code=0):
    r = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def stats(emulator) -> dict:
    return httpx2.get(f"{emulator.base_url}/_emulator/stats").json()


def fetch(s, sql):
    with state.connect(s) as con:
        return con.execute(sql).fetchall()


def test_auto_answers_a_few_changed_rows_synchronously_and_sends_many_as_a_batch(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(), n=600)
    first = json.loads(invoke(["run", "--json"], env).stdout)  # 600 new rows: more than 100 -> one batch
    assert len(first["submitted"]) == 1 and first["sync_lane"]["answered"] == {}
    assert stats(emulator)["messages_answered"] == 0

    load_staging(s, rows_sql(600, changed=5))
    plan = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    assert (plan["lane"], plan["lanes"]["sync"]["requests"], plan["lanes"]["batch"]["requests"]) == ("sync", 5, 0)
    assert "at most sync_max_requests (100)" in plan["lane_why"]
    r = json.loads(invoke(["sync", "--json"], env).stdout)  # answered within the same command
    assert r["submitted"] == [] and r["sync_lane"]["answered"] == {"items": 5}
    st = stats(emulator)
    assert st["batches_created"] == 1 and st["messages_answered"] == 5
    rows = {x["id"]: x for x in current(s, "items")}
    assert len(rows) == 600 and not any(x["is_stale"] for x in rows.values())
    edited = [x for x in rows.values() if x["lane"] == "sync"]
    assert sorted(x["id"] for x in edited) == [f"k{i:05d}" for i in range(5)]
    assert all(x["status"] == "succeeded" and x["output_text"] for x in edited)
    assert {x["lane"] for x in rows.values() if x["id"] >= "k00005"} == {"batch"}

    # Standard prices for the sync lane, batch prices for the batch lane, from the same price book.
    book = load_prices(None)
    for x in (edited[0], rows["k00300"]):
        full = book.cost(x["model"], input_tokens=x["input_tokens"], output_tokens=x["output_tokens"], batch=False)
        assert x["cost_usd"] == pytest.approx(full if x["lane"] == "sync" else full * book.batch_discount)

    status = json.loads(invoke(["status", "--json"], env).stdout)["jobs"][0]["lanes"]
    assert (status["sync"]["rows_answered"], status["batch"]["rows_answered"]) == (5, 595)
    assert status["sync"]["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in edited))

    # Nothing is left to send, in either lane.
    again = json.loads(invoke(["sync", "--json"], env).stdout)
    assert again["submitted"] == [] and again["sync_lane"]["answered"] == {}
    assert stats(emulator)["messages_answered"] == 5

    # 500 changed rows: more than sync_max_requests, so they go as a batch.
    load_staging(s, rows_sql(600, changed=500).replace("'edited review '", "'edited twice '"))
    r = json.loads(invoke(["sync", "--json"], env).stdout)
    assert len(r["submitted"]) == 1 and r["sync_lane"]["answered"] == {}
    assert stats(emulator)["messages_answered"] == 5


def test_lane_flag_and_field_override_and_dedupe_and_invalid_values(tmp_path, emulator):
    # Two keys with the same prompt: one call answers both (dedupe), as in a batch.
    s, env = setup(tmp_path, emulator, meta(lane="batch"), n=6)
    load_staging(s, rows_sql(6) + " UNION ALL SELECT 'dup', 'review number 3'")
    r = json.loads(invoke(["submit", "--lane", "sync", "--json"], env).stdout)
    assert r["batches"] == [] and r["sync_lane"]["answered"] == {"items": 6}
    rows = {x["id"]: x for x in current(s, "items")}
    assert len(rows) == 7 and rows["dup"]["output_text"] == rows["k00003"]["output_text"]
    assert sorted([rows["dup"]["deduplicated"], rows["k00003"]["deduplicated"]]) == [False, True]
    assert rows["dup"]["lane"] == rows["k00003"]["lane"] == "sync"
    assert stats(emulator)["messages_answered"] == 6
    bad = CliRunner().invoke(cli, ["sync", "--lane", "fast"], env=env)
    assert bad.exit_code == 2 and "'fast' is not one of 'batch', 'sync', 'auto'" in bad.output

    write_project(tmp_path, meta(lane="quick"))
    r = CliRunner().invoke(cli, ["plan"], env=env)
    assert r.exit_code == 2 and "lane" in r.output and "'quick'" in r.output and "'batch', 'sync' or 'auto'" in r.output
    write_project(tmp_path, meta(deadline="soon"))
    r = CliRunner().invoke(cli, ["plan"], env=env)
    assert r.exit_code == 2 and "deadline" in r.output and "'2h'" in r.output


def test_the_budget_gate_holds_the_sync_lane_to_standard_prices(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(), n=50)
    plan = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    e = plan["estimate"]
    assert plan["lane"] == "sync" and e["lane_usd"] == pytest.approx(e["sync_lane_usd"])
    assert e["sync_lane_usd"] == pytest.approx(2 * e["batch_usd"])  # no cache: exactly the batch discount
    limit = (e["batch_usd"] + e["sync_lane_usd"]) / 2  # a batch would fit; synchronous calls do not
    r = CliRunner().invoke(cli, ["sync", "--max-cost", f"{limit:.6f}"], env=env)
    assert r.exit_code != 0 and "synchronous calls at standard prices" in r.output
    assert stats(emulator)["messages_answered"] == 0
    r = json.loads(invoke(["sync", "--max-cost", f"{limit:.6f}", "--lane", "batch", "--json"], env).stdout)
    assert len(r["submitted"]) == 1


def test_deadline_routes_by_the_observed_durations_of_the_jobs_batches(tmp_path, emulator):
    emulator.configure(latency=2.0)  # batches of this job take about 2 seconds
    s, env = setup(tmp_path, emulator, meta(sync_max_requests=0, deadline="1h"), n=30)
    plan = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    assert plan["lane"] == "sync" and "sooner than the 24h a batch may take" in plan["lane_why"]  # none seen yet
    invoke(["run", "--lane", "batch", "--json"], env)
    [(took,)] = fetch(s, "SELECT epoch(ended_at - created_at) FROM bb_state.batches WHERE lane = 'batch'")
    assert took >= 1.5

    load_staging(s, rows_sql(30, changed=30))
    write_project(tmp_path, meta(sync_max_requests=0, deadline="1s"))  # sooner than batches have taken
    plan = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    assert plan["lane"] == "sync" and "deadline 1s is sooner than batches of this job take" in plan["lane_why"]
    write_project(tmp_path, meta(sync_max_requests=0, deadline="1m"))  # later than batches have taken
    plan = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    assert plan["lane"] == "batch" and "end within deadline 1m" in plan["lane_why"]
    write_project(tmp_path, meta(sync_max_requests=0, deadline="1s"))
    r = json.loads(invoke(["sync", "--json"], env).stdout)
    assert r["submitted"] == [] and r["sync_lane"]["answered"] == {"items": 30}


def test_rate_limits_and_overload_are_waited_out_and_a_refused_input_is_rejected_with_its_reason(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(sync_concurrency=3), n=12)
    emulator.set_faults(http_errors=[429, 429, 529, 529, 500], http_error_endpoints=("messages",), retry_after=0.2)
    r = json.loads(invoke(["sync", "--json"], env).stdout)
    st = stats(emulator)
    assert r["sync_lane"]["answered"] == {"items": 12} and r["sync_lane"]["calls"] == 17
    assert st["faults_fired"] == {"http_429": 2, "http_529": 2, "http_500": 1} and st["messages_answered"] == 12
    assert all(x["status"] == "succeeded" for x in current(s, "items"))

    # Overloaded on every try: recorded as errored (retryable), sent again by the next run.
    emulator.set_faults(http_errors=[], http_error_fraction=1.0, http_error_status=529, retry_after=0.01)
    load_staging(s, rows_sql(12, changed=1))
    invoke(["sync", "--json"], env)
    [row] = [x for x in current(s, "items") if x["id"] == "k00000"]
    assert (row["status"], row["error_type"], row["lane"], row["is_stale"]) == ("errored", "overloaded_error", "sync", False)
    emulator.clear_faults()
    r = json.loads(invoke(["sync", "--json"], env).stdout)
    assert r["sync_lane"]["answered"] == {"items": 1}
    [row] = [x for x in current(s, "items") if x["id"] == "k00000"]
    assert (row["status"], row["attempt"]) == ("succeeded", 2)

    # A request the API refuses (400) is the input's answer: not sent again, rejected with its reason.
    emulator.set_faults(http_errors=[400], http_error_endpoints=("messages",))
    load_staging(s, rows_sql(12, changed=2))
    invoke(["sync", "--json"], env)
    [row] = [x for x in current(s, "items") if x["status"] != "succeeded"]
    assert (row["status"], row["error_type"], row["lane"]) == ("errored", "invalid_request_error", "sync")
    again = json.loads(invoke(["sync", "--json"], env).stdout)
    assert again["sync_lane"]["answered"] == {}
    status = json.loads(invoke(["status", "--json"], env).stdout)["jobs"][0]
    assert status["not_sent"]["invalid_request"]["rows"] == 1
    assert status["failures_by_type"] == {"invalid_request_error": 1}
    assert stats(emulator)["faults_fired"]["http_400"] == 1


def cli_proc(s, env, *args, fault=None):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
    e.update(env)
    e["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    if fault:
        e["BATCH_BRIDGE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "batch_bridge.cli", *args], env=e, capture_output=True, text=True,
                          timeout=120)


def test_a_sigkill_mid_sync_lane_pays_no_completed_call_twice(tmp_path, emulator):
    emulator.configure(messages_latency=0.05)
    n = 40
    s, env = setup(tmp_path, emulator, meta(sync_concurrency=4), n=n)
    r = cli_proc(s, env, "sync", fault="during_sync")
    assert r.returncode == -signal.SIGKILL, r.stderr
    import time

    time.sleep(0.3)  # calls the killed process had sent are still answered by the emulator
    paid_before = stats(emulator)["messages_answered"]
    [(run_id,)] = fetch(s, "SELECT batch_id FROM bb_state.batches WHERE lane = 'sync'")
    raw = s.raw_results_dir / f"{run_id}.jsonl"
    recorded = len(raw.read_bytes().splitlines())
    assert 1 <= recorded < n and paid_before >= recorded
    in_flight_at_kill = paid_before - recorded
    assert in_flight_at_kill <= 4  # at most sync_concurrency calls were out

    r = cli_proc(s, env, "sync", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sync_lane"]["answered"] == {"items": n - recorded}  # the recorded answers were not asked again
    assert stats(emulator)["messages_answered"] - paid_before == n - recorded
    rows = current(s, "items")
    assert len(rows) == n and all(x["status"] == "succeeded" and x["lane"] == "sync" for x in rows)
    assert fetch(s, "SELECT count(*), count(DISTINCT input_hash) FROM bb_state.responses") == [(n, n)]
    r = cli_proc(s, env, "sync", "--json")
    assert json.loads(r.stdout)["sync_lane"]["answered"] == {}
    assert stats(emulator)["messages_answered"] - paid_before == n - recorded


def test_an_account_failure_stops_the_lane_and_the_next_run_answers_the_rows_once(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(), n=8)
    emulator.configure(api_key="sk-another-key")  # every call answers 401
    r = CliRunner().invoke(cli, ["sync", "--json"], env=env)
    assert r.exit_code != 0 and "rejected the key" in r.output and "sk-test-lanes" not in r.output
    rows = json.loads(invoke(["status", "--json"], env).stdout)["jobs"][0]["rows"]
    assert (rows["in_flight"], rows["succeeded"]) == (8, 0)  # journalled, in the open run: not lost
    emulator.configure(api_key=None)
    r = json.loads(invoke(["sync", "--json"], env).stdout)
    assert r["sync_lane"]["answered"] == {"items": 8} and stats(emulator)["messages_answered"] == 8
    assert fetch(s, "SELECT count(*) FROM bb_state.submissions") == [(1,)]  # the same run, resumed
    assert len(current(s, "items")) == 8


def test_a_model_without_batch_support_is_refused_for_batches_and_answered_in_the_sync_lane(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-mythos-preview", lane="batch"), n=3)
    r = CliRunner().invoke(cli, ["sync"], env=env)
    assert r.exit_code == 2 and "does not support the Message Batches API" in r.stderr
    r = json.loads(invoke(["sync", "--lane", "sync", "--json"], env).stdout)
    assert r["sync_lane"]["answered"] == {"items": 3} and stats(emulator)["create_posts"] == 0
    assert {x["status"] for x in current(s, "items")} == {"succeeded"}
