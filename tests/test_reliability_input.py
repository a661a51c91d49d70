"""Bad input: every case gets a clear message (naming the field, the value and what is allowed) or a
recorded per-row reason, and nothing else is affected. Hostile identifiers cannot inject SQL.

One dbt project declares a job per case (parsed once); each test selects its job.
"""

from __future__ import annotations

import copy
import json

import duckdb
import pytest
import yaml

from batch_bridge import api, bridge, collect as collect_mod, state
from batch_bridge.emulator import EmulatorConfig, default_responder, run_emulator
from batch_bridge.errors import JobDefinitionError, ResultsError, UnknownModel, WarehouseError
from batch_bridge.jobs import parse_job, quote_ident
from helpers import PROFILE, current, settings_for, write_project

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
          "additionalProperties": False}
HOSTILE_KEY = 'id"; DROP TABLE victim; --'
HOSTILE_TABLE = 'stg "odd"; DROP TABLE victim; --'
HOSTILE_PROP = "note'); DROP TABLE victim; --"
BASE = {"model": "claude-haiku-4-5", "max_tokens": 50}

MODELS = {
    "stg_keys": {"job": "keys", "key": "id", "prompt_column": "prompt"},
    "stg_empty": {"job": "empty", "key": "id", "prompt_column": "prompt"},
    "stg_missing": {"job": "missing", "key": "id", "prompt_column": "prompt"},
    "stg_big": {"job": "big", "key": "id", "prompt_column": "prompt", "max_bytes_per_batch": 2048},
    "stg_badmodel": {"job": "badmodel", "key": "id", "prompt_column": "prompt", "model": "claude-sonet-4-5"},
    "stg_refused": {"job": "refused", "key": "id", "prompt_column": "prompt"},
    "stg_text": {"job": "text", "key": "id", "prompt_column": "prompt", "output_schema": SCHEMA},
    "stg_lines": {"job": "lines", "key": "id", "prompt_column": "prompt"},
    "stg_shape": {"job": "shape", "key": "id", "prompt_column": "prompt"},
    "stg_blocks": {"job": "blocks", "key": "id", "prompt_column": "prompt"},
    "stg_hostile": {"job": "hostile", "key": HOSTILE_KEY, "prompt_template": "Say {odd col} twice",
                    "output_schema": {"type": "object", "properties": {HOSTILE_PROP: {"type": "string"}},
                                      "required": [HOSTILE_PROP], "additionalProperties": False}},
}
STAGING = {
    "stg_keys": """SELECT * FROM (VALUES (NULL, 'no key'), ('d', 'dup one'), ('d', 'dup two'),
                   ('with space', 'spaces'), ('rév-ü#1', 'unicode'), ('{long}', 'long key'), ('ok', 'plain'),
                   ('blank', '  '), ('null prompt', NULL)) v(id, prompt)""".replace("{long}", "k" * 80),
    "stg_empty": "SELECT 'x' AS id, 'y' AS prompt WHERE false",
    "stg_big": "SELECT * FROM (VALUES ('small', 'short text'), ('huge', repeat('long text ', 500))) v(id, prompt)",
    "stg_badmodel": "SELECT 'r' || i AS id, 'text ' || i AS prompt FROM range(3) t(i)",
    "stg_refused": "SELECT 'r' || i AS id, 'refused text ' || i AS prompt FROM range(3) t(i)",
    "stg_text": "SELECT 'r' || i AS id, 'PLAIN text ' || i AS prompt FROM range(3) t(i)",
    "stg_lines": "SELECT 'r' || i AS id, 'line text ' || i AS prompt FROM range(6) t(i)",
    "stg_shape": "SELECT 'r' || i AS id, 'shape text ' || i AS prompt FROM range(6) t(i)",
    "stg_blocks": "SELECT 'r' || i AS id, 'BLOCKS text ' || i AS prompt FROM range(3) t(i)",
}


# A result as the real API may send it: a dated model id, thinking and server tool blocks (with fields
# the bridge does not read) before the text, citations, and usage fields the bridge does not know.
BLOCKS_ANSWER = {
    "model": "claude-haiku-4-5-20251001",
    "stop_reason": "end_turn",
    "content": [
        {"type": "thinking", "thinking": "Let me look it up.", "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "ZW5j"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
         "content": [{"type": "web_search_result", "url": "https://example.com", "title": "t",
                      "encrypted_content": "x", "page_age": None}]},
        {"type": "text", "text": "Found it: ",
         "citations": [{"type": "web_search_result_location", "url": "https://example.com", "cited_text": "c"}]},
        {"type": "text", "text": "forty-two."},
    ],
    "usage": {"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                               "ephemeral_1h_input_tokens": 0},
              "server_tool_use": {"web_search_requests": 1}, "service_tier": "batch"},
}


def plain_text_for_plain_prompts(params, custom_id):
    """The model answering prose although a JSON schema was asked for (prompts starting PLAIN), and
    unusual content blocks (prompts starting BLOCKS)."""
    text = params["messages"][-1]["content"]
    if isinstance(text, str) and text.startswith("PLAIN"):
        return {"content": [{"type": "text", "text": "Sorry, here is prose, not JSON."}]}
    if isinstance(text, str) and text.startswith("BLOCKS"):
        return copy.deepcopy(BLOCKS_ANSWER)
    return default_responder(params, custom_id)


@pytest.fixture(scope="module")
def emu():
    with run_emulator(EmulatorConfig(latency=0, responder=plain_text_for_plain_prompts)) as e:
        yield e


@pytest.fixture(scope="module")
def s(tmp_path_factory, emu):
    root = tmp_path_factory.mktemp("input")
    project = root / "dbt_project"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "bb_test", "version": "1.0.0", "config-version": 2, "profile": "bb_test", "model-paths": ["models"]}))
    models = []
    for name, meta in MODELS.items():
        (project / "models" / f"{name}.sql").write_text("select 1 as id, 'x' as prompt\n")
        config = {"meta": {"batch_bridge": {**BASE, **meta}}}
        if name == "stg_hostile":
            config["alias"] = HOSTILE_TABLE
        models.append({"name": name, "config": config})
    (project / "models" / "schema.yml").write_text(yaml.safe_dump({"version": 2, "models": models}, sort_keys=False))
    (root / "profiles").mkdir()
    (root / "profiles" / "profiles.yml").write_text(yaml.safe_dump(PROFILE))
    settings = settings_for(root, emu.base_url)
    con = duckdb.connect(str(settings.warehouse))
    for table, sql in STAGING.items():
        con.execute(f"CREATE TABLE main.{quote_ident(table)} AS {sql}")
    con.execute("CREATE TABLE victim AS SELECT 42 AS answer")
    con.execute(f"""CREATE TABLE main.{quote_ident(HOSTILE_TABLE)} AS
                    SELECT * FROM (VALUES ('a', 'alpha'), ('b', 'beta')) v({quote_ident(HOSTILE_KEY)}, "odd col")""")
    con.close()
    bridge.load_jobs(settings)
    return settings


def jobs(s, name):
    return bridge.load_jobs(s, [name])


def plan(s, name):
    js = jobs(s, name)
    plans, est = bridge.plan(s, js)
    return bridge.plan_to_json(plans[0], est[name])


def run(s, name):
    return bridge.run(s, jobs(s, name), api.build_client(s), timeout=30)


def rejected(s, job):
    con = duckdb.connect()
    return dict(con.execute(
        f"SELECT reason, count(*) FROM read_parquet('{s.results_dir(job) / 'rejected.parquet'}') GROUP BY ALL"
    ).fetchall())


def test_null_duplicate_awkward_keys_and_empty_prompts(s):
    p = plan(s, "keys")
    skipped = {k: v["rows"] for k, v in p["skipped"].items()}
    assert skipped == {"null_key": 1, "duplicate_key": 2, "empty_prompt": 2}
    assert "NULL" in p["skipped"]["null_key"]["why"] and "more than one row" in p["skipped"]["duplicate_key"]["why"]
    run(s, "keys")
    rows = {r["id"]: r for r in current(s, "keys")}
    assert set(rows) == {"with space", "rév-ü#1", "k" * 80, "ok"}
    assert all(r["status"] == "succeeded" for r in rows.values())
    assert rows["ok"]["custom_id"] == "ok"
    assert all(rows[k]["custom_id"].startswith("bbk-") for k in ("with space", "rév-ü#1", "k" * 80))
    assert rejected(s, "keys") == {"null_key": 1, "duplicate_key": 2, "empty_prompt": 2}


def test_empty_staging_sends_nothing_and_publishes_an_empty_source(s, emu):
    before = emu.counters()["create_posts"]
    assert plan(s, "empty")["staged_rows"] == 0
    sub, _ = run(s, "empty")
    assert sub.batches == [] and emu.counters()["create_posts"] == before
    assert current(s, "empty") == []


def test_missing_staging_relation_names_it_and_says_how_to_build_it(s):
    with pytest.raises(WarehouseError) as e:
        plan(s, "missing")
    msg = str(e.value)
    assert "stg_missing" in msg and "does not exist" in msg and "dbt build --select stg_missing" in msg


def test_prompt_too_large_for_a_batch_is_recorded_and_the_rest_sent(s):
    p = plan(s, "big")
    assert p["rows_to_send"] == 1 and p["skipped"]["too_large"]["rows"] == 1
    assert "larger than a batch" in p["skipped"]["too_large"]["why"]
    run(s, "big")
    assert [r["id"] for r in current(s, "big")] == ["small"]
    assert rejected(s, "big") == {"too_large": 1}


def test_unknown_model_is_refused_before_anything_is_sent(s, emu):
    before = emu.counters()["batches_created"]
    with pytest.raises(UnknownModel) as e:
        run(s, "badmodel")
    assert e.value.exit_code == 2 and "claude-sonet-4-5" in str(e.value) and "did you mean 'claude-sonnet-4-5'?" in str(e.value)
    assert emu.counters()["batches_created"] == before


def test_a_request_the_api_refuses_is_an_errored_row_with_the_api_reason(s, emu):
    emu.set_faults(errored_fraction=1.0, errored_types=("invalid_request_error",))
    try:
        run(s, "refused")
    finally:
        emu.clear_faults()
    rows = current(s, "refused")
    assert {(r["status"], r["error_type"]) for r in rows} == {("errored", "invalid_request_error")}
    assert all(r["error_message"] for r in rows)
    p = plan(s, "refused")
    assert p["rows_to_send"] == 0 and p["skipped"]["invalid_request"]["rows"] == 3


def test_model_output_that_is_not_json_is_parse_failed_with_the_text_kept(s):
    run(s, "text")
    rows = current(s, "text")
    assert len(rows) == 3
    assert {r["status"] for r in rows} == {"parse_failed"}
    assert all(r["output_text"] == "Sorry, here is prose, not JSON." and r["output_json"] is None for r in rows)
    assert plan(s, "text")["skipped"]["parse_failed"]["rows"] == 3  # not resent: retry_parse_failed is false


def _cut_in_the_middle(line: str) -> str:
    return line[: len(line) // 2]


def _content_not_a_list(line: str) -> str:
    obj = json.loads(line)
    obj["result"]["message"]["content"] = "not a list of blocks"
    return json.dumps(obj)


@pytest.mark.parametrize("job, damage, why, slice_bytes", [
    ("lines", _cut_in_the_middle, "not valid JSON", None),  # a line cut in the middle
    # valid JSON, wrong shape; each line a slice of its own: lines 1-2 commit before line 3 fails
    ("shape", _content_not_a_list, "not a result of the expected shape", 1),
])
def test_results_file_with_a_malformed_line_is_named_loaded_never_and_fetched_again(s, job, damage, why, slice_bytes):
    js = jobs(s, job)
    client = api.build_client(s)
    bridge.submit(s, js, client)
    bridge.wait(s, js, client, timeout=30)
    infos = collect_mod.refresh(client, s, [job])
    downloaded, _ = collect_mod.download_ended(client, s, infos)
    path = s.raw_results_dir / f"{downloaded[0]}.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = damage(lines[2])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError) as e:
        collect_mod.load_downloaded(s.with_(load_slice_bytes=slice_bytes) if slice_bytes else s, {job: js[0]})
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and why in msg and "downloads it again" in msg
    with state.connect(s) as con:
        assert con.execute("SELECT count(*) FROM bb_state.responses WHERE job = ?", [job]).fetchone()[0] == 0
        assert con.execute("SELECT local_state FROM bb_state.batches WHERE batch_id = ?",
                           [downloaded[0]]).fetchone()[0] == "submitted"
    assert not path.exists()
    report = bridge.collect(s, js, client)
    assert report.loaded == {job: 6}
    rows = current(s, job)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"succeeded"}


def test_unknown_content_blocks_and_usage_fields_are_ignored_and_dated_models_priced(s):
    sub, w = run(s, "blocks")
    assert w.collected == {"blocks": 3}
    rows = current(s, "blocks")
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "succeeded" and r["output_text"] == "Found it: forty-two."
        assert r["model"] == "claude-haiku-4-5-20251001" and r["stop_reason"] == "end_turn"
        assert (r["input_tokens"], r["output_tokens"]) == (100, 20)
        assert r["cost_usd"] is not None and r["cost_usd"] > 0  # the dated id priced as claude-haiku-4-5


def test_hostile_identifiers_are_quoted_not_executed(s):
    sub, w = run(s, "hostile")
    assert w.collected == {"hostile": 2}
    rows = current(s, "hostile")
    assert {r[HOSTILE_KEY] for r in rows} == {"a", "b"}
    assert {r["status"] for r in rows} == {"succeeded"}
    assert all(isinstance(r[HOSTILE_PROP], str) for r in rows)
    requests = [json.loads(x) for f in s.requests_dir.glob("*hostile*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(r["params"]["messages"][-1]["content"] for r in requests) == ["Say alpha twice", "Say beta twice"]
    con = duckdb.connect(str(s.warehouse), read_only=True)
    assert con.execute("SELECT answer FROM victim").fetchall() == [(42,)]
    con.close()


def _node(s, model: str) -> dict:
    manifest = json.loads((s.dbt_target_path / "manifest.json").read_text())
    return copy.deepcopy(next(n for n in manifest["nodes"].values() if n.get("name") == model))


def _meta(node: dict, **changes) -> dict:
    node["config"]["meta"]["batch_bridge"].update(changes)
    return node


def test_invalid_output_schema_names_the_field_and_the_allowed_types(s):
    node = _meta(_node(s, "stg_text"), output_schema={"type": "objekt", "properties": {}})
    with pytest.raises(JobDefinitionError) as e:
        parse_job(node)
    msg = str(e.value)
    assert "job 'text'" in msg and "output_schema.type = 'objekt'" in msg and "object, array, string" in msg


def test_hostile_job_name_is_refused(s):
    node = _meta(_node(s, "stg_keys"), job="keys; DROP TABLE victim")
    with pytest.raises(JobDefinitionError) as e:
        parse_job(node)
    assert "meta.batch_bridge.job = 'keys; DROP TABLE victim'" in str(e.value)
    assert "letters, digits and underscores" in str(e.value)


def test_typo_in_job_yaml_through_dbt_names_the_field_the_allowed_ones_and_a_guess(tmp_path):
    write_project(tmp_path, {"key": "id", "model": "claude-haiku-4-5", "max_tokens": 10, "prompt_column": "prompt",
                             "output_schmea": SCHEMA})
    with pytest.raises(JobDefinitionError) as e:
        bridge.load_jobs(settings_for(tmp_path))
    err = e.value
    assert err.exit_code == 2 and err.field == "output_schmea"
    msg = str(err)
    assert "meta.batch_bridge.output_schmea" in msg and "allowed: one of job, key, model" in msg
    assert "output_schema" in msg and "did you mean 'output_schema'?" in msg
