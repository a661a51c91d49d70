"""The CLI: every command's help, --json output, and the documented exit codes."""

from __future__ import annotations

import json

import anthropic
import pytest
from click.testing import CliRunner

from batch_bridge.cli import cli
from helpers import current, load_staging, settings_for, wait_ended, write_project

COMMANDS = ["plan", "preview", "submit", "status", "wait", "collect", "sync", "run", "cancel", "pipeline", "emulator",
            "dbt", "purge", "dbt-package-path", "report"]


def meta(**over):
    m = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt"}
    m.update(over)
    return m


@pytest.fixture
def proj(tmp_path, emulator):
    write_project(tmp_path, meta())
    s = settings_for(tmp_path, emulator.base_url)
    env = {
        "BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-test-cli",
        "ANTHROPIC_BASE_URL": emulator.base_url, "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
        "BATCH_BRIDGE_LOCK_TIMEOUT": "2", "DBT_PROJECT_DIR": str(s.project_dir), "DBT_PROFILES_DIR": str(s.profiles_dir),
    }
    load_staging(s, "SELECT 'k' || i AS id, 'text ' || i AS prompt FROM range(20) t(i)")
    return s, env


def invoke(args, env):
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    return result


def test_help_everywhere_lists_exit_codes():
    r = CliRunner().invoke(cli, ["-h"])
    assert r.exit_code == 0
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 "):
        assert f"  {code}" in r.output
    for c in COMMANDS:
        r = CliRunner().invoke(cli, [c, "-h"])
        assert r.exit_code == 0, c
        assert "Usage:" in r.output


def test_plan_json_then_submit_status_collect(proj, emulator):
    s, env = proj
    r = invoke(["plan", "--json"], env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["jobs"][0]["rows_to_send"] == 20 and emulator.counters()["create_posts"] == 0

    r = invoke(["submit", "--json"], env)
    assert r.exit_code == 0, r.output
    sub = json.loads(r.stdout)
    assert len(sub["batches"]) == 1

    r = invoke(["wait", "--json", "--timeout", "30"], env)
    assert r.exit_code == 0, r.output
    r = invoke(["collect", "--json"], env)
    assert json.loads(r.stdout)["loaded"] == {"items": 20}

    r = invoke(["status", "--json"], env)
    st = json.loads(r.stdout)
    assert st["jobs"][0]["rows"]["succeeded"] == 20
    assert st["batches"][0]["processing_status"] == "ended" and st["batches"][0]["local_state"] == "collected"
    assert st["batches"][0]["request_counts"]["succeeded"] == 20
    assert len(current(s, "items")) == 20


def test_sync_and_run_report_json(proj):
    s, env = proj
    r = invoke(["sync", "--json"], env)
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["submitted"]) == 1
    r = invoke(["run", "--json", "--timeout", "30"], env)  # collects what sync sent, sends nothing new
    data = json.loads(r.stdout)
    assert data["submitted"] == [] and data["loaded"] == {}
    assert {row["status"] for row in current(s, "items")} == {"succeeded"}


def test_budget_exceeded_exits_5_and_sends_nothing(proj, emulator):
    s, env = proj
    r = invoke(["submit", "--max-cost", "0.0000001"], env)
    assert r.exit_code == 5
    assert "exceeds --max-cost" in r.stderr and "nothing was sent" in r.stderr
    assert emulator.counters()["create_posts"] == 0
    assert not list(s.requests_dir.glob("*.jsonl")) if s.requests_dir.exists() else True


def test_job_budget_in_yaml_refuses(proj, emulator, tmp_path):
    s, env = proj
    write_project(tmp_path, meta(budget_usd=0.0000001))
    r = invoke(["submit"], env)
    assert r.exit_code == 5 and "budget_usd" in r.stderr
    assert emulator.counters()["create_posts"] == 0


def test_wait_timeout_exits_3(proj, emulator):
    s, env = proj
    emulator.configure(latency=60)
    assert invoke(["submit"], env).exit_code == 0
    r = invoke(["wait", "--timeout", "0.3"], env)
    assert r.exit_code == 3
    assert "still in progress" in r.stderr


def test_typo_in_job_yaml_exits_2_naming_field_and_allowed(proj, tmp_path):
    s, env = proj
    write_project(tmp_path, {**meta(), "promt_template": "x {id}"})
    r = invoke(["plan"], env)
    assert r.exit_code == 2
    assert "promt_template" in r.stderr and "prompt_template" in r.stderr and "allowed" in r.stderr


def test_missing_api_key_is_a_config_error(proj):
    s, env = proj
    env = {**env, "ANTHROPIC_API_KEY": ""}
    r = invoke(["submit"], env)
    assert r.exit_code == 2 and "ANTHROPIC_API_KEY" in r.stderr


def test_unknown_job_name(proj):
    s, env = proj
    r = invoke(["plan", "--job", "itms"], env)
    assert r.exit_code == 2 and "'itms'" in r.stderr and "items" in r.stderr


def test_cancel_marks_rows_for_resend(proj, emulator):
    s, env = proj
    emulator.configure(latency=60)
    invoke(["submit"], env)
    r = invoke(["cancel", "--json"], env)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["canceled"]) == 1
    emulator.configure(latency=0)
    r = invoke(["wait", "--timeout", "30"], env)
    assert r.exit_code == 0, r.output
    invoke(["collect"], env)
    assert {row["status"] for row in current(s, "items")} == {"canceled"}
    plan = json.loads(invoke(["plan", "--json"], env).stdout)
    assert plan["jobs"][0]["rows_to_send"] == 20  # canceled rows go out again


def test_paths_work_from_any_directory(proj, tmp_path, monkeypatch):
    s, env = proj
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    r = invoke(["plan", "--json", "--project-dir", str(s.project_dir), "--profiles-dir", str(s.profiles_dir)],
               {k: v for k, v in env.items() if k not in ("DBT_PROJECT_DIR", "DBT_PROFILES_DIR")})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["jobs"][0]["staged_rows"] == 20


def test_purge_command_removes_finished_archives_only(proj):
    s, env = proj
    assert invoke(["run", "--timeout", "30"], env).exit_code == 0
    archives = list(s.requests_dir.glob("*.jsonl")) + list(s.raw_results_dir.glob("*.jsonl"))
    assert len(archives) == 2
    r = invoke(["purge", "--older-than-days", "0", "--dry-run", "--json"], env)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["removed"]) == 2
    assert all(p.exists() for p in archives)
    r = invoke(["purge", "--older-than-days", "0", "--json"], env)
    assert sorted(json.loads(r.stdout)["removed"]) == sorted(str(p) for p in archives)
    assert not any(p.exists() for p in archives)
    assert len(current(s, "items")) == 20  # the answers themselves are kept
    r = invoke(["purge"], env)  # no retention configured anywhere
    assert r.exit_code == 2 and "BATCH_BRIDGE_RETENTION_DAYS" in r.stderr


def test_duckdb_out_of_memory_is_a_clear_error_naming_the_setting(proj):
    s, env = proj
    r = CliRunner().invoke(cli, ["plan"], env={**env, "BATCH_BRIDGE_MEMORY_LIMIT": "1MB"})
    assert r.exit_code == 1, r.output
    assert "BATCH_BRIDGE_MEMORY_LIMIT=1MB" in r.output and "hint: raise BATCH_BRIDGE_MEMORY_LIMIT" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output and r.output.count("\n") <= 3, r.output  # one error line and a hint
    ok = CliRunner().invoke(cli, ["plan", "--json"], env=env)  # and the default limit plans the same project
    assert ok.exit_code == 0, ok.output


def test_out_of_memory_while_loading_keeps_the_results_for_the_next_collect(proj, emulator):
    """A load that runs out of DuckDB memory is the setting's fault, not the file's: the error names
    the setting, the downloaded file is kept (not discarded as unreadable), and the next collect loads it."""
    s, env = proj
    r = invoke(["submit", "--json"], env)
    assert r.exit_code == 0, r.output
    (batch_id,) = json.loads(r.stdout)["batches"]
    with anthropic.Anthropic(api_key="sk-test-cli", base_url=emulator.base_url) as client:
        wait_ended(client, batch_id)
    # enough for the bookkeeping and the download, too little for DuckDB's 32 MB JSON read buffer
    r = CliRunner().invoke(cli, ["collect"], env={**env, "BATCH_BRIDGE_MEMORY_LIMIT": "16MB"})
    assert r.exit_code == 1, r.output
    assert "BATCH_BRIDGE_MEMORY_LIMIT=16MB" in r.output and "could not be read" not in r.output, r.output
    files = list(s.raw_results_dir.glob("*.jsonl"))
    assert len(files) == 1 and files[0].stat().st_size > 0  # downloaded, kept
    r = invoke(["collect", "--json"], env)
    assert r.exit_code == 0 and json.loads(r.stdout)["loaded"] == {"items": 20}, r.output
    assert len(current(s, "items")) == 20
