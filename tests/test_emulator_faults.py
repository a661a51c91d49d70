"""Fault injection, observed the way a client sees it: through the SDK and its automatic retries."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx2
import pytest

from batch_bridge.emulator import EmulatorConfig, Faults, run_emulator
from batch_bridge.emulator.runner import Emulator
from helpers import wait_ended


def request(cid: str, text: str = "some text to answer") -> dict[str, Any]:
    return {
        "custom_id": cid,
        "params": {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": text}]},
    }


def test_sdk_retries_through_two_529s_and_creates_one_batch(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.set_faults(http_errors=[529, 529], http_error_endpoints=("create",))
    batch = client.messages.batches.create(requests=[request("a")])
    counters = emu.counters()
    assert counters["create_posts"] == 3
    assert counters["batches_created"] == 1
    assert counters["faults_fired"] == {"http_529": 2}
    assert client.messages.batches.retrieve(batch.id).id == batch.id


def test_three_failures_exhaust_the_sdk_retries(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.set_faults(http_errors=[500, 529, 529], http_error_endpoints=("create",))
    with pytest.raises(anthropic.OverloadedError) as caught:
        client.messages.batches.create(requests=[request("a")])
    assert caught.value.body["error"]["message"] == "Overloaded"  # type: ignore[index]
    assert emu.counters()["create_posts"] == 3 and emu.counters()["batches_created"] == 0


def test_injected_errors_carry_retry_headers(emu: Emulator) -> None:
    emu.set_faults(http_errors=[429, 429], retry_after=0.05, should_retry=False)
    with httpx2.Client(base_url=emu.base_url, headers={"x-api-key": "k"}) as http:
        limited = http.get("/v1/messages/batches")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "0.05" and limited.headers["x-should-retry"] == "false"
        assert limited.json()["error"]["type"] == "rate_limit_error"
    # x-should-retry: false wins over the status: the SDK gives up after one attempt.
    with anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
        with pytest.raises(anthropic.RateLimitError):
            client.messages.batches.list()
    assert emu.counters()["requests_by_endpoint"]["list"] == 2


def test_fractional_http_errors_are_reproducible() -> None:
    def run(seed: int) -> list[int]:
        faults = Faults(seed=seed, http_error_fraction=0.5, http_error_status=500)
        with run_emulator(EmulatorConfig(faults=faults)) as emu:
            with httpx2.Client(base_url=emu.base_url, headers={"x-api-key": "k"}) as http:
                return [http.get("/v1/messages/batches").status_code for _ in range(20)]

    first, again = run(1), run(1)
    assert first == again
    assert set(first) == {200, 500}
    assert run(2) != first


def test_slow_create_makes_the_sdk_submit_twice(emu: Emulator) -> None:
    """The double-submit hazard: the batch exists, the answer comes after the client's timeout."""
    emu.set_faults(slow_create_seconds=1.0, slow_create_times=1)
    with anthropic.Anthropic(api_key="k", base_url=emu.base_url, timeout=0.4, max_retries=1) as client:
        batch = client.messages.batches.create(requests=[request("a"), request("b")])
        listed = [b.id for b in client.messages.batches.list()]
    counters = emu.counters()
    assert counters["create_posts"] == 2
    assert counters["batches_created"] == 2, "the retried POST created a duplicate batch"
    assert len(listed) == 2 and batch.id == listed[0]


def test_slow_create_without_retries_raises_but_the_batch_exists(emu: Emulator) -> None:
    emu.set_faults(slow_create_seconds=1.0)
    with anthropic.Anthropic(api_key="k", base_url=emu.base_url, timeout=0.3, max_retries=0) as client:
        with pytest.raises(anthropic.APITimeoutError):
            client.messages.batches.create(requests=[request("a")])
        orphans = client.messages.batches.list().data
    assert len(orphans) == 1 and orphans[0].request_counts.processing + orphans[0].request_counts.succeeded == 1


def test_a_create_the_client_gave_up_on_is_in_flight_until_the_emulator_answers(emu: Emulator) -> None:
    """`creates_in_flight` is what a test waits on after killing a client mid-create."""
    emu.set_faults(slow_create_seconds=1.0)
    with anthropic.Anthropic(api_key="k", base_url=emu.base_url, timeout=0.3, max_retries=0) as client:
        with pytest.raises(anthropic.APITimeoutError):
            client.messages.batches.create(requests=[request("a")])
    assert emu.counters()["creates_in_flight"] == 1 and emu.counters()["batches_created"] == 1
    deadline = time.monotonic() + 5
    while emu.counters()["creates_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert emu.counters()["creates_in_flight"] == 0


def test_connection_reset_is_retried_by_the_sdk(emu: Emulator, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    emu.set_faults(connection_resets=1, connection_reset_endpoints=("retrieve",))
    assert client.messages.batches.retrieve(batch.id).id == batch.id
    assert emu.counters()["faults_fired"]["connection_reset"] == 1
    assert emu.counters()["requests_by_endpoint"]["retrieve"] == 2

    emu.set_faults(connection_resets=1)
    with pytest.raises(anthropic.APIConnectionError):
        client.with_options(max_retries=0).messages.batches.retrieve(batch.id)


def test_results_stream_cut_short_once(emu: Emulator, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request(f"r{i}", "long text " * 30) for i in range(50)])
    wait_ended(client, batch.id)
    emu.set_faults(results_cut_after_bytes=2_000, results_cut_times=1)

    seen = []
    with pytest.raises((httpx2.HTTPError, anthropic.APIConnectionError)):
        for line in client.messages.batches.results(batch.id):
            seen.append(line.custom_id)
    assert 0 < len(seen) < 50
    assert emu.counters()["faults_fired"]["results_cut"] == 1

    full = [r.custom_id for r in client.messages.batches.results(batch.id)]  # the cut happened once
    assert len(full) == 50 and seen == full[: len(seen)]


def test_transient_404_right_after_create(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.set_faults(not_found_first_calls=2)
    batch = client.messages.batches.create(requests=[request("a")])
    for _ in range(2):
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
    assert client.messages.batches.retrieve(batch.id).id == batch.id
    assert emu.counters()["faults_fired"]["not_found"] == 2

    emu.set_faults(not_found_first_calls=0, not_found_first_seconds=0.3)
    young = client.messages.batches.create(requests=[request("b")])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(young.id)
    time.sleep(0.35)
    assert client.messages.batches.retrieve(young.id).id == young.id


def test_errored_and_expired_fractions_are_deterministic_per_custom_id(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.set_faults(seed=7, errored_fraction=0.3, errored_types=("overloaded_error", "api_error"), expired_fraction=0.1)
    ids = [f"row-{i}" for i in range(200)]

    def outcomes() -> dict[str, str]:
        batch = client.messages.batches.create(requests=[request(cid) for cid in ids])
        ended = wait_ended(client, batch.id)
        out = {}
        for r in client.messages.batches.results(batch.id):
            out[r.custom_id] = r.result.error.error.type if r.result.type == "errored" else r.result.type  # type: ignore[union-attr]
        counts = ended.request_counts
        assert counts.errored == sum(v.endswith("_error") for v in out.values())
        assert counts.expired == sum(v == "expired" for v in out.values())
        return out

    first, second = outcomes(), outcomes()
    assert first == second
    kinds = set(first.values())
    assert kinds == {"succeeded", "overloaded_error", "api_error", "expired"}
    errored = sum(v.endswith("_error") for v in first.values())
    assert 30 <= errored <= 90  # ~30 % of 200 (of the ~90 % not expired)

    emu.set_faults(seed=8)
    assert outcomes() != first
