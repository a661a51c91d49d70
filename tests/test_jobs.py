"""Job definitions: every bad field gives an error naming the job, the field, the value and what is allowed."""

from __future__ import annotations

import json

import pytest

from batch_bridge.errors import ConfigError, JobDefinitionError
from batch_bridge.jobs import PROMPT_SENTINEL, jobs_from_manifest, parse_job
from batch_bridge.pricing import load_prices

BASE = {"key": "id", "model": "claude-haiku-4-5", "max_tokens": 100, "prompt_column": "prompt"}


def node(meta, name="stg_x"):
    return {"name": name, "unique_id": f"model.p.{name}", "resource_type": "model", "database": "warehouse",
            "schema": "main", "alias": name, "config": {"meta": {"batch_bridge": meta}}}


def error(**over):
    meta = {**BASE, **over}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(JobDefinitionError) as e:
        parse_job(node(meta))
    return str(e.value)


@pytest.mark.parametrize(
    "over, field, allowed",
    [
        ({"key": None}, "key", "a column name or a list"),
        ({"key": []}, "key", "a column name or a list"),
        ({"key": ["a", "a"]}, "key", "distinct"),
        ({"key": ["id", "ID"]}, "key", "distinct column names (case aside)"),
        ({"key": "status"}, "key", "other than the bridge's result columns"),
        ({"key": ["region", "Model"]}, "key", "other than the bridge's result columns"),
        ({"output_schema": {"type": "object", "properties": {"ID": {"type": "string"}}}},
         "output_schema.properties.ID", "not a key column"),
        ({"model": ""}, "model", "Claude model id"),
        ({"max_tokens": 0}, "max_tokens", "1 to 128000"),
        ({"max_tokens": "many"}, "max_tokens", "1 to 128000"),
        ({"prompt_column": None}, "prompt_column", "exactly one of prompt_column or prompt_template"),
        ({"prompt_template": "no placeholders"}, "prompt_column", "exactly one"),
        ({"prompt_column": None, "prompt_template": "no placeholders"}, "prompt_template", "{column} placeholder"),
        ({"temperature": 3}, "temperature", "0.0 to 1.0"),
        ({"top_k": 0}, "top_k", ">= 1"),
        ({"stop_sequences": "END"}, "stop_sequences", "list of non-empty strings"),
        ({"max_attempts": 0}, "max_attempts", "1 to 100"),
        ({"budget_usd": -1}, "budget_usd", ">= 0"),
        ({"cache_ttl": "2h"}, "cache_ttl", "'5m', '1h' or 'none'"),
        ({"retry_parse_failed": "yes"}, "retry_parse_failed", "true or false"),
        ({"max_requests_per_batch": 200000}, "max_requests_per_batch", "1 to 100000"),
        ({"max_bytes_per_batch": 300_000_000}, "max_bytes_per_batch", "1024 to 256000000"),
        ({"job": "bad name!"}, "job", "letters, digits and underscores"),
        ({"output_schema": {"type": "objekt"}}, "output_schema.type", "object, array, string"),
        ({"output_schema": {"type": "array", "items": {"type": "string"}}}, "output_schema.type", "'object' at the top"),
        ({"output_schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}},
         "output_schema.required", "declared properties"),
        ({"output_schema": {"type": "object", "properties": {"status": {"type": "string"}}}},
         "output_schema.properties.status", "not a key column"),
        ({"output_tool": {"name": "t"}}, "output_tool", "name, description and input_schema"),
        ({"output_schema": {"type": "object"}, "output_tool": {"name": "t", "input_schema": {"type": "object"}}},
         "output_tool", "not together with output_schema"),
        ({"few_shot": [{"user": "q"}]}, "few_shot", "{user: text, assistant: text}"),
    ],
)
def test_bad_fields_name_field_value_and_allowed(over, field, allowed):
    msg = error(**over)
    assert f"job 'stg_x': meta.batch_bridge.{field} = " in msg  # the job, the field and its value
    assert allowed in msg


def test_a_reserved_output_name_is_refused_with_the_rename_to_make():
    msg = error(output_schema={"type": "object", "properties": {"Status": {"type": "string"}}, "required": ["Status"]})
    assert "meta.batch_bridge.output_schema.properties.Status = 'Status'" in msg
    assert "hint: rename the property in the schema (and in `required`), e.g. to 'Status_value'" in msg


def test_unknown_field_suggests_the_right_one_and_lists_all():
    msg = error(promt_column="prompt")
    assert "meta.batch_bridge.promt_column = 'prompt'" in msg
    assert "did you mean 'prompt_column'?" in msg
    assert "output_schema" in msg and "max_attempts" in msg  # the allowed fields are listed


def test_defaults_and_params_template():
    job = parse_job(node({**BASE, "system": "Be brief.", "temperature": 0, "stop_sequences": ["END"]}))
    assert job.name == "stg_x" and job.max_attempts == 3 and job.cache_ttl == "1h"
    params = job.params_template()
    assert params["system"] == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    assert params["messages"] == [{"role": "user", "content": PROMPT_SENTINEL}]
    assert params["temperature"] == 0 and params["stop_sequences"] == ["END"]
    prefix, suffix = job.params_split()
    assert json.loads(prefix + json.dumps("hello") + suffix)["messages"][0]["content"] == "hello"


def test_few_shot_turns_carry_the_cache_breakpoint():
    job = parse_job(node({**BASE, "system": "S", "few_shot": [{"user": "u1", "assistant": "a1"}]}))
    msgs = job.params_template()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "cache_control" not in job.params_template()["system"][0]


def test_static_hash_changes_with_anything_that_shapes_the_answer():
    base = parse_job(node(BASE)).static_hash
    for over in ({"model": "claude-sonnet-4-5"}, {"max_tokens": 101}, {"system": "x"}, {"temperature": 0.5},
                 {"output_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}):
        assert parse_job(node({**BASE, **over})).static_hash != base
    assert parse_job(node({**BASE, "max_attempts": 5, "budget_usd": 1})).static_hash == base  # not sent


def test_disabled_and_duplicate_jobs():
    assert parse_job(node({**BASE, "enabled": False})) is None
    manifest = {"nodes": {"a": node({**BASE, "job": "j"}, "a"), "b": node({**BASE, "job": "j"}, "b")}}
    with pytest.raises(JobDefinitionError, match="declared on both"):
        jobs_from_manifest(manifest)


def test_price_file_override_is_merged(tmp_path):
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"models": {"my-finetune": {"input": 2.0, "output": 4.0}},
                                    "aliases": {"claude-haiku-4-5-20251001": "claude-haiku-4-5"}}))
    book = load_prices(override)
    assert book.lookup("my-finetune").input == 2.0
    assert book.lookup("claude-haiku-4-5").output == 5.0  # packaged prices still there
    # 1M input + 1M output at batch prices: half of 2 + 4
    assert book.cost("my-finetune", input_tokens=1e6, output_tokens=1e6) == pytest.approx(3.0)
    assert book.cost("nobody-knows", input_tokens=1, output_tokens=1) is None


def test_a_key_named_like_a_result_column_is_refused_with_the_rename_to_make():
    # DuckDB would otherwise rename the bridge's own `status` to `status_1` in the results source.
    with pytest.raises(JobDefinitionError) as e:
        parse_job(node({**BASE, "key": ["region", "Status"]}))
    assert e.value.field == "key" and e.value.value == ["region", "Status"]
    assert "select Status as Status_key" in str(e.value) and "'Status_key'" in str(e.value)


def test_an_ephemeral_model_cannot_carry_a_job():
    n = node(BASE, name="stg_eph")
    n["config"]["materialized"] = "ephemeral"
    with pytest.raises(ConfigError) as e:
        parse_job(n)
    assert "'stg_eph' is materialized as 'ephemeral'" in e.value.message
    assert "materialized: table" in e.value.hint
    n["config"]["materialized"] = "view"
    assert parse_job(n).node == "model.p.stg_eph"
