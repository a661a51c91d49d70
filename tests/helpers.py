"""Test projects: a real dbt project on disk, a real DuckDB warehouse, settings pointing at an emulator."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb
import yaml

from batch_bridge.config import Settings, resolve

PROFILE = {
    "bb_test": {
        "target": "dev",
        "outputs": {
            "dev": {
                "type": "duckdb",
                "path": "{{ env_var('BATCH_BRIDGE_WAREHOUSE', 'warehouse.duckdb') }}",
                "threads": 2,
            }
        },
    }
}


def write_project(root: Path, meta: dict[str, Any] | None, *, model: str = "stg_items",
                  sql: str = "select 1 as id, 'hello' as prompt", materialized: str = "table") -> Path:
    """A dbt project with one staging model carrying `meta.batch_bridge = meta`. Returns the project dir."""
    project = root / "dbt_project"
    (project / "models").mkdir(parents=True, exist_ok=True)
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "bb_test", "version": "1.0.0", "config-version": 2, "profile": "bb_test",
        "model-paths": ["models"],
    }))
    (project / "models" / f"{model}.sql").write_text(f"{{{{ config(materialized='{materialized}') }}}}\n{sql}\n")
    schema = {"version": 2, "models": [{"name": model, "config": {"meta": {"batch_bridge": meta}} if meta is not None else {}}]}
    (project / "models" / "schema.yml").write_text(yaml.safe_dump(schema, sort_keys=False))
    (root / "profiles").mkdir(exist_ok=True)
    (root / "profiles" / "profiles.yml").write_text(yaml.safe_dump(PROFILE))
    return project


def settings_for(root: Path, base_url: str | None = None, api_key: str = "sk-test-key", **env: str) -> Settings:
    environ = {
        "BATCH_BRIDGE_WAREHOUSE": str(root / "warehouse.duckdb"),
        "ANTHROPIC_API_KEY": api_key,
        "BATCH_BRIDGE_LOCK_TIMEOUT": "5",
        "BATCH_BRIDGE_POLL_INTERVAL": "0.05",
        **env,
    }
    if base_url:
        environ["ANTHROPIC_BASE_URL"] = base_url
    return resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", env=environ)


def load_staging(settings: Settings, sql: str, table: str = "stg_items") -> None:
    """Create the staging table directly in the warehouse file (what `dbt build` of the model would do)."""
    con = duckdb.connect(str(settings.warehouse))
    try:
        con.execute(f'CREATE OR REPLACE TABLE main."{table}" AS {sql}')
    finally:
        con.close()


def reset_home(settings: Settings) -> None:
    """Forget the bridge's state and files but keep its dbt parse (shared by a module's tests)."""
    for p in settings.home.iterdir():
        if p.name != "dbt_target":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def current(settings: Settings, job: str) -> list[dict[str, Any]]:
    con = duckdb.connect()
    try:
        rel = con.execute(f"SELECT * FROM read_parquet('{settings.results_dir(job) / 'current.parquet'}') ORDER BY custom_id")
        cols = [d[0] for d in rel.description]
        return [dict(zip(cols, r)) for r in rel.fetchall()]
    finally:
        con.close()


def dumps(x: Any) -> str:
    return json.dumps(x, default=str, indent=1)


def wait_ended(client: Any, batch_id: str, timeout: float = 30.0) -> Any:
    """Poll the emulator through the SDK until the batch has ended; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"batch still {batch.processing_status}"
        time.sleep(0.02)
    return batch
