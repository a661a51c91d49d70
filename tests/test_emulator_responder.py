"""What the emulator answers: schema-valid structured output, forced tools, limits, usage and caching."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest

from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.emulator.runner import Emulator
from batch_bridge.emulator.schema_gen import generate

REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "recommend": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 40},
        "topics": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "labels": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "uniqueItems": True},
        "author": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 3}, "email": {"type": "string", "format": "email"}},
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "related": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/ref"}]},
        "price": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10, "multipleOf": 0.5},
    },
    "required": ["sentiment", "score", "confidence", "recommend", "summary", "topics", "labels", "author", "related"],
    "additionalProperties": False,
    "$defs": {"ref": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 100}}, "required": ["id"]}},
}
POSITIVE = "I love this blender, it is excellent and works great."
NEGATIVE = "Terrible product, it arrived broken and support was awful."


def params(text: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": text}]}
    body.update(extra)
    return body


def run_batch(client: anthropic.Anthropic, items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    batch = client.messages.batches.create(requests=[{"custom_id": cid, "params": p} for cid, p in items])
    deadline = time.monotonic() + 10
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}


def test_json_schema_output_validates_and_follows_sentiment(client: anthropic.Anthropic) -> None:
    fmt = {"format": {"type": "json_schema", "schema": REVIEW_SCHEMA}}
    texts = {"pos": POSITIVE, "neg": NEGATIVE, "plain": "The parcel came on a Tuesday."}
    results = run_batch(client, [(cid, params(t, output_config=fmt)) for cid, t in texts.items()])
    values = {}
    for cid, result in results.items():
        assert result.type == "succeeded"
        message = result.message
        assert message.stop_reason == "end_turn" and len(message.content) == 1
        values[cid] = json.loads(message.content[0].text)
        jsonschema.validate(values[cid], REVIEW_SCHEMA)
    assert values["pos"]["sentiment"] == "positive" and values["pos"]["score"] == 5
    assert values["neg"]["sentiment"] == "negative" and values["neg"]["score"] == 1
    assert values["plain"]["sentiment"] == "neutral"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 5, "maxLength": 8},
        {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3}, "minItems": 4, "maxItems": 4, "uniqueItems": True},
        {"type": "object", "properties": {"n": {"type": ["integer", "null"], "maximum": -10}}, "required": ["n"]},
        {"allOf": [{"properties": {"a": {"const": 1}}, "required": ["a"]}, {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
        {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"}}},
        {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"},
        REVIEW_SCHEMA,
    ],
)
def test_schema_generator_output_is_valid_for_many_prompts(schema: dict[str, Any]) -> None:
    for i in range(25):
        text = f"{POSITIVE if i % 3 == 0 else NEGATIVE if i % 3 == 1 else 'meh'} sample {i}"
        value = generate(schema, text)
        jsonschema.validate(value, schema)
        assert generate(schema, text) == value  # deterministic


def test_forced_tool_choice_returns_a_valid_tool_use(client: anthropic.Anthropic) -> None:
    tool = {
        "name": "record_review",
        "description": "Store the classification",
        "input_schema": REVIEW_SCHEMA,
    }
    other = {"name": "other_tool", "input_schema": {"type": "object", "properties": {}}}
    p = params(POSITIVE, tools=[other, tool], tool_choice={"type": "tool", "name": "record_review"})
    result = run_batch(client, [("t", p)])["t"]
    message = result.message
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "record_review" and block.id.startswith("toolu_01")
    jsonschema.validate(block.input, REVIEW_SCHEMA)
    assert block.input["sentiment"] == "positive"


def test_answers_are_deterministic_functions_of_params(client: anthropic.Anthropic) -> None:
    first = run_batch(client, [("a", params("Summarise the quarterly numbers please."))])["a"].message
    second = run_batch(client, [("a", params("Summarise the quarterly numbers please."))])["a"].message
    other = run_batch(client, [("a", params("Something else entirely."))])["a"].message
    assert first.content[0].text == second.content[0].text and first.id == second.id
    assert other.content[0].text != first.content[0].text and other.id != first.id
    assert "quarterly" in first.content[0].text


def test_max_tokens_truncates_and_stop_sequences_stop(client: anthropic.Anthropic) -> None:
    text = "Please describe the weather in the mountains during spring and autumn seasons."
    results = run_batch(
        client,
        [
            ("full", params(text)),
            ("short", params(text, max_tokens=5)),
            ("stop", params(text, stop_sequences=["begins"])),
            ("tool-short", params(text, max_tokens=3, tools=[{"name": "t", "input_schema": REVIEW_SCHEMA}],
                                  tool_choice={"type": "tool", "name": "t"})),
        ],
    )  # fmt: skip
    full = results["full"].message
    assert full.stop_reason == "end_turn" and full.usage.output_tokens == math.ceil(len(full.content[0].text) / 4)

    short = results["short"].message
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
    assert full.content[0].text.startswith(short.content[0].text) and len(short.content[0].text) <= 20

    stop = results["stop"].message
    assert stop.stop_reason == "stop_sequence" and stop.stop_sequence == "begins"
    assert "begins" not in stop.content[0].text and full.content[0].text.startswith(stop.content[0].text)

    tool_short = results["tool-short"].message
    assert tool_short.stop_reason == "max_tokens" and tool_short.usage.output_tokens == 3


def test_usage_follows_the_documented_token_rule(client: anthropic.Anthropic) -> None:
    text = "x" * 401  # ceil(401 / 4) = 101
    system = "y" * 40  # 10
    usage = run_batch(client, [("u", params(text, system=system))])["u"].message.usage
    assert usage.input_tokens == 3 + 10 + (101 + 4)
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
    assert usage.service_tier == "batch"


def _cached_system(text: str, ttl: str | None = None) -> list[dict[str, Any]]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    return [{"type": "text", "text": text, "cache_control": control}]


def test_cache_write_then_read_above_the_minimum(client: anthropic.Anthropic) -> None:
    shared = "Shared instructions. " * 300  # 6,300 chars = 1,575 tokens: >= 1024 (Sonnet), < 2048 (Haiku)
    first = run_batch(client, [("a", params("first question", system=_cached_system(shared)))])["a"].message.usage
    assert first.cache_creation_input_tokens == 3 + 1575
    assert first.cache_creation.ephemeral_5m_input_tokens == 1578 and first.cache_creation.ephemeral_1h_input_tokens == 0
    assert first.cache_read_input_tokens == 0
    assert first.input_tokens == math.ceil(len("first question") / 4) + 4

    second = run_batch(client, [("b", params("second question!", system=_cached_system(shared)))])["b"].message.usage
    assert second.cache_read_input_tokens == 1578 and second.cache_creation_input_tokens == 0
    assert second.input_tokens == math.ceil(len("second question!") / 4) + 4

    haiku = run_batch(client, [("h", params("q", model="claude-haiku-4-5", system=_cached_system(shared)))])["h"]
    assert haiku.message.usage.cache_creation_input_tokens == 0  # 1,578 < 2,048: not cacheable on Haiku

    hour = run_batch(client, [("h1", params("q", system=_cached_system("Other text. " * 400, ttl="1h")))])["h1"]
    assert hour.message.usage.cache_creation.ephemeral_1h_input_tokens > 1024


def test_short_prefixes_are_not_cached_unless_the_minimum_is_lowered(emu: Emulator, client: anthropic.Anthropic) -> None:
    small = params("hello", system=_cached_system("short system prompt"))
    assert run_batch(client, [("s", small)])["s"].message.usage.cache_creation_input_tokens == 0
    emu.configure(cache_min_tokens=0)
    usage = run_batch(client, [("s", small)])["s"].message.usage
    assert usage.cache_creation_input_tokens == 3 + 5  # request overhead + ceil(19 / 4)


def test_top_level_cache_control_caches_the_whole_prompt(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(cache_min_tokens=0)
    p = params("the whole prompt is cached", cache_control={"type": "ephemeral"})
    first, second = (run_batch(client, [(c, p)])[c].message.usage for c in ("one", "two"))
    total = 3 + math.ceil(len("the whole prompt is cached") / 4) + 4
    assert first.cache_creation_input_tokens == total and first.input_tokens == 0
    assert second.cache_read_input_tokens == total and second.input_tokens == 0


def test_plugin_responder_by_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_responder.py").write_text(
        "from batch_bridge.emulator import ResponderError\n"
        "def respond(params, custom_id):\n"
        "    if custom_id.startswith('fail'):\n"
        "        raise ResponderError('overloaded_error', 'plug-in says no')\n"
        "    if custom_id.startswith('envelope'):\n"
        "        return {'type': 'error', 'error': {'type': 'api_error', 'message': 'envelope'}}\n"
        "    return {'content': [{'type': 'text', 'text': 'custom:' + custom_id}]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with run_emulator(EmulatorConfig(responder="my_responder:respond")) as emu:
        with anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
            results = run_batch(client, [("ok-1", params("hi")), ("fail-1", params("hi")), ("envelope-1", params("hi"))])
    ok = results["ok-1"].message
    assert ok.content[0].text == "custom:ok-1" and ok.usage.output_tokens == 3 and ok.id.startswith("msg_01")
    assert results["fail-1"].error.error.type == "overloaded_error"
    assert results["fail-1"].error.error.message == "plug-in says no"
    assert results["envelope-1"].error.error.type == "api_error"
    sys.modules.pop("my_responder", None)
