"""Crashes: the bridge killed with SIGKILL at every named step of submit and collect, then run again.

The bridge runs as a subprocess (`python -m batch_bridge.cli`) that kills itself at the crash point
named by BATCH_BRIDGE_FAULT; the emulator lives in the pytest process and outlives it. After the rerun
the state must have converged: one batch per chunk of rows (an orphan is adopted, never re-created),
every row answered exactly once, no response loaded twice, and a further run sends nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from batch_bridge import api, bridge, state
from helpers import current, load_staging, reset_home, settings_for, write_project

ROWS = 25
CHUNK = 10  # 25 rows -> batches of 10, 10 and 5: two share a request count (the adoption hazard)
BATCHES = 3
META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50,
        "prompt_column": "prompt", "max_requests_per_batch": CHUNK}
SUBMIT_POINTS = ["before_prepare_commit", "after_prepare", "before_journal", "before_create", "after_create"]
COLLECT_POINTS = ["during_download", "after_download", "during_load", "after_load"]


@pytest.fixture(scope="module")
def project_root(tmp_path_factory):
    """One dbt project parsed once; each test starts from an empty bridge home (the parse is kept)."""
    root = tmp_path_factory.mktemp("crash")
    write_project(root, META)
    s = settings_for(root)
    load_staging(s, f"SELECT 'r' || lpad(i::VARCHAR, 3, '0') AS id, 'text number ' || i AS prompt FROM range({ROWS}) t(i)")
    bridge.load_jobs(s)  # dbt parse into the bridge's own target, reused by every subprocess
    return root


@pytest.fixture
def proj(project_root, emulator, monkeypatch):
    s = settings_for(project_root, emulator.base_url)
    reset_home(s)
    monkeypatch.delenv(bridge.ENV_FAULT, raising=False)
    return s


def cli_env(s, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
    env.update({
        "BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": s.api_key or "",
        "ANTHROPIC_BASE_URL": s.base_url or "", "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
        "BATCH_BRIDGE_LOCK_TIMEOUT": "10", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", **extra,
    })
    return env


def cli_args(s, command: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "batch_bridge.cli", command, "--project-dir", str(s.project_dir),
            "--profiles-dir", str(s.profiles_dir), *more]


def cli(s, command: str, *more: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(s, command, *more), env=cli_env(s, **env), capture_output=True, text=True,
                          timeout=120)


def crash(s, command: str, point: str, emulator=None) -> None:
    r = cli(s, command, BATCH_BRIDGE_FAULT=point)
    assert r.returncode == -signal.SIGKILL, f"{point}: expected SIGKILL, got {r.returncode}\n{r.stderr}"
    if emulator is not None:
        settle(emulator)


def settle(emulator, timeout: float = 10.0) -> None:
    """Wait until no create is in flight on the emulator: a sibling create the killed process had fully
    sent is still being stored when the kill returns (CI once read the counter in that window)."""
    deadline = time.monotonic() + timeout
    while emulator.counters()["creates_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert emulator.counters()["creates_in_flight"] == 0, "a create is still in flight after 10 s"


def rerun(s):
    jobs = bridge.load_jobs(s)
    return bridge.run(s, jobs, api.build_client(s), timeout=60)


def state_rows(s, sql: str) -> list[tuple]:
    with state.connect(s) as con:
        return con.execute(sql).fetchall()


def assert_converged(s, emulator) -> None:
    """One batch per chunk, all recorded; one succeeded answer per row; nothing loaded twice."""
    c = emulator.counters()
    assert c["batches_created"] == BATCHES, c
    assert c["requests_created"] == ROWS, c
    remote = {b.id for b in api.build_client(s).messages.batches.list(limit=100)}
    local = {r[0] for r in state_rows(s, "SELECT batch_id FROM bb_state.batches")}
    assert remote == local, "every batch on the API is known locally (orphans adopted)"
    assert state_rows(s, "SELECT DISTINCT local_state FROM bb_state.batches") == [("collected",)]
    dup = state_rows(s, "SELECT batch_id, request_custom_id FROM bb_state.responses GROUP BY ALL HAVING count(*) > 1")
    assert dup == []
    assert state_rows(s, "SELECT count(*) FROM bb_state.responses") == [(ROWS,)]
    rows = current(s, "items")
    assert len(rows) == ROWS == len({r["id"] for r in rows})
    assert {r["status"] for r in rows} == {"succeeded"}
    parts = {p.stem for p in (s.results_dir("items") / "history").glob("*.parquet")} - {"_schema"}
    assert parts == local, "one history part per collected batch, also after a crash"
    # Every loaded answer is folded into the per-input summaries, exactly once.
    assert state_rows(s, "SELECT count(*) FROM bb_state.unfolded_batches") == [(0,)]
    assert sorted(state_rows(s, "SELECT * FROM bb_state.input_outcomes")) == sorted(
        state_rows(s, state.outcomes_select("true")))
    # Converged for good: another run sends nothing and changes nothing.
    before = emulator.counters()["create_posts"]
    sub, _ = rerun(s)
    assert sub.batches == [] and emulator.counters()["create_posts"] == before
    assert current(s, "items") == rows


@pytest.mark.parametrize("point", SUBMIT_POINTS)
def test_kill_during_submit_then_rerun_converges(proj, emulator, point):
    crash(proj, "submit", point, emulator)
    if point == "after_create":  # the batch exists on the API; its id was never recorded
        assert emulator.counters()["batches_created"] >= 1
        assert state_rows(proj, "SELECT count(*) FROM bb_state.submissions WHERE state = 'creating'")[0][0] >= 1
    sub, w = rerun(proj.with_(reconcile_grace=0))  # a create that never happened is resent at once
    if point == "after_create":
        assert sub.adopted, "the orphaned batch is found with list and adopted"
    assert w.collected == {"items": ROWS}
    assert_converged(proj, emulator)


def test_kill_after_create_is_adopted_not_recreated_even_within_the_grace(proj, emulator):
    crash(proj, "submit", "after_create", emulator)
    r = cli(proj, "submit", "--json")  # default 60 s grace: adoption does not need to wait
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["adopted"] and set(out["adopted"]) <= set(out["batches"])
    # Every batch the killed run created is adopted; none is created a second time. A sibling killed
    # before its POST arrived stays `creating` until the grace is over (the next test's path). The
    # emulator's counter is not read right after the kill: a sibling POST the killed process had fully
    # sent is still being stored by the emulator then (the race CI once hit); the list is the truth.
    remote = {b.id for b in api.build_client(proj).messages.batches.list(limit=100)}
    assert set(out["batches"]) <= remote and len(remote) <= BATCHES, (out, remote)
    # A submission of the same count as an undecided one waits for it (never two in the create window).
    assert len(out["batches"]) + len(out["pending_reconciliation"]) + len(out["held_for_same_count"]) == BATCHES
    notes = state_rows(proj, "SELECT note FROM bb_state.submissions WHERE note LIKE 'adopted%'")
    assert notes and all("interrupted create" in n[0] for n in notes)
    assert cli(proj, "submit", BATCH_BRIDGE_RECONCILE_GRACE="0").returncode == 0
    rerun(proj)
    assert_converged(proj, emulator)


def test_kill_before_create_waits_out_the_grace_then_sends_once(proj, emulator):
    crash(proj, "submit", "before_create", emulator)
    assert emulator.counters()["batches_created"] < BATCHES
    # Within the grace the bridge cannot know the create never arrived: it looks, sends nothing for it.
    r = cli(proj, "submit", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["pending_reconciliation"], out
    creating = state_rows(proj, "SELECT count(*) FROM bb_state.submissions WHERE state = 'creating'")[0][0]
    assert creating == len(out["pending_reconciliation"])
    # Once the grace is over (0 here) it is certainly absent and the same file is sent, once.
    r = cli(proj, "submit", "--json", BATCH_BRIDGE_RECONCILE_GRACE="0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pending_reconciliation"] == []
    assert emulator.counters()["batches_created"] == BATCHES
    rerun(proj)
    assert_converged(proj, emulator)


@pytest.mark.parametrize("point", COLLECT_POINTS)
def test_kill_during_collect_then_rerun_loads_exactly_once(proj, emulator, point):
    jobs = bridge.load_jobs(proj)
    client = api.build_client(proj)
    bridge.submit(proj, jobs, client)
    bridge.wait(proj, jobs, client, timeout=30)  # ended, not collected
    crash(proj, "collect", point)
    loaded = state_rows(proj, "SELECT count(*) FROM bb_state.responses")[0][0]
    # Each batch loads in its own transaction: killed after the first commit, exactly that batch is in.
    collected = state_rows(proj, "SELECT coalesce(sum(result_lines), 0) FROM bb_state.batches WHERE local_state = 'collected'")[0][0]
    assert loaded == collected
    assert (0 < loaded < ROWS) if point == "after_load" else loaded == 0, (point, loaded)
    if point == "during_download":
        assert list(proj.raw_results_dir.glob("*.part")), "killed with a partial download on disk"
    report = bridge.collect(proj, jobs, client)
    assert report.lost == [] and sum(report.loaded.values()) == ROWS - loaded
    assert not list(proj.raw_results_dir.glob("*.part"))
    assert_converged(proj, emulator)


def test_killed_before_the_fold_status_and_plan_fold_first_and_count_the_answers(proj, emulator):
    """A collect killed after a batch's load leaves its answers owed to the per-input summaries (the
    fold runs for many batches at once); `status` and `plan` fold them before reading, so the rows
    count as answered and are not sent again."""
    jobs = bridge.load_jobs(proj)
    client = api.build_client(proj)
    bridge.submit(proj, jobs, client)
    bridge.wait(proj, jobs, client, timeout=30)
    created = emulator.counters()["requests_created"]

    def owed() -> int:
        return state_rows(proj, "SELECT coalesce(sum(answers), 0) FROM bb_state.unfolded_batches")[0][0]

    crash(proj, "collect", "after_load")
    first = state_rows(proj, "SELECT count(*) FROM bb_state.responses")[0][0]
    assert 0 < first < ROWS and owed() == first
    assert state_rows(proj, "SELECT count(*) FROM bb_state.input_outcomes") == [(0,)]
    r = cli(proj, "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["jobs"][0]["rows"]["succeeded"] == first
    assert owed() == 0

    crash(proj, "collect", "after_load")  # the next batch, killed before its fold
    second = state_rows(proj, "SELECT count(*) FROM bb_state.responses")[0][0]
    assert first < second < ROWS and owed() == second - first
    plans, _ = bridge.plan(proj, jobs)
    assert (plans[0].send_keys, owed()) == (0, 0)
    assert state_rows(proj, "SELECT count(*) FROM bb_state.key_inputs WHERE answered") == [(second,)]
    rerun(proj)
    assert emulator.counters()["requests_created"] == created
    assert_converged(proj, emulator)


def test_kill_between_slices_of_a_batch_then_rerun_resumes_at_the_next_slice(proj, emulator):
    """A batch loads in slices, each committed with the position after it: killed after a slice, the
    rerun loads the rest of that batch from the next slice, no line twice and none lost."""
    jobs = bridge.load_jobs(proj)
    client = api.build_client(proj)
    bridge.submit(proj, jobs, client)
    bridge.wait(proj, jobs, client, timeout=30)
    small = "600"  # bytes: each slice is one or two result lines
    crash_env = {"BATCH_BRIDGE_FAULT": "between_slices", "BATCH_BRIDGE_LOAD_SLICE_BYTES": small}
    r = cli(proj, "collect", **crash_env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    loaded = state_rows(proj, "SELECT count(*) FROM bb_state.responses")[0][0]
    partial = state_rows(proj, "SELECT batch_id, loaded_lines, result_lines FROM bb_state.batches "
                               "WHERE local_state = 'downloaded' AND loaded_lines > 0")
    assert len(partial) == 1 and 0 < partial[0][1] < partial[0][2] and loaded == partial[0][1], (partial, loaded)
    # Its answers are not yet folded into the per-input outcomes: a batch counts whole or not at all.
    assert state_rows(proj, "SELECT count(*) FROM bb_state.input_outcomes") == [(0,)]
    report = bridge.collect(proj.with_(load_slice_bytes=int(small)), jobs, client)
    assert report.lost == [] and sum(report.loaded.values()) == ROWS - loaded
    assert state_rows(proj, "SELECT count(*) FROM bb_state.input_outcomes") == [(ROWS,)]
    assert_converged(proj, emulator)


def test_two_processes_at_once_only_one_submits(proj, emulator):
    """The loser of the project lock exits 4 with a clear message and sends nothing."""
    # The winner holds the lock for 2 s or more: wide enough that the loser, started at the same time,
    # still finds it held on a loaded CI machine where one interpreter starts a second later.
    emulator.set_faults(slow_create_seconds=2.0)
    env = cli_env(proj, BATCH_BRIDGE_LOCK_TIMEOUT="0.3")
    procs = [subprocess.Popen(cli_args(proj, "submit", "--json"), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 4], results
    loser = next(r for r in results if r[0] == 4)
    assert "another batch-bridge process" in loser[2] and "this one sent nothing" in loser[2]
    assert emulator.counters()["batches_created"] == BATCHES


def test_two_processes_at_once_the_second_waits_and_finds_nothing_to_send(proj, emulator):
    emulator.set_faults(slow_create_seconds=0.5)
    env = cli_env(proj, BATCH_BRIDGE_LOCK_TIMEOUT="60")
    procs = [subprocess.Popen(cli_args(proj, "submit", "--json"), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert sorted(len(o["batches"]) for o in outs) == [0, BATCHES]
    assert emulator.counters()["batches_created"] == BATCHES
    waited = next(o for o in outs if not o["batches"])
    assert waited["jobs"][0]["in_flight_rows"] == ROWS
