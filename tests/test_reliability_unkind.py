"""The real API's unkind side, made by the emulator: late creates behind a propagation delay, another
client's batches of the same size in a shared workspace, the processing-queue limit, a user's cap per
batch, creates rejected for good, retry headers in every form, and account errors.

Every test ends by checking the promise: each row answered once, no input paid twice, nothing foreign
loaded. Sleeps of the bridge's own loops are recorded (an injected `sleep`), never slept.
"""

from __future__ import annotations

import email.utils
import json
import math
import time

import pytest
from click.testing import CliRunner

from batch_bridge import api, bridge, state
from batch_bridge import collect as collect_mod
from batch_bridge import report_data
from batch_bridge import status as status_mod
from batch_bridge.pricing import load_prices
from batch_bridge.cli import cli
from batch_bridge.errors import ApiAccountError
from helpers import current, load_staging, reset_home, settings_for, write_project

ROWS = 25
META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt"}
STAGING = f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, 'text number ' || i AS prompt FROM range({ROWS}) t(i)"


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class Steps(list):
    """A progress reporter that keeps what it was told."""

    def step(self, message: str) -> None:
        self.append(message)

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        pass


@pytest.fixture(scope="module")
def project_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("unkind")
    write_project(root, META)
    s = settings_for(root)
    load_staging(s, STAGING)
    bridge.load_jobs(s)
    return root


@pytest.fixture
def proj(project_root, emulator):
    s = settings_for(project_root, emulator.base_url)
    reset_home(s)
    load_staging(s, STAGING)
    return s


def jobs_client(s):
    return bridge.load_jobs(s), api.build_client(s)


def assert_answered_once(s, rows: int = ROWS) -> None:
    """One succeeded answer per row, no input answered twice, and no answer that is not ours."""
    out = current(s, "items")
    assert len(out) == rows == len({r["id"] for r in out})
    assert {r["status"] for r in out} == {"succeeded"}
    with state.connect(s) as con:
        paid_twice = con.execute("SELECT input_hash FROM bb_state.responses WHERE status = 'succeeded' "
                                 "GROUP BY ALL HAVING count(*) > 1").fetchall()
        foreign = con.execute("SELECT count(*) FROM bb_state.responses r ANTI JOIN bb_state.sent_requests s "
                              "ON s.submission_id = (SELECT submission_id FROM bb_state.batches b WHERE b.batch_id = r.batch_id) "
                              "AND s.request_custom_id = r.request_custom_id").fetchone()[0]
    assert paid_twice == [] and foreign == 0


def wait_listed(client, batch_count: int, timeout: float = 30.0) -> None:
    """Wait until `list` shows this many batches (the emulator's propagation delay has passed)."""
    deadline = time.monotonic() + timeout
    while len(list(client.messages.batches.list(limit=100))) < batch_count:
        assert time.monotonic() < deadline, "batches never appeared in list"
        time.sleep(0.1)


# --- 1. a create answered after the client's timeout, its batch not yet in `list` -----------------


def test_late_create_behind_a_propagation_delay_is_adopted_not_sent_again(proj, emulator):
    # The server stores the batch, answers after 4 s; the client gives up after 2 s. The batch shows in
    # `list` only 6 s after it was stored (well after the first submit's looks, even on a loaded
    # machine). The grace (2 s) is no longer than the create timeout: counted from the create's start,
    # it would be over before the first look, and the file would be sent again.
    emulator.set_faults(slow_create_seconds=4, slow_create_times=1, propagation_seconds=6)
    s = proj.with_(create_timeout=2, reconcile_grace=2)
    jobs, client = jobs_client(s)
    report = bridge.submit(s, jobs, client, sleep=Sleeps())
    assert report.batches == [] and len(report.pending_unknown) == 1
    assert emulator.counters()["create_posts"] == 1
    with state.connect(s) as con:
        unknown_at, started = con.execute(
            "SELECT outcome_unknown_at, create_started_at FROM bb_state.submissions").fetchone()
    assert (unknown_at - started).total_seconds() >= 2  # the grace counts from the timeout, not the start

    wait_listed(client, 1)
    report = bridge.submit(s, jobs, client, sleep=Sleeps())
    assert len(report.adopted) == 1
    bridge.run(s, jobs, client, timeout=60)
    c = emulator.counters()
    assert (c["create_posts"], c["batches_created"]) == (1, 1)
    assert_answered_once(s)


def test_run_reports_a_create_it_resolved_while_waiting(proj, emulator):
    # The create times out and its batch shows in `list` only later: `run`'s submit pass leaves it
    # undecided, and its wait finds and adopts it. The report says what is true at the end.
    emulator.set_faults(slow_create_seconds=4, slow_create_times=1, propagation_seconds=8)
    s = proj.with_(create_timeout=2, reconcile_grace=600)
    jobs, client = jobs_client(s)
    report, waited = bridge.run(s, jobs, client, timeout=90)
    assert len(report.adopted) == 1 and report.pending_unknown == [] and waited.collected == {"items": ROWS}
    c = emulator.counters()
    assert (c["create_posts"], c["batches_created"]) == (1, 1)
    assert_answered_once(s)


def test_an_undecided_create_is_sent_again_only_after_a_whole_grace(proj, emulator):
    # A reset before the body reached the server: nothing exists. Within the grace every run only looks.
    emulator.set_faults(connection_resets=1, connection_reset_endpoints=("create",))
    s = proj.with_(reconcile_grace=3600)
    jobs, client = jobs_client(s)
    for _ in range(2):
        report = bridge.submit(s, jobs, client, sleep=Sleeps())
        assert report.batches == [] and len(report.pending_unknown) == 1
    assert emulator.counters()["batches_created"] == 0
    # The text output says so too, not only --json and status.
    env = {"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "BATCH_BRIDGE_HOME": str(s.home), "ANTHROPIC_API_KEY": "sk-test",
           "ANTHROPIC_BASE_URL": emulator.base_url, "DBT_PROJECT_DIR": str(s.project_dir),
           "DBT_PROFILES_DIR": str(s.profiles_dir), "BATCH_BRIDGE_RECONCILE_GRACE": "3600"}
    r = CliRunner().invoke(cli, ["sync"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "submitted 0 batch(es)\n1 create(s) of unknown outcome, looked for in `list`" in r.stdout
    with state.connect(s) as con:  # the grace ran out an hour ago
        con.execute("UPDATE bb_state.submissions SET outcome_unknown_at = outcome_unknown_at - INTERVAL 2 HOUR")
    report = bridge.submit(s, jobs, client, sleep=Sleeps())
    assert len(report.batches) == 1 and report.adopted == []
    bridge.run(s, jobs, client, timeout=60)
    assert emulator.counters()["batches_created"] == 1
    assert_answered_once(s)


# --- 2. a shared workspace: another client's batch of the same size ------------------------------


def adopt_a_neighbour(proj, emulator):
    """Another client created a batch of the same size 3 s before ours (already in `list`); ours is
    stored, answered with a 500, and shows in `list` only 2 s later: theirs is adopted for ours."""
    emulator.set_faults(neighbour_batches=1, neighbour_offset_seconds=-3, propagation_seconds=2,
                        create_errors_after_store=[500])
    emulator.configure(latency=0.5)
    s = proj.with_(reconcile_grace=600)
    jobs, client = jobs_client(s)
    (foreign,) = bridge.submit(s, jobs, client, sleep=Sleeps()).adopted
    return s, jobs, client, foreign


def test_a_foreign_batch_adopted_on_its_count_is_released_and_ours_found(proj, emulator):
    s, jobs, client, foreign = adopt_a_neighbour(proj, emulator)
    assert foreign not in {b.id for b in client.messages.batches.list() if b.created_at.timestamp() > time.time() - 2.5}

    steps = Steps()
    bridge.run(s, jobs, client, timeout=60, progress=steps)
    assert any(foreign in m and "not to our requests" in m for m in steps), steps
    with state.connect(s) as con:
        assert con.execute("SELECT batch_id FROM bb_state.foreign_batches").fetchall() == [(foreign,)]
        assert con.execute("SELECT local_state FROM bb_state.batches WHERE batch_id = ?", [foreign]).fetchone() == ("foreign",)
        assert con.execute("SELECT count(*) FROM bb_state.responses WHERE batch_id = ?", [foreign]).fetchone()[0] == 0
        # `status` names it for what it is; the report's batches and costs leave it out (its estimate is ours).
        (shown,) = [b for b in status_mod.batches(con, ["items"]) if b["batch_id"] == foreign]
        assert shown["state"].startswith("another client's")
        reported = report_data.gather(con, ["items"], load_prices(), None).batches
        assert len(reported) == 1 and foreign not in {b["batch_id"] for b in reported}
    theirs = client.messages.batches.retrieve(foreign)
    assert theirs.processing_status == "ended" and theirs.cancel_initiated_at is None  # never cancelled
    c = emulator.counters()
    assert c["requests_by_endpoint"].get("cancel", 0) == 0 and c["requests_by_endpoint"].get("delete", 0) == 0
    assert (c["batches_created"], c["neighbour_batches_created"]) == (1, 1)
    assert_answered_once(s)
    # Nothing is left to do: a further sync loads and sends nothing, and fails nothing.
    c2, s2 = bridge.sync(s, jobs, client)
    assert c2.loaded == {} and s2.batches == [] and emulator.counters()["batches_created"] == 1


def test_an_adopted_foreign_batch_deleted_by_its_owner_is_released_not_paid_again(proj, emulator):
    # As above, the neighbour of our size is adopted for our create of unknown outcome; then its owner
    # deletes it before any answer of it was read. Our own batch is still in the workspace: the rows
    # must not be sent again, and our batch must be found and loaded.
    s, jobs, client, foreign = adopt_a_neighbour(proj, emulator)
    deadline = time.monotonic() + 30
    while client.messages.batches.retrieve(foreign).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.messages.batches.delete(foreign)
    with state.connect(s) as con:  # long past the API's propagation delay: its 404 means deleted
        con.execute("UPDATE bb_state.batches SET created_at = created_at - INTERVAL 1 HOUR WHERE batch_id = ?", [foreign])

    steps = Steps()
    collected = collect_mod.collect(client, s, {j.name: j for j in jobs}, progress=steps)
    assert collected.lost == [] and foreign in collected.foreign
    assert any(foreign in m and "nothing is sent twice" in m for m in steps), steps
    with state.connect(s) as con:
        assert con.execute("SELECT state FROM bb_state.submissions").fetchall() == [("creating",)]
    wait_listed(client, 1)  # ours, past its propagation delay (the deleted one is gone from list)
    bridge.run(s, jobs, client, timeout=60)
    c = emulator.counters()
    assert (c["create_posts"], c["batches_created"]) == (1, 1)
    assert_answered_once(s)


def test_an_ended_batch_without_its_results_url_yet_is_waited_for_not_an_error(proj, emulator):
    emulator.set_faults(results_url_delay_seconds=2)
    s = proj
    jobs, client = jobs_client(s)
    (batch_id,) = bridge.submit(s, jobs, client, sleep=Sleeps()).batches
    seen = client.messages.batches.retrieve(batch_id)
    assert seen.processing_status == "ended" and seen.results_url is None
    collected, submitted = bridge.sync(s, jobs, client)  # the scheduled step: no error, nothing loaded yet
    assert collected.loaded == {} and collected.still_running == 1 and submitted.batches == []
    _, waited = bridge.run(s, jobs, client, timeout=60)
    assert waited.collected == {"items": ROWS}
    assert emulator.counters()["batches_created"] == 1
    assert_answered_once(s)


def test_when_no_candidate_is_ours_the_file_is_sent_again_after_the_grace(proj, emulator):
    # Our create is reset before anything was stored; then another client creates a batch of our size.
    emulator.set_faults(connection_resets=1, connection_reset_endpoints=("create",))
    s = proj.with_(reconcile_grace=600)
    jobs, client = jobs_client(s)
    assert bridge.submit(s, jobs, client, sleep=Sleeps()).pending_unknown
    other = client.messages.batches.create(requests=[
        {"custom_id": f"other-{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
                                               "messages": [{"role": "user", "content": "theirs"}]}}
        for i in range(ROWS)])
    report = bridge.submit(s, jobs, client, sleep=Sleeps())
    assert report.adopted == [other.id]  # the only candidate: adopted, provisionally
    with state.connect(s) as con:  # the grace runs out while their batch is processed
        con.execute("UPDATE bb_state.submissions SET outcome_unknown_at = outcome_unknown_at - INTERVAL 2 HOUR")
    steps = Steps()
    bridge.run(s, jobs, client, timeout=60, progress=steps)
    assert any(other.id in m for m in steps)
    assert client.messages.batches.retrieve(other.id).cancel_initiated_at is None
    assert emulator.counters()["batches_created"] == 2  # theirs, and ours sent once the search found nothing
    assert_answered_once(s)


# --- 3. the processing-queue limit ----------------------------------------------------------------


@pytest.fixture
def big(proj):
    load_staging(proj, "SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, 'text number ' || i AS prompt FROM range(250) t(i)")
    yield proj
    load_staging(proj, STAGING)


def test_the_bridge_keeps_its_batches_within_the_queue_limit(big, emulator):
    emulator.configure(queue_limit_requests=100, latency=3600)  # nothing ends until we say so
    s = big.with_(max_queued_requests=100)
    jobs, client = jobs_client(s)
    plans, _ = bridge.plan(s, jobs)
    assert max(c.requests for c in plans[0].chunks) <= 100 and len(plans[0].chunks) == 3
    report = bridge.submit(s, jobs, client, sleep=Sleeps())
    assert len(report.batches) == 1 and len(report.waiting_for_queue) == 2
    with state.connect(s) as con:
        from batch_bridge.status import jobs_summary
        rows = jobs_summary(con, ["items"])[0]["rows"]
    assert rows["waiting_for_queue"] == 150 and rows["in_flight"] == 250
    assert bridge.submit(s, jobs, client, sleep=Sleeps()).batches == []  # still no room: nothing sent, no error
    assert emulator.counters()["create_posts"] == 1  # never asked beyond the limit
    emulator.configure(latency=0)
    bridge.run(s, jobs, client, timeout=60)  # sends the rest as batches end
    c = emulator.counters()
    assert c["batches_created"] == 3 and c["faults_fired"].get("queue_full", 0) == 0
    assert_answered_once(s, 250)


def test_a_429_on_create_is_left_for_later_never_an_error(tmp_path, emulator):
    # The workspace is fuller than the bridge knows (other clients): the API answers 429, retry-after 120 s.
    write_project(tmp_path, {**META, "max_requests_per_batch": 100})
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, "SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, 'text number ' || i AS prompt FROM range(250) t(i)")
    emulator.configure(queue_limit_requests=150, queue_retry_after=120, latency=3600)
    jobs, client = jobs_client(s)
    sleeps = Sleeps()
    c, report = bridge.sync(s, jobs, client, sleep=sleeps)  # creates go in parallel: which fit first varies
    queued = sum(client.messages.batches.retrieve(b).request_counts.processing for b in report.batches)
    assert report.batches and report.waiting_for_queue and queued <= 150
    assert len(report.batches) + len(report.waiting_for_queue) == 3
    assert emulator.counters()["faults_fired"]["queue_full"] >= 1
    assert 120 not in sleeps  # a long retry-after is left to a later run, not slept
    emulator.configure(latency=0)
    bridge.run(s, jobs, client, timeout=120, sleep=time.sleep)
    assert emulator.counters()["batches_created"] == 3
    assert_answered_once(s, 250)


# --- 4. a user's cap per batch ----------------------------------------------------------------------


def test_a_cap_per_batch_costs_a_few_requests_per_batch_not_a_batch_per_request(tmp_path):
    write_project(tmp_path, {**META, "max_requests_per_batch": 50})
    s = settings_for(tmp_path)
    load_staging(s, "SELECT 'k' || i AS id, 'prompt ' || i AS prompt FROM range(2329) t(i)")
    plans, _ = bridge.plan(s, bridge.load_jobs(s))
    sizes = [c.requests for c in plans[0].chunks]
    assert sum(sizes) == 2329 and max(sizes) <= 50
    assert len(sizes) <= math.ceil(2329 / 50) + 3, len(sizes)
    assert min(sizes[:-1]) >= 50 - 3  # every batch but the last holds the cap, give or take a few
    # Consecutive batches can be created together: their counts differ within each run of four.
    assert all(len(set(sizes[i:i + 4])) == len(sizes[i:i + 4]) for i in range(0, len(sizes) - 4, 4))


# --- a create rejected for good ----------------------------------------------------------------------


def test_a_create_rejected_for_good_records_its_rows_and_the_others_go_on(tmp_path, emulator):
    write_project(tmp_path, {**META, "max_requests_per_batch": 10})
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, STAGING)
    env = {"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL":
           emulator.base_url, "DBT_PROJECT_DIR": str(s.project_dir), "DBT_PROFILES_DIR": str(s.profiles_dir),
           "BATCH_BRIDGE_LOCK_TIMEOUT": "2"}
    emulator.set_faults(http_errors=[400], http_error_endpoints=("create",))
    r = CliRunner().invoke(cli, ["submit", "--json"], env=env, catch_exceptions=False)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert len(out["batches"]) == 2 and len(out["rejected"]) == 1
    (message,) = out["rejected"].values()
    assert "invalid_request_error" in message and "rejected" in r.stderr and "create_rejected" in r.stderr

    r = CliRunner().invoke(cli, ["status", "--json"], env=env, catch_exceptions=False)
    job = json.loads(r.stdout)["jobs"][0]
    refused = job["not_sent"]["create_rejected"]
    assert refused["rows"] in (5, 10) and message in refused["details"][0]
    with state.connect(s) as con:
        assert con.execute("SELECT count(*) FROM bb_state.submissions WHERE state = 'abandoned'").fetchone()[0] == 1

    # Exit 1 for that run only: the next one sends nothing more and succeeds; the rows stay recorded.
    r = CliRunner().invoke(cli, ["run", "--json", "--poll-interval", "0.05", "--timeout", "60"], env=env,
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["submitted"] == [] and emulator.counters()["batches_created"] == 2
    r = CliRunner().invoke(cli, ["plan", "--json"], env=env, catch_exceptions=False)
    plan = json.loads(r.stdout)["jobs"][0]
    assert plan["rows_to_send"] == 0 and plan["skipped"]["create_rejected"]["rows"] == refused["rows"]

    # Changing the job (its batch cap here) makes them sendable again.
    write_project(tmp_path, {**META, "max_requests_per_batch": 20})
    r = CliRunner().invoke(cli, ["run", "--json", "--poll-interval", "0.05", "--timeout", "60"], env=env,
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert_answered_once(s)


# --- retry headers -------------------------------------------------------------------------------------


def test_retry_after_in_every_form_the_api_sends():
    now = 1_800_000_000.0
    assert api.retry_after({"retry-after-ms": "2500"}) == 2.5
    assert api.retry_after({"retry-after-ms": "2500", "retry-after": "9"}) == 2.5  # ms first, as the SDK
    assert api.retry_after({"retry-after": "7"}) == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert api.retry_after({"retry-after": date}, now=lambda: now) == 30.0
    assert api.retry_after({"retry-after": "soon"}) is None and api.retry_after({}) is None


@pytest.mark.parametrize("form", ["ms", "http-date", "seconds"])
def test_create_429_honours_retry_after_in_each_form(proj, emulator, form):
    emulator.set_faults(http_errors=[429], http_error_endpoints=("create",), retry_after=5,
                        retry_after_format=form)
    sleeps = Sleeps()
    jobs, client = jobs_client(proj)
    report = bridge.submit(proj, jobs, client, sleep=sleeps)
    assert len(report.batches) == 1
    assert len(sleeps) == 1 and 4 <= sleeps[0] <= 5, sleeps  # an HTTP date has whole seconds


# --- account errors ----------------------------------------------------------------------------------


def test_a_billing_error_on_create_stops_and_the_rows_stay_sendable(proj, emulator):
    emulator.set_faults(http_errors=[402], http_error_endpoints=("create",))
    jobs, client = jobs_client(proj)
    with pytest.raises(ApiAccountError) as e:
        bridge.submit(proj, jobs, client, sleep=Sleeps())
    assert "billing" in str(e.value) and "console" in str(e.value)
    assert emulator.counters()["batches_created"] == 0
    bridge.run(proj, jobs, client, timeout=60)  # the account is fixed: the journalled file goes
    assert emulator.counters()["batches_created"] == 1
    assert_answered_once(proj)


@pytest.mark.parametrize("error_type", ["billing_error", "permission_error", "not_found_error"])
def test_account_errors_in_results_stop_and_leave_the_rows_sendable(proj, emulator, error_type):
    emulator.set_faults(errored_fraction=1.0, errored_types=(error_type,))
    jobs, client = jobs_client(proj)
    with pytest.raises(ApiAccountError) as e:
        bridge.run(proj, jobs, client, timeout=60)
    assert error_type in str(e.value) and "stay sendable" in str(e.value)
    plans, _ = bridge.plan(proj, jobs)
    assert plans[0].send_keys == ROWS and plans[0].rejected == {}  # not invalid, no attempt counted
    emulator.clear_faults()
    bridge.run(proj, jobs, client, timeout=60)
    assert_answered_once(proj)


# --- the emulator's unkind knobs, seen through the SDK ------------------------------------------------


def test_emulator_propagation_delay_hides_a_new_batch_from_list_and_retrieve(emulator, client):
    emulator.set_faults(propagation_seconds=30)
    b = client.messages.batches.create(requests=[{"custom_id": "a", "params": {
        "model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}])
    assert [x.id for x in client.messages.batches.list()] == []
    with pytest.raises(Exception) as e:
        client.with_options(max_retries=0).messages.batches.retrieve(b.id)
    assert "404" in str(e.value) or "not_found" in str(e.value)
    emulator.set_faults(propagation_seconds=0)
    assert [x.id for x in client.messages.batches.list()] == [b.id]


def test_emulator_queue_limit_refuses_creates_beyond_it(emulator, client):
    emulator.configure(queue_limit_requests=3, latency=3600, queue_retry_after=42)
    req = lambda i: {"custom_id": f"c{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]}}
    client.messages.batches.create(requests=[req(0), req(1)])
    import anthropic
    with pytest.raises(anthropic.RateLimitError) as e:
        client.with_options(max_retries=0).messages.batches.create(requests=[req(2), req(3)])
    assert e.value.response.headers["retry-after"] == "42"
    assert len(list(client.messages.batches.list())) == 1
