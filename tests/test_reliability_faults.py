"""Faults from the API, injected by the emulator: every run must end with one answer per row, no batch
paid twice, and `retry-after` honoured.

Sleeps of our own retry loops are recorded (an injected `sleep`), so waiting costs nothing; the SDK's
own retries of GET requests really sleep the emulator's short `retry-after`.
"""

from __future__ import annotations

import time

import pytest

from batch_bridge import api, bridge, state, status
from batch_bridge.cli import _status_text
from helpers import current, load_staging, reset_home, settings_for, write_project

ROWS = 25
CHUNK = 10
BATCHES = 3
META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50,
        "prompt_column": "prompt", "max_requests_per_batch": CHUNK}


@pytest.fixture(scope="module")
def project_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_project(root, META)
    s = settings_for(root)
    load_staging(s, f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, 'text number ' || i AS prompt FROM range({ROWS}) t(i)")
    bridge.load_jobs(s)
    return root


@pytest.fixture
def proj(project_root, emulator, monkeypatch):
    s = settings_for(project_root, emulator.base_url)
    reset_home(s)
    monkeypatch.delenv(bridge.ENV_FAULT, raising=False)
    return s


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def submit(s, sleep=time.sleep):
    return bridge.submit(s, bridge.load_jobs(s), api.build_client(s), sleep=sleep)


def run(s, sleep=time.sleep):
    return bridge.run(s, bridge.load_jobs(s), api.build_client(s), timeout=60, sleep=sleep)


def collect(s, sleep=time.sleep):
    return bridge.collect(s, bridge.load_jobs(s), api.build_client(s), sleep=sleep)


def assert_all_answered_once(s) -> None:
    rows = current(s, "items")
    assert len(rows) == ROWS == len({r["id"] for r in rows})
    assert {r["status"] for r in rows} == {"succeeded"}
    with state.connect(s) as con:
        dup = con.execute(
            "SELECT batch_id, request_custom_id FROM bb_state.responses GROUP BY ALL HAVING count(*) > 1").fetchall()
        succeeded = con.execute("SELECT count(*) FROM bb_state.responses WHERE status = 'succeeded'").fetchone()[0]
    assert dup == [] and succeeded == ROWS


@pytest.mark.parametrize("statuses", [[429, 529], [529, 529, 529]])
def test_create_refused_is_retried_honouring_retry_after(proj, emulator, statuses):
    emulator.set_faults(http_errors=statuses, http_error_endpoints=("create",), retry_after=7)
    sleeps = Sleeps()
    report = submit(proj, sleep=sleeps)
    assert len(report.batches) == BATCHES and report.pending_unknown == []
    assert sleeps.count(7.0) == len(statuses), sleeps  # retry-after, not our own backoff
    c = emulator.counters()
    assert (c["create_posts"], c["batches_created"]) == (BATCHES + len(statuses), BATCHES)
    run(proj)
    assert_all_answered_once(proj)


def test_gets_are_retried_by_the_sdk_honouring_retry_after(proj, emulator):
    submit(proj)
    emulator.stats.reset()
    # 1.5 s: longer than the SDK's own first backoffs (0.4-1 s), so only an honoured retry-after waits it.
    emulator.set_faults(http_errors=[429, 500, 529, 500], http_error_endpoints=("retrieve", "results", "list"),
                        retry_after=1.5)
    run(proj)
    fired = emulator.counters()["faults_fired"]
    assert (fired["http_429"], fired["http_500"], fired["http_529"]) == (1, 2, 1)
    # Each refused GET was followed by its retry (the SDK's retry count one higher) no sooner than 1.5 s.
    arrivals = emulator.stats.arrivals()
    retries = [(t, ep, n) for t, ep, n in arrivals if n > 0]
    assert len(retries) == 4, arrivals
    for t, ep, n in retries:
        before = [u for u, e, m in arrivals if e == ep and m == n - 1 and u < t]
        assert before and t - before[-1] >= 1.5, (ep, n, t - before[-1] if before else None)
    assert emulator.counters()["batches_created"] == 0  # (counted since the reset) none created again
    assert_all_answered_once(proj)


def test_create_500_is_reconciled_by_list_never_sent_twice(proj, emulator):
    emulator.set_faults(http_errors=[500], http_error_endpoints=("create",))
    report = submit(proj, sleep=Sleeps())
    # The 500 leaves the outcome unknown: within the grace nothing is resent, the next run looks again.
    # A batch of the same request count (10 and 10) waits for it: never two in the create window.
    assert len(report.pending_unknown) == 1
    assert len(report.batches) + len(report.held) == BATCHES - 1
    assert emulator.counters()["batches_created"] == len(report.batches)
    first = len(report.batches)
    report = submit(proj.with_(reconcile_grace=0), sleep=Sleeps())
    assert len(report.batches) == BATCHES - first and report.pending_unknown == [] and report.held == []
    assert emulator.counters()["batches_created"] == BATCHES
    run(proj)
    assert_all_answered_once(proj)


def test_create_timeout_finds_the_batch_with_list_and_adopts_it(proj, emulator):
    # The server persists the batch, then answers only after 1.5 s; the client gives up after 0.3 s.
    emulator.set_faults(slow_create_seconds=1.5, slow_create_times=1)
    report = submit(proj.with_(create_timeout=0.3), sleep=Sleeps())
    assert len(report.adopted) == 1 and len(report.batches) == BATCHES
    c = emulator.counters()
    assert (c["create_posts"], c["batches_created"]) == (BATCHES, BATCHES)
    with state.connect(proj) as con:
        note = con.execute("SELECT note FROM bb_state.submissions WHERE batch_id = ?", [report.adopted[0]]).fetchone()[0]
    assert note == "adopted after an ambiguous create"
    run(proj)
    assert_all_answered_once(proj)


def test_connection_resets_on_create_and_reads(proj, emulator):
    emulator.set_faults(connection_resets=2, connection_reset_endpoints=("create",))
    report = submit(proj.with_(reconcile_grace=0), sleep=Sleeps())
    assert len(report.batches) == BATCHES
    emulator.set_faults(connection_resets=3, connection_reset_endpoints=("retrieve", "results", "list"))
    run(proj)
    c = emulator.counters()
    assert c["faults_fired"]["connection_reset"] == 5
    assert c["batches_created"] == BATCHES
    assert_all_answered_once(proj)


def test_results_stream_cut_short_is_downloaded_again(proj, emulator):
    submit(proj)
    emulator.set_faults(results_cut_after_bytes=300, results_cut_times=2)
    sleeps = Sleeps()
    run(proj, sleep=sleeps)
    c = emulator.counters()
    assert c["faults_fired"]["results_cut"] == 2
    assert c["requests_by_endpoint"]["results"] == BATCHES + 2
    assert not list(proj.raw_results_dir.glob("*.part"))
    assert_all_answered_once(proj)


def test_a_stream_without_a_length_closed_inside_its_last_line_is_not_taken_whole(tmp_path):
    """A results body sent without Content-Length ends where the connection closes: cut inside its last
    line, the line count would still match. The last line must be whole JSON to count."""
    import http.server
    import threading
    from types import SimpleNamespace

    import anthropic

    whole = b'{"custom_id": "a", "result": {"type": "expired"}}\n{"custom_id": "b", "result": {"type": "expired"}}'
    body = {"/cut": whole[:-7], "/whole": whole}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited: no Content-Length

        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/binary")
            self.end_headers()
            self.wfile.write(body[self.path])

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with anthropic.Anthropic(api_key="sk-test", base_url=base, max_retries=0) as client:
            cut = SimpleNamespace(id="msgbatch_cut", processing_status="ended", results_url=base + "/cut")
            with pytest.raises(api.ResultsError, match="ended inside a line"):
                api.download_results(client, cut, tmp_path / "cut.jsonl")
            assert not (tmp_path / "cut.jsonl").exists()
            done = SimpleNamespace(id="msgbatch_whole", processing_status="ended", results_url=base + "/whole")
            assert api.download_results(client, done, tmp_path / "whole.jsonl") == 2
            assert (tmp_path / "whole.jsonl").read_bytes() == whole + b"\n"
    finally:
        server.shutdown()


def test_transient_404_right_after_create_is_tolerated(proj, emulator):
    emulator.set_faults(not_found_first_calls=2)
    sub, w = run(proj)
    assert len(sub.batches) == BATCHES and w.collected == {"items": ROWS}
    assert emulator.counters()["faults_fired"]["not_found"] >= BATCHES * 2
    with state.connect(proj) as con:
        assert con.execute("SELECT count(*) FROM bb_state.batches WHERE local_state = 'lost'").fetchone()[0] == 0
    assert_all_answered_once(proj)


def test_deleted_batch_is_reported_lost_and_its_rows_resent(proj, emulator):
    jobs = bridge.load_jobs(proj)
    client = api.build_client(proj)
    sub = bridge.submit(proj, jobs, client)
    bridge.wait(proj, jobs, client, timeout=30)
    gone = sub.batches[0]
    client.messages.batches.delete(gone)
    report = collect(proj)
    assert report.lost == [gone]
    with state.connect(proj) as con:
        local_state, note = con.execute("SELECT local_state, note FROM bb_state.batches WHERE batch_id = ?",
                                        [gone]).fetchone()
    assert local_state == "lost" and "deleted" in note and "sent again" in note
    # `status` says what the user should understand, not the API's last (now meaningless) answer.
    with state.connect(proj) as con:
        shown = {b["batch_id"]: b for b in status.batches(con, ["items"])}[gone]
    assert shown["state"] == "lost: gone from the API, its rows are sent again"
    assert status.batch_state("in_progress", "lost") == shown["state"]
    line = next(x for x in _status_text({"jobs": [], "batches": [shown]}).splitlines() if gone in x)
    assert "lost: gone from the API" in line and "in_progress" not in line and "ended" not in line
    plans, _ = bridge.plan(proj, jobs)
    assert plans[0].send_keys == CHUNK  # the lost batch's rows, and only those
    run(proj)
    assert emulator.counters()["batches_created"] == BATCHES + 1
    assert_all_answered_once(proj)


def test_batch_past_29_day_retention_is_reported_lost_and_resent(proj, emulator):
    jobs = bridge.load_jobs(proj)
    client = api.build_client(proj)
    bridge.submit(proj, jobs, client)
    bridge.wait(proj, jobs, client, timeout=30)
    emulator.configure(time_scale=2e7)  # 29 emulated days pass in about 0.13 real seconds
    emulator.clock.now()  # the clock takes a new scale when next read
    time.sleep(0.3)
    emulator.configure(time_scale=1.0)
    report = collect(proj)
    assert len(report.lost) == BATCHES and report.loaded == {}
    with state.connect(proj) as con:
        notes = [r[0] for r in con.execute("SELECT note FROM bb_state.batches WHERE local_state = 'lost'").fetchall()]
    assert len(notes) == BATCHES and all("29-day retention" in n for n in notes)
    run(proj)
    assert emulator.counters()["batches_created"] == 2 * BATCHES
    assert_all_answered_once(proj)
