"""Create bodies the fast parser takes and those it hands to ijson: same batches, same answers, same errors.

Posted as raw bytes (httpx2), since the SDK only ever sends compact JSON."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx2
import pytest

from batch_bridge.emulator import intake
from batch_bridge.emulator.runner import Emulator


def request(cid: str, text: str = "I love this blender", model: str = "claude-haiku-4-5") -> dict[str, Any]:
    params = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": cid, "params": params}


@pytest.fixture
def http(emu: Emulator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=emu.base_url, headers={"x-api-key": "k"}, timeout=60) as c:
        yield c


def results(http: httpx2.Client, body: bytes) -> dict[str, Any]:
    created = http.post("/v1/messages/batches", content=body)
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while http.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lines = http.get(f"/v1/messages/batches/{batch_id}/results").text.splitlines()
    return {r["custom_id"]: r["result"] for r in map(json.loads, lines)}


def test_layout_of_the_body_does_not_change_the_answers(http: httpx2.Client) -> None:
    reqs = [request("a"), request("b", "terrible, it broke"), request("c", "naïve café ☕ \u2028 end")]
    compact = json.dumps({"requests": reqs}, separators=(",", ":"), ensure_ascii=False).encode()
    pretty = json.dumps({"requests": reqs}, indent=2).encode()  # newlines inside items, \u escapes
    spaced = b'\r\n { "requests" :\t[ ' + b" , ".join(json.dumps(r).encode() for r in reqs) + b" ] } \n"
    other_key_first = json.dumps({"note": "ignored", "requests": reqs}).encode()  # the ijson path

    expected = results(http, compact)
    assert expected["c"]["type"] == "succeeded"
    assert results(http, pretty) == expected  # re-encoded compactly: even the message ids match
    for body in (spaced, other_key_first):
        got = results(http, body)
        assert {cid: r["message"]["content"] for cid, r in got.items()} == {
            cid: r["message"]["content"] for cid, r in expected.items()
        }


def test_a_request_larger_than_a_read_chunk(http: httpx2.Client) -> None:
    big = "word " * (intake.CHUNK_CHARS // 4)  # ~1.3 MB: spans two reads; ~330,000 tokens, so a 1M-token model
    got = results(http, json.dumps({"requests": [request("small"), request("big", big, "claude-sonnet-5-5"),
                                                 request("last")]}).encode())
    assert {cid: r["type"] for cid, r in got.items()} == {"small": "succeeded", "big": "succeeded", "last": "succeeded"}
    assert f"It has {intake.CHUNK_CHARS // 4} words" in got["big"]["message"]["content"][0]["text"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"requests":[{"custom_id":"a","params":{"model":"m","max_tokens":NaN,"messages":[]}}]}',
        b'{"requests":[{"custom_id":"a","params":{"max_tokens":1e400}}]}',
        b'{"requests":[{"custom_id":"a","params":{}},]}',
        b'{"requests":[{"custom_id":"a","params":{}}]} trailing',
        b'{"requests":[{"custom_id":"a","params":{"x":"\xff"}}]}',
        b'{"requests":[{"custom_id":"a","params":{}}',
    ],
)
def test_bodies_that_are_not_json_get_400(emu: Emulator, http: httpx2.Client, body: bytes) -> None:
    response = http.post("/v1/messages/batches", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("The request body is not valid JSON")
    assert emu.counters()["batches_created"] == 0


def test_escaped_surrogates_decode_like_before(http: httpx2.Client) -> None:
    def body(cid: str, escaped: bytes) -> bytes:
        return (b'{"requests":[{"custom_id":"' + cid.encode() + b'","params":{"model":"claude-haiku-4-5",'
                b'"max_tokens":50,"messages":[{"role":"user","content":"say ' + escaped + b' now"}]}}]}')

    pair = results(http, body("pair", b"\\ud83d\\ude00"))  # fast path, re-encoded
    assert "say \U0001f600 now" in pair["pair"]["message"]["content"][0]["text"]
    lone = results(http, body("lone", b"\\ud800"))  # not writable as UTF-8: ijson, which makes it "?"
    assert "say ? now" in lone["lone"]["message"]["content"][0]["text"]


def test_envelope_errors_name_the_same_request_on_both_paths(emu: Emulator, http: httpx2.Client) -> None:
    reqs = [request("a"), {"custom_id": "b", "params": {"stream": True}}]
    for body in (json.dumps({"requests": reqs}), json.dumps({"x": 1, "requests": reqs})):
        response = http.post("/v1/messages/batches", content=body.encode())
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("requests.1.params.stream: streaming is not supported")


def pieces(body: bytes, n: int) -> Iterator[bytes]:
    step = max(1, len(body) // n)
    for i in range(0, len(body), step):
        yield body[i : i + step]


def test_a_body_arriving_in_small_pieces(http: httpx2.Client) -> None:
    reqs = [request(f"r{i}", f"text {i} " * 20) for i in range(300)]
    body = json.dumps({"requests": reqs}, separators=(",", ":")).encode()
    created = http.post("/v1/messages/batches", content=pieces(body, 500))  # chunked, ~100 bytes each
    assert created.status_code == 200 and created.json()["request_counts"]["processing"] == 300

    bad = reqs[:1] + [{"custom_id": "bad id!", "params": {}}] + reqs[2:]
    rejected = http.post("/v1/messages/batches", content=pieces(json.dumps({"requests": bad}).encode(), 500))
    assert rejected.status_code == 400
    assert rejected.json()["error"]["message"].startswith("requests.1.custom_id: String should match pattern")


def test_a_client_that_leaves_mid_upload_creates_nothing(emu: Emulator, http: httpx2.Client) -> None:
    body = json.dumps({"requests": [request(f"r{i}") for i in range(200)]}).encode()

    def half_then_gone() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        raise ConnectionAbortedError("client gave up")

    with pytest.raises(Exception):
        http.post("/v1/messages/batches", content=half_then_gone())
    deadline = time.monotonic() + 10
    while list(emu.store.uploads_dir.iterdir()) or list(emu.store.batches_dir.iterdir()):
        assert time.monotonic() < deadline, "a half-uploaded create left files behind"
        time.sleep(0.02)
    assert emu.counters()["batches_created"] == 0 and emu.store.count() == 0
