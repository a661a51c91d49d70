"""The emulator's Models API and synchronous Messages API, through the real SDK over HTTP."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from batch_bridge.emulator.runner import Emulator
from helpers import wait_ended


def body(text: str = "hello there", **params: Any) -> dict[str, Any]:
    b = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": text}]}
    b.update(params)
    return b


def test_models_list_and_retrieve_give_model_info(emu: Emulator, client: anthropic.Anthropic) -> None:
    listed = list(client.models.list(limit=5))  # the SDK pages through every page
    ids = [m.id for m in listed]
    assert len(ids) == len(set(ids)) > 5 and "claude-haiku-4-5" in ids and "claude-3-opus" in ids
    assert "claude-3-5-sonnet" not in ids  # retired models only when asked for
    retired = [m.id for m in client.models.list(lifecycle=["retired"])]
    assert sorted(retired) == ["claude-3-5-sonnet", "claude-3-sonnet"]

    haiku = client.models.retrieve("claude-haiku-4-5-20251001")  # a dated id resolves to its family
    assert (haiku.id, haiku.lifecycle, haiku.max_tokens, haiku.max_input_tokens) == ("claude-haiku-4-5", "active", 64000, 200000)
    assert haiku.capabilities is not None and haiku.capabilities.batch.supported and haiku.capabilities.structured_outputs.supported
    opus3 = client.models.retrieve("claude-3-opus")
    assert opus3.lifecycle == "deprecated" and opus3.retires_at is not None and opus3.deprecated_at is not None
    assert opus3.capabilities is not None and not opus3.capabilities.structured_outputs.supported
    preview = client.models.retrieve("claude-mythos-preview")
    assert preview.capabilities is not None and not preview.capabilities.batch.supported
    with pytest.raises(anthropic.NotFoundError) as e:
        client.models.retrieve("claude-sonet-4-5")
    assert e.value.body["error"] == {"type": "not_found_error", "message": "model: claude-sonet-4-5"}  # type: ignore[index]


def test_a_synchronous_message_is_the_answer_the_same_request_gets_in_a_batch(emu: Emulator, client: anthropic.Anthropic) -> None:
    params = body("a review about a kettle that boils fast", system="Summarise.")
    sync = client.messages.create(**params)
    batch = client.messages.batches.create(requests=[{"custom_id": "one", "params": params}])
    wait_ended(client, batch.id)
    [result] = list(client.messages.batches.results(batch.id))
    assert result.result.type == "succeeded"
    in_batch = result.result.message  # type: ignore[union-attr]
    assert [b.model_dump() for b in sync.content] == [b.model_dump() for b in in_batch.content]
    assert (sync.usage.input_tokens, sync.usage.output_tokens) == (in_batch.usage.input_tokens, in_batch.usage.output_tokens)
    assert (sync.usage.service_tier, in_batch.usage.service_tier) == ("standard", "batch")
    assert emu.counters()["messages_answered"] == 1


def test_synchronous_problems_are_http_errors_at_once(emu: Emulator, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(**body(model="claude-sonet-4-5"))
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(**body(model="claude-3-sonnet"))  # retired
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**body(model="claude-3-haiku", max_tokens=8000))
    assert "max_tokens: 8000 > 4096" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**body("word " * 250_000))  # 250,000 tokens (one per " word"): above 200,000
    assert "prompt is too long: " in e.value.message and "> 200000 maximum" in e.value.message
    assert emu.counters()["messages_refused"] == 4


def test_synchronous_messages_get_the_injected_faults_and_the_sdk_retries(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.set_faults(http_errors=[529, 429], http_error_endpoints=("messages",))
    message = client.messages.create(**body())
    assert message.content and emu.counters()["faults_fired"] == {"http_529": 1, "http_429": 1}
    assert emu.counters()["requests_by_endpoint"]["messages"] == 3
    emu.clear_faults()
    emu.set_faults(http_errors=[500])  # no endpoints named: the batch routes only, not /v1/messages
    client.messages.create(**body())
    assert emu.counters()["faults_fired"] == {"http_529": 1, "http_429": 1}


def test_in_a_batch_a_retired_model_and_a_prompt_too_long_error_only_their_own_request(
    emu: Emulator, client: anthropic.Anthropic,
) -> None:
    batch = client.messages.batches.create(requests=[
        {"custom_id": "ok", "params": body()},
        {"custom_id": "retired", "params": body(model="claude-3-sonnet-20240229")},
        {"custom_id": "long", "params": body("word " * 250_000)},
        {"custom_id": "nobatch", "params": body(model="claude-mythos-preview")},
    ])
    wait_ended(client, batch.id)
    by_id = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert by_id["ok"].type == "succeeded"
    assert by_id["retired"].error.error.type == "not_found_error"  # type: ignore[union-attr]
    assert by_id["long"].error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    assert "prompt is too long" in by_id["long"].error.error.message  # type: ignore[union-attr]
    assert "does not support the Message Batches API" in by_id["nobatch"].error.error.message  # type: ignore[union-attr]
