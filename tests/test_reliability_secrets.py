"""Secrets and files: the API key never reaches a file or an output; archives are the owner's only and
are removed by `purge` after the retention, never while their batch is in flight."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from batch_bridge import api, bridge, state
from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.errors import ConfigError
from batch_bridge.purge import purge
from helpers import current, load_staging, settings_for, write_project

KEY = "sk-ant-test-SECRET-1234567890"
WRONG = "sk-ant-test-WRONGKEY-0987654321"
META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                          "additionalProperties": False}}


def rows_sql(n: int, offset: int = 0) -> str:
    return f"SELECT 'r' || (i + {offset}) AS id, 'text ' || (i + {offset}) AS prompt FROM range({n}) t(i)"


def cli(s, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
    env.update({"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": key,
                "ANTHROPIC_BASE_URL": s.base_url, "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
                "BATCH_BRIDGE_LOCK_TIMEOUT": "10", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"})
    return subprocess.run(
        [sys.executable, "-m", "batch_bridge.cli", *args, "--project-dir", str(s.project_dir),
         "--profiles-dir", str(s.profiles_dir)], env=env, capture_output=True, text=True, timeout=120)


def texts_in(path: Path) -> list[str]:
    """What a file holds as text: its bytes, and for DuckDB/Parquet files every value, decompressed."""
    out = [path.read_bytes().decode("utf-8", "replace")]
    if path.suffix in (".parquet", ".duckdb"):
        con = duckdb.connect()
        try:
            if path.suffix == ".parquet":
                tables = [f"read_parquet('{path}')"]
            else:
                con.execute(f"ATTACH '{path}' AS f (READ_ONLY)")
                tables = [f'f."{sch}"."{t}"' for sch, t in con.execute(
                    "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'f'").fetchall()]
            for t in tables:
                out += [str(r) for r in con.execute(f"SELECT * FROM {t}").fetchall()]
        finally:
            con.close()
    return out


def test_the_api_key_appears_in_no_file_output_or_error(tmp_path):
    with run_emulator(EmulatorConfig(latency=0, api_key=KEY)) as emu:
        write_project(tmp_path, META)
        s = settings_for(tmp_path, emu.base_url, api_key=KEY)
        load_staging(s, rows_sql(8))
        bridge.load_jobs(s)  # dbt parse once, here; the subprocesses reuse the manifest
        outputs = []

        def ok(key: str, *args: str) -> None:
            r = cli(s, key, *args)
            outputs.append(r)
            assert r.returncode == 0, r.stderr

        ok(KEY, "plan", "--json")
        ok(KEY, "run", "--json")
        ok(KEY, "status", "--json")
        assert len(current(s, "items")) == 8

        # Error paths: a wrong key, then the right key refused by the server; neither is echoed.
        load_staging(s, rows_sql(12))
        r = cli(s, WRONG, "submit", "--json")
        outputs.append(r)
        assert r.returncode == 1 and "rejected the key" in r.stderr and WRONG not in r.stderr + r.stdout
        emu.configure(api_key="sk-ant-some-other-account")

        def refused(*args: str) -> None:
            r = cli(s, KEY, *args)
            outputs.append(r)
            assert r.returncode == 1 and "401 authentication_error" in r.stderr, r.stderr

        refused("submit", "--json")  # on create
        emu.configure(api_key=KEY)
        ok(KEY, "submit", "--json")  # a refused create left nothing to reconcile: it is sent at once
        emu.configure(api_key="sk-ant-some-other-account")
        refused("collect", "--json")  # on retrieve
        refused("wait", "--json")
        emu.configure(api_key=KEY)
        ok(KEY, "run", "--json")
        assert len(current(s, "items")) == 12
        assert emu.counters()["auth_failures"] >= 4

    for r in outputs:
        assert KEY not in r.stdout and KEY not in r.stderr
        assert WRONG not in r.stdout and WRONG not in r.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".duckdb", ".parquet", ".jsonl", ".json", ".log"} <= kinds, kinds  # state, results, archives, dbt
    for p in files:
        for text in texts_in(p):
            assert KEY not in text and WRONG not in text, p


def test_archives_are_owner_only(tmp_path, emulator):
    write_project(tmp_path, META)
    s = settings_for(tmp_path, emulator.base_url)
    load_staging(s, rows_sql(5))
    bridge.run(s, bridge.load_jobs(s), api.build_client(s), timeout=30)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(s.home) == 0o700
    archives = [*s.requests_dir.glob("*.jsonl"), *s.raw_results_dir.glob("*.jsonl"),
                *(p for p in s.results_dir("items").rglob("*.parquet") if p.is_file()), s.state_path]
    # current.parquet/'s one bucket file, rejected, history/_schema, history/<batch>
    assert len(archives) == 1 + 1 + 4 + 1
    assert {p.name: mode(p) for p in archives} == {p.name: 0o600 for p in archives}
    # A .part left by a killed download with loose permissions is tightened when written again.
    part = s.raw_results_dir / "msgbatch_x.jsonl.part"
    part.write_text("partial")
    part.chmod(0o644)
    info = api.retrieve(api.build_client(s), api.build_client(s).messages.batches.list().data[0].id)
    api.download_results(api.build_client(s), info, s.raw_results_dir / "msgbatch_x.jsonl")
    assert mode(s.raw_results_dir / "msgbatch_x.jsonl") == 0o600


def test_purge_removes_old_archives_of_finished_batches_only(tmp_path, emulator):
    write_project(tmp_path, META)
    s = settings_for(tmp_path, emulator.base_url)
    client = api.build_client(s)
    load_staging(s, rows_sql(6))
    bridge.run(s, bridge.load_jobs(s), client, timeout=30)  # batch 1: collected
    load_staging(s, rows_sql(9))
    sub = bridge.submit(s, bridge.load_jobs(s), client)  # batch 2: in flight
    orphan = s.requests_dir / "20000101T000000Z_items_000_dead00.jsonl"  # a run killed before its journal
    orphan.write_text("{}\n")
    recent = s.requests_dir / "20990101T000000Z_items_000_new000.jsonl"  # another orphan, but young
    recent.write_text("{}\n")
    old = time.time() - 40 * 86400
    for p in [*s.requests_dir.iterdir(), *s.raw_results_dir.iterdir()]:
        if p != recent:
            os.utime(p, (old, old))
    with state.connect(s) as con:
        done_req, done_raw = con.execute(
            "SELECT su.request_file, b.result_file FROM bb_state.batches b JOIN bb_state.submissions su "
            "USING (submission_id) WHERE b.local_state = 'collected'").fetchone()
        flying_req = con.execute("SELECT request_file FROM bb_state.submissions WHERE batch_id = ?",
                                 [sub.batches[0]]).fetchone()[0]
    expected = sorted([done_req, done_raw, str(orphan)])

    with pytest.raises(ConfigError, match="BATCH_BRIDGE_RETENTION_DAYS"):
        purge(s)
    dry = purge(s, older_than_days=30, dry_run=True)
    assert sorted(dry.removed) == expected and dry.kept_in_flight == 1 and dry.kept_recent == 1
    assert all(Path(p).exists() for p in expected)
    assert not purge(s, older_than_days=45).removed  # younger than 45 days: kept

    s30 = settings_for(tmp_path, emulator.base_url, BATCH_BRIDGE_RETENTION_DAYS="30")
    report = purge(s30)
    assert sorted(report.removed) == expected and report.bytes > 0
    assert not any(Path(p).exists() for p in expected)
    assert Path(flying_req).exists() and recent.exists()
    with state.connect(s) as con:
        notes = con.execute("SELECT note FROM bb_state.batches WHERE local_state = 'collected'").fetchone()[0]
        sub_note = con.execute("SELECT note FROM bb_state.submissions WHERE request_file = ?", [done_req]).fetchone()[0]
    assert "result file purged" in notes and "request file purged" in sub_note
    # The in-flight batch is untouched: it is still collected, and results stay whole.
    bridge.run(s, bridge.load_jobs(s), client, timeout=30)
    rows = current(s, "items")
    assert len(rows) == 9 and {r["status"] for r in rows} == {"succeeded"}
    # Once collected, the formerly in-flight (and old) request file goes too; its fresh result file stays.
    assert purge(s30).removed == [flying_req]
