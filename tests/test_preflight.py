"""Preflight and preview through the CLI: the real SDK over HTTP to the emulator, a real dbt project and
DuckDB warehouse. What was (not) sent is read from the emulator's own counters (GET /_emulator/stats)."""

from __future__ import annotations

import json
import socket

import duckdb
import httpx2
import pytest
from click.testing import CliRunner

from batch_bridge.cli import cli
from helpers import current, load_staging, settings_for, write_project

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "topics": {"type": "array", "items": {"type": "string"}}},
    "required": ["label", "topics"],
    "additionalProperties": False,
}


def meta(**over):
    m = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
         "cache_ttl": "none"}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def setup(tmp_path, emulator, m, sql="SELECT 'k' || i AS id, 'text number ' || i AS prompt FROM range(6) t(i)"):
    write_project(tmp_path, m)
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, sql)
    env = {
        "BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-test-preflight",
        "ANTHROPIC_BASE_URL": emulator.base_url, "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
        "BATCH_BRIDGE_LOCK_TIMEOUT": "2", "DBT_PROJECT_DIR": str(s.project_dir), "DBT_PROFILES_DIR": str(s.profiles_dir),
    }
    return s, env


def invoke(args, env):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def stats(emulator) -> dict:
    return httpx2.get(f"{emulator.base_url}/_emulator/stats").json()


def test_a_typo_in_the_model_exits_2_with_the_suggestion_and_sends_nothing(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-sonet-4-5"))
    for command in (["plan"], ["sync"], ["submit"]):
        r = invoke(command, env)
        assert r.exit_code == 2, (command, r.output)
        assert "'claude-sonet-4-5' is not a model the API knows" in r.stderr
        assert "did you mean 'claude-sonnet-4-5'?" in r.stderr
    st = stats(emulator)
    assert st["create_posts"] == 0 and st["batches_created"] == 0
    assert not s.requests_dir.exists() or not list(s.requests_dir.glob("*.jsonl"))  # no request file written


def test_deprecated_model_warns_with_the_retirement_date_and_proceeds(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-3-opus"))
    r = invoke(["plan", "--json"], env)
    assert r.exit_code == 0, r.output
    pf = json.loads(r.stdout)["jobs"][0]["preflight"]
    assert pf["lifecycle"] == "deprecated"
    assert any("deprecated" in w and "retires on 2027-01-05" in w for w in pf["warnings"])
    r = invoke(["sync"], env)
    assert r.exit_code == 0, r.output
    assert "warning: model 'claude-3-opus' is deprecated" in r.stderr
    assert stats(emulator)["requests_created"] == 6


def test_retired_model_and_model_without_batch_support_are_refused(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-3-5-sonnet"))
    r = invoke(["sync"], env)
    assert r.exit_code == 2 and "'claude-3-5-sonnet' is retired" in r.stderr
    write_project(tmp_path, meta(model="claude-mythos-preview"))
    r = invoke(["submit"], env)
    assert r.exit_code == 2 and "does not support the Message Batches API" in r.stderr
    assert stats(emulator)["create_posts"] == 0


def test_max_tokens_above_the_models_limit_is_refused_with_both_numbers(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-3-haiku", max_tokens=8000))
    r = invoke(["sync"], env)
    assert r.exit_code == 2
    assert "max_tokens = 8,000 is above the 4,096 that model 'claude-3-haiku' allows" in r.stderr
    assert stats(emulator)["create_posts"] == 0


def test_output_schema_on_a_model_without_structured_outputs_names_output_tool(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-3-haiku", output_schema=SCHEMA))
    r = invoke(["sync"], env)
    assert r.exit_code == 2 and "no structured outputs" in r.stderr and "use output_tool" in r.stderr
    tool = {"name": "record", "description": "Record the label.", "input_schema": SCHEMA}
    write_project(tmp_path, meta(model="claude-3-haiku", output_tool=tool))
    r = invoke(["sync"], env)
    assert r.exit_code == 0, r.output
    assert stats(emulator)["requests_created"] == 6


def test_a_schema_with_an_unsupported_keyword_is_refused_with_its_path(tmp_path, emulator):
    bad = json.loads(json.dumps(SCHEMA))
    bad["properties"]["topics"]["maxItems"] = 3
    s, env = setup(tmp_path, emulator, meta(output_schema=bad))
    r = invoke(["sync"], env)
    assert r.exit_code == 2
    assert "'maxItems' at $.properties.topics.maxItems" in r.stderr
    open_object = {**SCHEMA, "properties": {**SCHEMA["properties"], "detail": {"type": "object", "properties": {}}}}
    write_project(tmp_path, meta(output_schema=open_object))
    r = invoke(["plan"], env)
    assert r.exit_code == 2
    assert "'additionalProperties' at $.properties.detail.additionalProperties" in r.stderr
    assert stats(emulator)["create_posts"] == 0


def test_a_row_longer_than_the_context_window_is_rejected_with_its_reason_and_the_others_sent(tmp_path, emulator):
    # 200,000 input tokens is about 800,000 characters by the calibrated rule; one row has 1,000,000.
    sql = ("SELECT 'k' || i AS id, CASE WHEN i = 2 THEN repeat('long text ', 100000) ELSE 'short text ' || i END "
           "AS prompt FROM range(5) t(i)")
    s, env = setup(tmp_path, emulator, meta(), sql=sql)
    r = invoke(["plan", "--json"], env)
    j = json.loads(r.stdout)["jobs"][0]
    assert j["rows_to_send"] == 4 and j["skipped"]["too_long"]["rows"] == 1
    assert "context window" in j["skipped"]["too_long"]["why"]
    assert invoke(["run", "--timeout", "30"], env).exit_code == 0
    assert stats(emulator)["requests_created"] == 4
    assert sorted(row["id"] for row in current(s, "items")) == ["k0", "k1", "k3", "k4"]
    con = duckdb.connect()
    rejected = con.execute(
        f"SELECT * FROM read_parquet('{s.results_dir('items') / 'rejected.parquet'}')").fetchall()
    cols = [d[0] for d in con.description]
    assert len(rejected) == 1
    row = dict(zip(cols, rejected[0]))
    assert row["reason"] == "too_long" and "input tokens" in (row.get("detail") or "")
    st = json.loads(invoke(["status", "--json"], env).stdout)
    assert st["jobs"][0]["not_sent"]["too_long"]["rows"] == 1


def test_a_slow_models_api_still_holds_rows_to_the_context_window_and_its_refusal_still_writes_nothing(
        tmp_path, emulator):
    # The Models API answers after the rows are staged and classified: `run` classifies as if every row
    # fit, and must classify again once the context window is known (one row is over it).
    emulator.configure(models_latency=2.0)
    sql = ("SELECT 'k' || i AS id, CASE WHEN i = 2 THEN repeat('long text ', 100000) ELSE 'short text ' || i END "
           "AS prompt FROM range(5) t(i)")
    s, env = setup(tmp_path, emulator, meta(), sql=sql)
    assert invoke(["run", "--timeout", "30"], env).exit_code == 0
    assert stats(emulator)["requests_created"] == 4
    assert sorted(row["id"] for row in current(s, "items")) == ["k0", "k1", "k3", "k4"]
    st = json.loads(invoke(["status", "--json"], env).stdout)
    assert st["jobs"][0]["not_sent"]["too_long"]["rows"] == 1
    # The request file written and journalled on the guess (all 5 rows, while the Models API was still
    # answering) was replaced and its journal rolled back: the one file left is the journalled one, with
    # the 4 rows sent, and so are the sent requests.
    with duckdb.connect(str(s.state_path), read_only=True) as con:
        journalled = {r[0] for r in con.execute("SELECT request_file FROM submissions").fetchall()}
        assert con.execute("SELECT count(*) FROM sent_requests").fetchone()[0] == 4
        versions = con.execute("SELECT count(*) FROM key_versions").fetchone()[0]
    files = {str(p) for p in s.requests_dir.glob("*.jsonl")}
    assert files == journalled and len(files) == 1
    assert sum(1 for _ in open(next(iter(files)))) == 4
    # A refusal that arrives after the classification stops the run before anything is journalled, and
    # the request files written meanwhile are removed.
    write_project(tmp_path, meta(model="claude-sonet-4-5", max_tokens=60))
    r = invoke(["run", "--timeout", "30"], env)
    assert r.exit_code == 2 and "claude-sonnet-4-5" in r.stderr, r.output
    assert stats(emulator)["create_posts"] == 1
    with duckdb.connect(str(s.state_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM submissions").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM key_versions").fetchone()[0] == versions  # rolled back
    assert {str(p) for p in s.requests_dir.glob("*.jsonl")} == files
    assert not list(s.requests_dir.glob(".*.tmp"))


def test_the_samples_token_counts_are_asked_for_while_the_models_api_answers(tmp_path, emulator):
    # The token counts need the SDK, as the preflight does: they are asked for as soon as it is
    # imported, beside the Models API call, not once that call has answered.
    emulator.configure(models_latency=3.0)
    s, env = setup(tmp_path, emulator, meta())
    emulator.stats.reset()
    assert invoke(["run", "--timeout", "30"], env).exit_code == 0
    arrivals = emulator.stats.arrivals()
    models = [t for t, ep, _ in arrivals if ep == "models"]
    counts = [t for t, ep, _ in arrivals if ep == "count_tokens"]
    assert models and len(counts) == 7, arrivals  # the 6 requests and the job's shared prefix
    assert max(counts) < models[0] + 3.0, (models, counts)  # all asked before the Models API answered
    assert stats(emulator)["requests_created"] == 6


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_preflight_says_what_it_could_not_check_and_goes_on(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta())
    # No key: plan still plans, and says the model was not checked.
    no_key = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    r = invoke(["plan", "--json"], no_key)
    assert r.exit_code == 0, r.output
    assert any("no ANTHROPIC_API_KEY" in u for u in json.loads(r.stdout)["jobs"][0]["preflight"]["unchecked"])
    # Nothing listening: the preflight gives up at once and the plan goes on.
    r = invoke(["plan", "--json"], {**env, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{_closed_port()}"})
    assert r.exit_code == 0, r.output
    assert any("did not answer" in u for u in json.loads(r.stdout)["jobs"][0]["preflight"]["unchecked"])
    # The Models API failing (503) while the Batches API works: the rows are still sent.
    emulator.set_faults(http_errors=[503], http_error_endpoints=("models",))
    r = invoke(["sync"], env)
    assert r.exit_code == 0, r.output
    assert "preflight could not check" in r.stderr and "HTTP 503" in r.stderr
    assert stats(emulator)["requests_created"] == 6


def _age_model_answers(s, minutes: int) -> None:
    con = duckdb.connect(str(s.state_path))
    con.execute(f"UPDATE model_info SET fetched_at = fetched_at - INTERVAL {minutes} MINUTE")
    con.close()


def test_model_answers_are_kept_for_an_hour_and_used_older_when_offline(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(model="claude-3-opus"))
    assert invoke(["plan"], env).exit_code == 0
    assert invoke(["plan"], env).exit_code == 0
    assert invoke(["sync"], env).exit_code == 0
    assert stats(emulator)["requests_by_endpoint"]["models"] == 1
    _age_model_answers(s, 61)
    assert invoke(["plan"], env).exit_code == 0
    assert stats(emulator)["requests_by_endpoint"]["models"] == 2
    # Offline with only an old answer: it is used (still warning of the deprecation), and said so.
    _age_model_answers(s, 600)
    emulator.set_faults(http_errors=[503], http_error_endpoints=("models",))
    pf = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]["preflight"]
    assert any("used what the Models API said of 'claude-3-opus'" in u for u in pf["unchecked"])
    assert pf["lifecycle"] == "deprecated" and any("deprecated" in w for w in pf["warnings"])


def test_a_cache_too_short_to_work_is_a_warning_with_both_numbers(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(system="You label short texts.", cache_ttl="1h"))
    j = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    [warning] = [w for w in j["preflight"]["warnings"] if "cache_ttl" in w]
    assert "below the 4,096 model 'claude-haiku-4-5' needs" in warning
    assert f"~{j['estimate']['cache_prefix_tokens']:,} tokens" in warning
    assert j["estimate"]["cache_write_tokens"] == 0 and j["estimate"]["cache_read_tokens"] == 0
    # The default cache_ttl marks the prefix too, but a job that did not ask for caching is not warned.
    write_project(tmp_path, meta(system="You label short texts.", cache_ttl=None))
    j = json.loads(invoke(["plan", "--json"], env).stdout)["jobs"][0]
    assert not [w for w in j["preflight"]["warnings"] if "cache_ttl" in w]
    assert j["estimate"]["cache_prefix_tokens"] < 4096


def test_preview_makes_three_synchronous_calls_and_sync_still_sends_every_row(tmp_path, emulator):
    sql = "SELECT 'k' || i AS id, repeat('word ', i + 1) AS prompt FROM range(9) t(i)"
    s, env = setup(tmp_path, emulator, meta(output_schema=SCHEMA), sql=sql)
    r = invoke(["preview", "--rows", "3", "--json"], env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    st = stats(emulator)
    assert st["requests_by_endpoint"]["messages"] == 3 and st["messages_answered"] == 3
    assert st["batches_created"] == 0 and st["create_posts"] == 0
    rows = {row["why"]: row for row in data["rows"]}
    assert (rows["longest"]["key"], rows["shortest"]["key"], rows["typical"]["key"]) == ("k8", "k0", "k4")
    assert rows["longest"]["request"]["prompt"] == "word " * 9
    for row in data["rows"]:
        assert row["parsed"]["label"] in ("a", "b") and isinstance(row["parsed"]["topics"], list)
        assert json.loads(row["answer"]) == row["parsed"] and row["parse_error"] is None
        assert row["usage"]["input_tokens"] > 0 and row["cost_usd"] > 0
    assert data["cost_usd"] == pytest.approx(sum(row["cost_usd"] for row in data["rows"]))
    assert not (s.results_dir("items") / "current.parquet").exists()  # nothing written to the results source
    r = invoke(["sync", "--json"], env)
    assert r.exit_code == 0, r.output
    assert stats(emulator)["requests_created"] == 9


def test_preview_of_given_keys_shows_a_parse_failure(tmp_path, emulator):
    s, env = setup(tmp_path, emulator, meta(output_schema=SCHEMA, max_tokens=3))
    r = invoke(["preview", "--key", "k1", "--key", "k5", "--json"], env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [row["key"] for row in data["rows"]] == ["k1", "k5"] and {row["why"] for row in data["rows"]} == {"asked"}
    for row in data["rows"]:  # 3 tokens cut the JSON short
        assert row["stop_reason"] == "max_tokens" and row["parsed"] is None and "not JSON" in row["parse_error"]
    r = invoke(["preview", "--key", "nope"], env)
    assert r.exit_code == 2 and "--key 'nope'" in r.stderr


def _run_on_a_terminal(args: list[str], env: dict, answer: bytes | None) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a pseudo-terminal; answer its question if it asks one."""
    import os
    import pty
    import select
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "batch_bridge.cli", *args], stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE, env={**os.environ, **env})
    os.close(slave)
    seen = b""
    try:
        while proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if answer is not None and b"[y/N]" in seen:
                    os.write(master, answer)
                    answer = None
        proc.wait(timeout=120)
    finally:
        os.close(master)
        proc.stdout.close()  # type: ignore[union-attr]
    return proc.returncode, seen.decode(errors="replace")


def test_preview_asks_on_a_terminal_above_fifty_cents_and_yes_skips_the_question(tmp_path, emulator):
    # 3 rows x 32,000 output tokens at $75 per million: up to $7.20.
    s, env = setup(tmp_path, emulator, meta(model="claude-opus-4-1", max_tokens=32000))
    code, terminal = _run_on_a_terminal(["preview"], env, b"n\n")
    assert code == 0 and "spend up to $7.2" in terminal and "nothing sent" in terminal
    assert stats(emulator)["requests_by_endpoint"].get("messages", 0) == 0
    code, terminal = _run_on_a_terminal(["preview", "--yes"], env, None)
    assert code == 0 and "[y/N]" not in terminal
    assert stats(emulator)["requests_by_endpoint"]["messages"] == 3
