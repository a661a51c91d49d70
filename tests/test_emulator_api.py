"""The emulator's six operations, shapes, auth, validation and lifecycle, through the real SDK over HTTP."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx2
import pytest

from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.emulator.runner import Emulator
from helpers import wait_ended

BATCH_ID = re.compile(r"^msgbatch_01[1-9A-HJ-NP-Za-km-z]{22}$")
RFC3339_MICRO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def request(cid: str, text: str = "hello there", **params: Any) -> dict[str, Any]:
    body = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": text}]}
    body.update(params)
    return {"custom_id": cid, "params": body}


@pytest.fixture
def http(emu: Emulator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=emu.base_url, headers={"x-api-key": "sk-test"}) as c:
        yield c


def test_create_poll_results_round_trip(emu: Emulator, client: anthropic.Anthropic, http: httpx2.Client) -> None:
    ids = [f"req-{i:03d}" for i in range(40)]
    created = client.messages.batches.create(requests=[request(cid, f"text number {cid}") for cid in ids])

    assert BATCH_ID.match(created.id)
    assert created.processing_status == "in_progress"
    assert created.results_url is None
    assert created.request_counts.processing == 40
    assert created.expires_at - created.created_at == timedelta(hours=24)

    ended = wait_ended(client, created.id)
    assert ended.request_counts.succeeded == 40 and ended.request_counts.processing == 0
    assert ended.ended_at is not None and ended.ended_at >= ended.created_at
    assert ended.results_url == f"{emu.base_url}/v1/messages/batches/{created.id}/results"

    raw = http.get(f"/v1/messages/batches/{created.id}").json()
    for key in ("created_at", "expires_at", "ended_at"):
        assert RFC3339_MICRO_Z.match(raw[key]), raw[key]
    assert raw["archived_at"] is None and raw["cancel_initiated_at"] is None and raw["type"] == "message_batch"

    results = list(client.messages.batches.results(created.id))
    got = [r.custom_id for r in results]
    assert sorted(got) == ids
    assert got != ids, "results must not come back in request order"
    assert all(r.result.type == "succeeded" for r in results)
    message = results[0].result.message  # type: ignore[union-attr]
    assert message.id.startswith("msg_01") and message.usage.service_tier == "batch"

    stream = http.get(f"/v1/messages/batches/{created.id}/results")
    assert stream.headers["content-type"] == "application/x-jsonl"
    assert stream.headers["request-id"].startswith("req_")
    body = stream.content
    assert body.endswith(b"\n") and b"\n\n" not in body and b"\r" not in body
    assert len(body.splitlines()) == 40


def test_outcome_counts_stay_zero_and_results_url_null_until_ended(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(latency=3600)
    batch = client.messages.batches.create(requests=[request("a"), request("b")])
    again = client.messages.batches.retrieve(batch.id)
    assert again.processing_status == "in_progress"
    counts = again.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (2, 0, 0, 0, 0)
    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
        client.messages.batches.results(batch.id)


def test_list_is_newest_first_and_paginates(emu: Emulator, client: anthropic.Anthropic, http: httpx2.Client) -> None:
    made = [client.messages.batches.create(requests=[request(f"r{i}")]).id for i in range(23)]
    newest_first = list(reversed(made))

    page = client.messages.batches.list()
    assert [b.id for b in page.data] == newest_first[:20]  # default limit 20
    assert page.has_more is True

    assert [b.id for b in client.messages.batches.list(limit=4)] == newest_first  # auto-pagination via after_id

    raw = http.get("/v1/messages/batches", params={"limit": 3, "after_id": newest_first[2]}).json()
    assert [b["id"] for b in raw["data"]] == newest_first[3:6]
    assert raw["first_id"] == newest_first[3] and raw["last_id"] == newest_first[5] and raw["has_more"] is True

    before = http.get("/v1/messages/batches", params={"limit": 2, "before_id": newest_first[5]}).json()
    assert [b["id"] for b in before["data"]] == newest_first[3:5] and before["has_more"] is True

    tail = http.get("/v1/messages/batches", params={"limit": 1000, "after_id": newest_first[20]}).json()
    assert [b["id"] for b in tail["data"]] == newest_first[21:] and tail["has_more"] is False

    for bad in (0, 1001):
        with pytest.raises(anthropic.BadRequestError):
            client.messages.batches.list(limit=bad)


def test_cancel_before_processing_cancels_everything(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(latency=3600, cancel_latency=0)
    batch = client.messages.batches.create(requests=[request(f"c{i}") for i in range(10)])

    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None

    ended = wait_ended(client, batch.id)
    assert ended.request_counts.canceled == 10 and ended.request_counts.succeeded == 0
    assert {r.result.type for r in client.messages.batches.results(batch.id)} == {"canceled"}

    with pytest.raises(anthropic.BadRequestError, match="cannot be canceled"):
        client.messages.batches.cancel(batch.id)


def test_cancel_can_let_a_fraction_complete(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(latency=3600, cancel_complete_fraction=0.5)
    batch = client.messages.batches.create(requests=[request(f"c{i}") for i in range(60)])
    client.messages.batches.cancel(batch.id)
    counts = wait_ended(client, batch.id).request_counts
    assert counts.succeeded > 0 and counts.canceled > 0
    assert counts.succeeded + counts.canceled == 60


def test_delete_only_once_ended(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(latency=3600)
    slow = client.messages.batches.create(requests=[request("x")])
    with pytest.raises(anthropic.BadRequestError, match="cancel it"):
        client.messages.batches.delete(slow.id)

    emu.configure(latency=0)
    done = client.messages.batches.create(requests=[request("y")])
    wait_ended(client, done.id)
    deleted = client.messages.batches.delete(done.id)
    assert deleted.id == done.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(done.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.delete(done.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_01doesnotexist000000000000")


def test_auth_styles_and_missing_key(emu: Emulator) -> None:
    url = f"{emu.base_url}/v1/messages/batches"
    with httpx2.Client() as raw:
        missing = raw.get(url)
        assert missing.status_code == 401
        body = missing.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert body["request_id"] == missing.headers["request-id"]
        assert raw.get(url, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}).status_code == 200
        beta = raw.get(
            url,
            params={"beta": "true"},
            headers={"authorization": "Bearer k", "anthropic-beta": "message-batches-2024-09-24"},
        )
        assert beta.status_code == 200
    assert emu.counters()["auth_failures"] == 1


def test_only_the_configured_key_is_accepted() -> None:
    with run_emulator(EmulatorConfig(api_key="sk-right")) as emu:
        with anthropic.Anthropic(api_key="sk-wrong", base_url=emu.base_url) as wrong:
            with pytest.raises(anthropic.AuthenticationError):
                wrong.messages.batches.list()
        with anthropic.Anthropic(api_key="sk-right", base_url=emu.base_url) as right:
            assert right.messages.batches.list().data == []
        with httpx2.Client() as raw:
            ok = raw.get(f"{emu.base_url}/v1/messages/batches", headers={"x-api-key": "sk-right"})
            assert ok.status_code == 200
        config = httpx2.get(f"{emu.base_url}/_emulator/config").json()
        assert config["api_key"] is True and "sk-right" not in json.dumps(config)


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: List should have at least 1 item"),
        ([request("ok"), request("bad id!")], "requests.1.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"),
        ([request("x" * 65)], "requests.0.custom_id: String should have at most 64 characters"),
        ([request("")], "requests.0.custom_id: String should have at least 1 character"),
        ([request("a"), request("b"), request("a")], "requests.2.custom_id: Duplicate custom_id 'a'"),
        ([{"custom_id": "a", "params": "nope"}], "requests.0.params: Input should be a valid dictionary"),
        ([{"custom_id": "a"}], "requests.0.params: Field required"),
        ([request("a", stream=True)], "requests.0.params.stream"),
        ([request("a", max_tokens=0)], "requests.0.params.max_tokens: Input should be greater than or equal to 1"),
        ([request("a", speed="fast")], "requests.0.params.speed"),
    ],
)
def test_envelope_errors_reject_the_whole_create(
    emu: Emulator, client: anthropic.Anthropic, requests: list[Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=requests)
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    assert emu.counters()["batches_created"] == 0 and emu.counters()["creates_rejected"] == 1


def test_missing_requests_key_and_too_many_requests(emu: Emulator, http: httpx2.Client) -> None:
    missing = http.post("/v1/messages/batches", json={"items": []})
    assert missing.status_code == 400 and missing.json()["error"]["message"] == "requests: Field required"
    not_json = http.post("/v1/messages/batches", content=b"{not json")
    assert not_json.status_code == 400

    emu.configure(max_requests_per_batch=3)
    too_many = http.post("/v1/messages/batches", json={"requests": [request(f"r{i}") for i in range(5)]})
    assert too_many.status_code == 400
    assert too_many.json()["error"]["message"] == "requests: List should have at most 3 items after validation, not 5"
    assert emu.counters()["batches_created"] == 0


def test_oversized_body_gets_413_request_too_large(emu: Emulator, client: anthropic.Anthropic) -> None:
    emu.configure(max_body_bytes=4_000)
    big = [request(f"r{i}", "word " * 200) for i in range(10)]  # ~12 KB
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.batches.create(requests=big)
    assert caught.value.status_code == 413
    assert caught.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    assert emu.counters()["create_posts"] == 1  # 413 is not retried
    assert list(emu.store.uploads_dir.iterdir()) == []  # nothing left on disk

    # Same with chunked transfer (no Content-Length): counted while streaming.
    with httpx2.Client(base_url=emu.base_url, headers={"x-api-key": "k"}) as http:
        payload = json.dumps({"requests": big}).encode()
        chunked = http.post("/v1/messages/batches", content=iter([payload[i : i + 1000] for i in range(0, len(payload), 1000)]))
        assert chunked.status_code == 413


def test_bad_params_error_only_their_own_request(emu: Emulator, client: anthropic.Anthropic) -> None:
    good = request("good")
    bad = {
        "unknown-model": request("unknown-model", model="claude-nonexistent-9"),
        "no-messages": {"custom_id": "no-messages", "params": {"model": "claude-haiku-4-5", "max_tokens": 10}},
        "no-model": {"custom_id": "no-model", "params": {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}},
        "too-many-tokens": request("too-many-tokens", max_tokens=100_000, model="claude-haiku-4-5-20251001"),
        "bad-role": request("bad-role", messages=[{"role": "system", "content": "hi"}]),
        "bad-block": request("bad-block", messages=[{"role": "user", "content": [{"type": "text"}]}]),
    }
    batch = client.messages.batches.create(requests=[good, *bad.values()])
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 1 and ended.request_counts.errored == len(bad)

    by_id = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert by_id["good"].type == "succeeded"
    for cid in bad:
        result = by_id[cid]
        assert result.type == "errored"
        expected = "not_found_error" if cid == "unknown-model" else "invalid_request_error"  # as the real API answers
        assert result.error.error.type == expected  # type: ignore[union-attr]
    assert by_id["unknown-model"].error.error.message == "model: claude-nonexistent-9"  # type: ignore[union-attr]
    assert by_id["too-many-tokens"].error.error.message == (  # type: ignore[union-attr]
        "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for claude-haiku-4-5-20251001"
    )
    assert by_id["no-model"].error.error.message == "model: Field required"  # type: ignore[union-attr]
    assert by_id["no-messages"].error.error.message == "messages: Field required"  # type: ignore[union-attr]


def test_known_models_include_dated_and_new_ids(emu: Emulator, client: anthropic.Anthropic) -> None:
    names = [
        "claude-opus-4-5", "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1",
        "claude-sonnet-4", "claude-3-haiku-20240307", "claude-opus-5", "claude-sonnet-5", "claude-haiku-5-5",
    ]  # fmt: skip
    batch = client.messages.batches.create(requests=[request(f"m{i}", model=m, max_tokens=4096) for i, m in enumerate(names)])
    assert wait_ended(client, batch.id).request_counts.succeeded == len(names)


def test_batch_expires_after_emulated_24_hours(emu: Emulator, client: anthropic.Anthropic) -> None:
    # 1 real second = 4 emulated days; the batch would need 2 days, so it expires after 24 h (0.25 s).
    emu.configure(time_scale=4 * 86_400, latency=2 * 86_400)
    batch = client.messages.batches.create(requests=[request(f"e{i}") for i in range(5)])
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.expired == 5
    assert ended.ended_at == ended.expires_at
    assert {r.result.type for r in client.messages.batches.results(batch.id)} == {"expired"}


def test_results_are_archived_29_days_after_creation(emu: Emulator, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    wait_ended(client, batch.id)
    assert len(list(client.messages.batches.results(batch.id))) == 1
    emu.configure(time_scale=30 * 86_400 * 4)  # 30 emulated days pass in 0.25 s
    deadline = time.monotonic() + 5
    while (archived := client.messages.batches.retrieve(batch.id)).archived_at is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert archived.archived_at - archived.created_at == timedelta(days=29)
    with pytest.raises(anthropic.NotFoundError, match="archived"):
        client.messages.batches.results(batch.id)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    config = EmulatorConfig(state_dir=tmp_path / "state")
    with run_emulator(config) as first, anthropic.Anthropic(api_key="k", base_url=first.base_url) as client:
        done = client.messages.batches.create(requests=[request("a"), request("b")])
        wait_ended(client, done.id)
        before = sorted(r.to_json() for r in client.messages.batches.results(done.id))
        first.configure(latency=0.5)
        pending = client.messages.batches.create(requests=[request("p")])

    config.latency = 0.5
    with run_emulator(config) as second, anthropic.Anthropic(api_key="k", base_url=second.base_url) as client:
        assert [b.id for b in client.messages.batches.list()] == [pending.id, done.id]
        assert sorted(r.to_json() for r in client.messages.batches.results(done.id)) == before
        resumed = client.messages.batches.retrieve(pending.id)
        assert resumed.created_at == pending.created_at
        assert wait_ended(client, pending.id).request_counts.succeeded == 1


def test_admin_endpoints_change_faults_and_report_counters(emu: Emulator, http: httpx2.Client) -> None:
    changed = http.post("/_emulator/config", json={"faults": {"http_errors": [529], "http_error_endpoints": ["list"]}})
    assert changed.status_code == 200 and changed.json()["faults"]["http_errors"] == [529]
    with anthropic.Anthropic(api_key="k", base_url=emu.base_url, max_retries=0) as client:
        with pytest.raises(anthropic.OverloadedError):
            client.messages.batches.list()
        assert client.messages.batches.list().data == []

    rejected = http.post("/_emulator/config", json={"faults": {"no_such_fault": 1}})
    assert rejected.status_code == 400 and "no_such_fault" in rejected.json()["error"]["message"]
    stats = http.get("/_emulator/stats").json()
    assert stats["requests_by_endpoint"]["list"] == 2
    assert stats["faults_fired"] == {"http_529": 1}
    assert http.post("/_emulator/stats/reset").json()["http_requests"] == 0


def test_unknown_route_uses_the_error_envelope(emu: Emulator, http: httpx2.Client) -> None:
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert response.headers["request-id"] == response.json()["request_id"]
