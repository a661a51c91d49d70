"""The bridge inside a plain `dbt build` (batch_bridge.dbt_plugin), against the emulator.

Real dbt invocations (dbtRunner in this process, or the dbt CLI in a subprocess where it must be
killed), a real warehouse file that dbt holds while the plugin works, the SDK over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from click.testing import CliRunner

import batch_bridge
from batch_bridge import state
from batch_bridge.cli import cli
from batch_bridge.config import resolve
from batch_bridge.dbt_runner import release_duckdb_handles
from helpers import wait_ended

JOB = "items"
MACROS = Path(batch_bridge.__file__).parent / "dbt_package" / "macros"
META = {"job": JOB, "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt"}


def write_plugin_project(root: Path, meta: dict[str, Any] = META) -> None:
    """A project run only through dbt: rows -> a staging view declaring the job -> a mart joining the
    answers from the plugin's results source (with tests on the source, resolved by other threads)."""
    project = root / "dbt_project"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "bb_plugin", "version": "1.0.0", "config-version": 2, "profile": "bb_plugin",
        "model-paths": ["models"], "macro-paths": [str(MACROS)],
        "models": {"+post-hook": [{"sql": "{{ batch_bridge_submit() }}", "transaction": False}]},
    }))
    m = project / "models"
    (m / "rows.sql").write_text(
        "{{ config(materialized='table') }}\n"
        "select i as id, 'text number ' || i as prompt from range({{ var('rows', 12) }}) t(i)\n")
    (m / "stg_items.sql").write_text("{{ config(materialized='view') }}\nselect * from {{ ref('rows') }}\n")
    (m / "mart.sql").write_text(
        "{{ config(materialized='table') }}\n"
        "select s.id, r.status, r.output_text, r.cost_usd from {{ ref('stg_items') }} s\n"
        "left join {{ source('batch_bridge', 'items') }} r on r.id = s.id\n")
    (m / "schema.yml").write_text(yaml.safe_dump({
        "version": 2,
        "models": [{"name": "stg_items", "config": {"meta": {"batch_bridge": meta}}}],
        "sources": [{"name": "batch_bridge", "tables": [{
            "name": JOB, "config": {"meta": {"plugin": "batch_bridge"}},
            "columns": [{"name": "id", "data_tests": ["not_null", "unique"]},
                        {"name": "status", "data_tests": ["not_null"]}],
        }]}],
    }, sort_keys=False))
    (root / "profiles").mkdir()
    (root / "profiles" / "profiles.yml").write_text(yaml.safe_dump({"bb_plugin": {"target": "plugin", "outputs": {
        "plugin": {"type": "duckdb", "path": "{{ env_var('BATCH_BRIDGE_WAREHOUSE') }}", "threads": 4,
                   "plugins": [{"module": "batch_bridge.dbt_plugin", "alias": "batch_bridge"}]},
    }}}))


@pytest.fixture
def proj(tmp_path, emulator, monkeypatch):
    write_plugin_project(tmp_path)
    env = {
        "BATCH_BRIDGE_WAREHOUSE": str(tmp_path / "warehouse.duckdb"), "BATCH_BRIDGE_HOME": str(tmp_path / "bb_home"),
        "ANTHROPIC_API_KEY": "sk-test-plugin", "ANTHROPIC_BASE_URL": emulator.base_url,
        "BATCH_BRIDGE_LOCK_TIMEOUT": "10", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BATCH_BRIDGE_FAULT", raising=False)
    return tmp_path, env


def dbt(root: Path, *args: str) -> Any:
    """One in-process dbt invocation; the warehouse handle is released after it, as a dbt CLI run would."""
    from dbt.cli.main import dbtRunner

    try:
        return dbtRunner().invoke([*args, "--project-dir", str(root / "dbt_project"),
                                   "--profiles-dir", str(root / "profiles")])
    finally:
        release_duckdb_handles()


def statuses(res: Any) -> dict[str, tuple[str, str]]:
    return {r.node.name: (str(r.status), r.message or "") for r in res.result}


def warehouse(root: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def settings(root: Path, env: dict[str, str]):
    return resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", env=env)


def state_rows(root: Path, env: dict[str, str], sql: str) -> list[tuple]:
    with state.connect(settings(root, env)) as con:
        return con.execute(sql).fetchall()


def wait_all_ended(client: Any) -> None:
    for b in client.messages.batches.list(limit=100):
        wait_ended(client, b.id)


def test_two_builds_enrich_every_row_and_a_third_sends_nothing(proj, emulator, client):
    root, env = proj
    emulator.configure(latency=600)  # the batch stays in progress until the test lets it end
    first = dbt(root, "build")
    assert first.success, statuses(first)
    c = emulator.counters()
    assert (c["batches_created"], c["requests_created"]) == (1, 12)
    # Submitted in the build, without waiting: the mart ran with no answers yet (typed, empty source).
    assert warehouse(root, "select count(*), count(status) from mart") == [(12, 0)]
    assert warehouse(root, "select data_type from duckdb_columns() where table_name = 'items' "
                           "and column_name = 'id'") == [("BIGINT",)]
    # The CLI sees what the plugin sent.
    out = CliRunner().invoke(cli, ["status", "--json", "--project-dir", str(root / "dbt_project"),
                                   "--profiles-dir", str(root / "profiles")], env=env, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [b["job"] for b in data["batches"]] == [JOB] and data["jobs"][0]["rows"]["in_flight"] == 12

    emulator.configure(latency=0)
    wait_all_ended(client)
    second = dbt(root, "build")
    assert second.success, statuses(second)
    assert warehouse(root, "select count(*), count(*) filter (where status = 'succeeded'), count(output_text) "
                           "from mart") == [(12, 12, 12)]
    answers = warehouse(root, "select * from mart order by id")
    assert emulator.counters()["batches_created"] == 1

    posts = emulator.counters()["create_posts"]
    third = dbt(root, "build")
    assert third.success, statuses(third)
    assert emulator.counters()["create_posts"] == posts
    assert warehouse(root, "select * from mart order by id") == answers
    dup = state_rows(root, env, "SELECT input_hash FROM bb_state.responses GROUP BY ALL HAVING count(*) > 1")
    assert dup == []


def test_only_a_run_that_builds_the_staging_model_submits(proj, emulator, client):
    root, env = proj
    assert dbt(root, "build").success
    wait_all_ended(client)
    # Five new rows reach the staging view, but the build does not run the staging model: nothing sent.
    res = dbt(root, "build", "--select", "rows", "mart", "--vars", "rows: 17")
    assert res.success, statuses(res)
    assert "stg_items" not in statuses(res)
    c = emulator.counters()
    assert (c["batches_created"], c["requests_created"]) == (1, 12)
    assert warehouse(root, "select count(*), count(status) from mart") == [(17, 12)]
    # `dbt run` of the staging model alone sends just the five.
    res = dbt(root, "run", "--select", "stg_items", "--vars", "rows: 17")
    assert res.success, statuses(res)
    c = emulator.counters()
    assert (c["batches_created"], c["requests_created"]) == (2, 17)
    # The CLI works on what the plugin sent: `run` waits for the batch and collects it, dbt shows it.
    out = CliRunner().invoke(cli, ["run", "--json", "--timeout", "60", "--project-dir", str(root / "dbt_project"),
                                   "--profiles-dir", str(root / "profiles")],
                             env={**env, "BATCH_BRIDGE_POLL_INTERVAL": "0.05"}, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    res = dbt(root, "build", "--select", "mart", "--vars", "rows: 17")
    assert res.success, statuses(res)
    assert warehouse(root, "select count(*), count(*) filter (where status = 'succeeded') from mart") == [(17, 17)]
    assert emulator.counters()["batches_created"] == 2


def test_over_budget_fails_the_staging_node_naming_the_job_and_sends_nothing(tmp_path, emulator, monkeypatch):
    write_plugin_project(tmp_path, {**META, "budget_usd": 0.000001})
    monkeypatch.setenv("BATCH_BRIDGE_WAREHOUSE", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-plugin")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    res = dbt(tmp_path, "build")
    assert not res.success
    st = statuses(res)
    assert st["stg_items"][0] == "error"
    assert "job 'items': estimated cost $" in st["stg_items"][1]
    assert "exceeds meta.batch_bridge.budget_usd of job 'items' = $0.000001; nothing was sent" in st["stg_items"][1]
    assert st["mart"][0] == "skipped"
    assert emulator.counters()["create_posts"] == 0
    assert not list((tmp_path / ".batch_bridge" / "requests").glob("*.jsonl"))


def test_sigkill_of_dbt_during_submission_then_builds_pay_nothing_twice(proj, emulator, client):
    root, env = proj
    sub_env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
    sub_env.update(env, BATCH_BRIDGE_FAULT="after_create")  # the batch exists, its id is not yet recorded
    dbt_cli = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", "build",
               "--project-dir", str(root / "dbt_project"), "--profiles-dir", str(root / "profiles")]
    r = subprocess.run(dbt_cli, env=sub_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    assert emulator.counters()["batches_created"] == 1
    assert state_rows(root, env, "SELECT state FROM bb_state.submissions") == [("creating",)]

    res = dbt(root, "build")  # the orphan is found with `list` and adopted, not created again
    assert res.success, statuses(res)
    wait_all_ended(client)
    res = dbt(root, "build")
    assert res.success, statuses(res)
    assert warehouse(root, "select count(*), count(*) filter (where status = 'succeeded') from mart") == [(12, 12)]
    c = emulator.counters()
    assert (c["batches_created"], c["requests_created"]) == (1, 12)
    answered = state_rows(root, env, "SELECT count(*), count(DISTINCT input_hash) FROM bb_state.responses")
    assert answered == [(12, 12)]


def test_a_job_error_fails_the_staging_node_with_the_clis_message(tmp_path, emulator, monkeypatch):
    write_plugin_project(tmp_path, {**META, "prompt_column": "body"})
    monkeypatch.setenv("BATCH_BRIDGE_WAREHOUSE", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-plugin")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    res = dbt(tmp_path, "build", "--select", "rows", "stg_items")
    st = statuses(res)
    assert not res.success and st["stg_items"][0] == "error"
    # The columns are checked on dbt's connection, as the CLI checks them on the attached warehouse.
    assert ("batch_bridge: job 'items': meta.batch_bridge.prompt_column = 'body' is not valid; "
            "allowed: columns of stg_items: id, prompt") in st["stg_items"][1]
    assert emulator.counters()["create_posts"] == 0
