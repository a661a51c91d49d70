"""What the emulator answers: schema-valid structured output, forced tools, limits, token counts, usage and caching."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import jsonschema
import pytest
from tokenizers import Tokenizer

from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.emulator.config import ConfigError
from batch_bridge.emulator.runner import Emulator
from batch_bridge.emulator.schema_gen import generate
from batch_bridge.emulator.tokens import BpeCounter, tokenizer_path

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


# The emulator's documented count (docs/emulator.md, "Token counts"), computed here from the tokenizer file
# itself: BPE tokens of each text, the turn marker of each message, and the primer of the answer.
TOKENIZER = Tokenizer.from_file(str(tokenizer_path()))


def bpe(text: str) -> int:
    return len(TOKENIZER.encode(text, add_special_tokens=False).ids)


HUMAN, PRIMER = bpe("\n\nHuman: "), bpe("\n\nAssistant:")


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
    assert full.stop_reason == "end_turn" and full.usage.output_tokens == bpe(full.content[0].text)

    short = results["short"].message
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
    assert full.content[0].text.startswith(short.content[0].text) and bpe(short.content[0].text) == 5

    stop = results["stop"].message
    assert stop.stop_reason == "stop_sequence" and stop.stop_sequence == "begins"
    assert "begins" not in stop.content[0].text and full.content[0].text.startswith(stop.content[0].text)

    tool_short = results["tool-short"].message
    assert tool_short.stop_reason == "max_tokens" and tool_short.usage.output_tokens == 3


def test_usage_counts_with_the_claude_tokenizer_not_characters(client: anthropic.Anthropic) -> None:
    texts = {
        "cjk": "東京の天気は晴れです。明日は雨が降るかもしれません。傘を持って行ってください。",
        "code": "def f(xs):\n    return {k: [v ** 2 for v in vs] for k, vs in xs.items() if vs}\n",
        "digits": "31415926535897932384626433832795028841971693993751058209749445923078164062862089986",
        # Plain ASCII is split into words by the emulator itself; the count must be the tokenizer's.
        "ascii": "It's  a\ttest\r\n  of   <EOT> spaces!!! e.g. U.S.A. don't 'QUOTED' x=3.14159;\n\n I'M  ok " * 20,
        # Long texts are counted in pieces (cut before a space); the sum must equal the whole's count.
        "long": " ".join(f"naïve café {i} x{i * 7919}  spaced\tout, it's 東京{i} ﬁne ｆｕｌｌ😀" for i in range(120)),
    }
    system = "You answer in one word."
    results = run_batch(client, [(k, params(t, system=system)) for k, t in texts.items()])
    for k, text in texts.items():
        usage = results[k].message.usage
        assert usage.input_tokens == bpe(system) + HUMAN + bpe(text) + PRIMER
        assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
        assert usage.service_tier == "batch"
    # Characters / 4 is far off for these texts, in both directions: the counts are the tokenizer's.
    assert bpe(texts["cjk"]) > 1.5 * len(texts["cjk"]) / 4 and bpe(texts["digits"]) > 1.3 * len(texts["digits"]) / 4


def test_plain_text_counted_piece_by_piece_between_spaces_matches_the_tokenizer() -> None:
    # Plain ASCII whose spaces are single (the emulator counts it piece by piece between the spaces,
    # each piece cached) or not (split into words as a whole), checked against the library's own count.
    counter = BpeCounter(tokenizer_path())
    edges = [
        "", " ", "a", " a", "a ", " leading and trailing ", "it's John's 'quoted' don't we'll I'M",
        "x=3.14159; y = -2e10, z: 0x1F!!! (parens) [brackets] {braces} <angle> a-b_c/d\\e",
        "line one\nline two\n\nline three", "tab\tinside words\tonly", "U.S.A. e.g. i.e. ... ?! ,,, ''",
        "numbers 123 4567 89012345 and 1,000,000.50 $5 10% #7 @me", "'s 't 're 've 'm 'll 'd", "a  b", "a \nb",
        "a\n b", "a\t b", "a \tb", "a\r\n b", "end with newline\n", "\nstart with newline",
    ]
    rng = random.Random(5)
    alphabet = [*"abcXYZ0189'\".,;:!?()-_=+/", *" " * 8, "\n", "\t", "'s", "'ll", "don't", "U.S.", "3.14", "\n\n"]
    texts = edges + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(3000)]
    texts += [" ".join(texts[k:k + 20]) for k in range(0, len(texts), 20)]  # longer texts of the same pieces
    for text in texts:
        assert counter.text(text) == bpe(text), repr(text)


def test_count_tokens_answers_what_a_batch_request_is_billed(client: anthropic.Anthropic) -> None:
    tool = {"name": "record_review", "input_schema": REVIEW_SCHEMA}
    cases = {
        "plain": params("日本語のレビュー：とても良い製品です。", system="Label reviews."),
        "tool": params(POSITIVE, tools=[tool], tool_choice={"type": "tool", "name": "record_review"}),
        "schema": params(NEGATIVE, output_config={"format": {"type": "json_schema", "schema": REVIEW_SCHEMA}}),
    }
    billed = run_batch(client, list(cases.items()))
    for k, p in cases.items():
        body = {key: v for key, v in p.items() if key != "max_tokens"}
        counted = client.messages.count_tokens(**body).input_tokens
        assert counted == billed[k].message.usage.input_tokens
    # The API's documented tool-use system prompt (313 tokens with a forced tool) is part of the count.
    assert billed["tool"].message.usage.input_tokens > 313 + bpe(POSITIVE)


def test_count_tokens_validates_like_the_api(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: Extra inputs are not permitted"):
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                                     extra_body={"max_tokens": 10})
    with pytest.raises(anthropic.NotFoundError, match="model: claude-nonexistent"):
        client.messages.count_tokens(model="claude-nonexistent", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="messages: at least one message"):
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=[])
    with pytest.raises(anthropic.BadRequestError, match="messages.0.role"):
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "robot", "content": "hi"}])


def test_free_text_and_list_answers_vary_in_length_reproducibly(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"summary": {"type": "string"}, "topics": {"type": "array", "items": {"type": "string"}}},
              "required": ["summary", "topics"]}
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    prompts = [f"Review {i}: the battery lasts long, the sound is clear, shipping took {i} days." for i in range(60)]
    items = [(f"s{i}", params(p, output_config=fmt)) for i, p in enumerate(prompts)]
    items += [(f"f{i}", params(p)) for i, p in enumerate(prompts)]
    first = run_batch(client, items)
    answers = [json.loads(first[f"s{i}"].message.content[0].text) for i in range(60)]
    summary_words = [len(a["summary"].split()) for a in answers]
    topics = [len(a["topics"]) for a in answers]
    free_tokens = [first[f"f{i}"].message.usage.output_tokens for i in range(60)]
    assert min(summary_words) <= 8 and max(summary_words) >= 30
    assert min(topics) <= 1 and max(topics) >= 4 and len(set(topics)) >= 4
    assert max(free_tokens) >= 3 * min(free_tokens)
    again = run_batch(client, items[:10])  # seeded: the same request gets the same answer
    assert all(again[c].message.content == first[c].message.content for c, _ in items[:10])


def _cached_system(text: str, ttl: str | None = None) -> list[dict[str, Any]]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    return [{"type": "text", "text": text, "cache_control": control}]


def test_cache_write_then_read_above_the_minimum(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(cache_hit_rate=1.0)
    shared = "Shared instructions. " * 300  # 900 tokens: below 1,024 (Sonnet)
    longer = "Shared instructions for every review, read carefully. " * 200  # 1,800 tokens
    assert bpe(shared) < 1024 < bpe(longer) < 2048
    small = run_batch(client, [("s", params("first question", system=_cached_system(shared)))])["s"].message.usage
    assert small.cache_creation_input_tokens == 0
    first = run_batch(client, [("a", params("first question", system=_cached_system(longer)))])["a"].message.usage
    assert first.cache_creation_input_tokens == bpe(longer)
    assert first.cache_creation.ephemeral_5m_input_tokens == bpe(longer) and first.cache_creation.ephemeral_1h_input_tokens == 0
    assert first.cache_read_input_tokens == 0
    assert first.input_tokens == HUMAN + bpe("first question") + PRIMER

    second = run_batch(client, [("b", params("second question!", system=_cached_system(longer)))])["b"].message.usage
    assert second.cache_read_input_tokens == bpe(longer) and second.cache_creation_input_tokens == 0
    assert second.input_tokens == HUMAN + bpe("second question!") + PRIMER

    haiku = run_batch(client, [("h", params("q", model="claude-haiku-4-5", system=_cached_system(longer)))])["h"]
    assert haiku.message.usage.cache_creation_input_tokens == 0  # < 2,048: not cacheable on Haiku

    hour = run_batch(client, [("h1", params("q", system=_cached_system("Other text. " * 400, ttl="1h")))])["h1"]
    assert hour.message.usage.cache_creation.ephemeral_1h_input_tokens > 1024


def test_cache_hits_are_best_effort_at_the_configured_rate(emu: Emulator, client: anthropic.Anthropic) -> None:
    system = _cached_system("Shared instructions for every review, read carefully. " * 200)
    items = [(f"r{i}", params(f"question number {i}", system=system)) for i in range(300)]
    usages = [r.message.usage for r in run_batch(client, items).values()]
    reads = sum(1 for u in usages if u.cache_read_input_tokens)
    writes = sum(1 for u in usages if u.cache_creation_input_tokens)
    assert reads + writes == 300
    assert 0.6 <= reads / 299 <= 0.8  # the default rate, 0.7, drawn per request; the first one writes
    emu.clear_cache()
    emu.configure(cache_hit_rate=1.0)
    usages = [r.message.usage for r in run_batch(client, items).values()]
    assert sum(1 for u in usages if u.cache_creation_input_tokens) == 1
    with pytest.raises(ConfigError, match="cache_hit_rate: 1.5 is not a share between 0 and 1"):
        emu.configure(cache_hit_rate=1.5)


def test_short_prefixes_are_not_cached_unless_the_minimum_is_lowered(emu: Emulator, client: anthropic.Anthropic) -> None:
    small = params("hello", system=_cached_system("short system prompt"))
    assert run_batch(client, [("s", small)])["s"].message.usage.cache_creation_input_tokens == 0
    emu.configure(cache_min_tokens=0)
    usage = run_batch(client, [("s", small)])["s"].message.usage
    assert usage.cache_creation_input_tokens == bpe("short system prompt")


def test_top_level_cache_control_caches_the_whole_prompt(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(cache_min_tokens=0, cache_hit_rate=1.0)
    p = params("the whole prompt is cached", cache_control={"type": "ephemeral"})
    first, second = (run_batch(client, [(c, p)])[c].message.usage for c in ("one", "two"))
    prefix = HUMAN + bpe("the whole prompt is cached")
    assert first.cache_creation_input_tokens == prefix and first.input_tokens == PRIMER
    assert second.cache_read_input_tokens == prefix and second.input_tokens == PRIMER


def test_without_the_tokenizer_file_the_emulator_counts_by_its_rule_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "BATCH_BRIDGE_TOKENIZER": str(tmp_path / "absent.json")}
    proc = subprocess.Popen([sys.executable, "-m", "batch_bridge.emulator", "--port", "0", "--worker-processes", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        with anthropic.Anthropic(api_key="k", base_url=url) as c:
            config = c.get("/_emulator/config", cast_to=httpx2.Response).json()
            assert config["tokenizer"]["fallback"] is True and "characters/4" in config["tokenizer"]["counter"]
            text = "東京の天気は晴れです。"
            counted = c.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": text}])
            assert counted.input_tokens == 3 + 4 + math.ceil(len(text) / 4)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "no tokenizer at" in err and "absent.json" in err


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
    assert ok.content[0].text == "custom:ok-1" and ok.usage.output_tokens == bpe("custom:ok-1") and ok.id.startswith("msg_01")
    assert results["fail-1"].error.error.type == "overloaded_error"
    assert results["fail-1"].error.error.message == "plug-in says no"
    assert results["envelope-1"].error.error.type == "api_error"
    sys.modules.pop("my_responder", None)
