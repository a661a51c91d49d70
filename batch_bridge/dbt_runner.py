"""Running dbt in-process, one invocation at a time, and reading its manifest.

dbt-duckdb keeps the warehouse file open after `dbtRunner.invoke()` returns (keep_open), which would
lock the bridge out of the warehouse; every invocation here releases the handle before returning.
The bridge parses into its own target path so it never disturbs the user's `target/`.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import Settings
from .errors import ConfigError, WarehouseError

_lock = threading.Lock()
_SKIP_DIRS = {"target", "dbt_packages", "logs", "dbt_modules", ".batch_bridge"}


@contextmanager
def _environment(settings: Settings) -> Iterator[None]:
    """Export the absolute paths dbt must agree on, and keep dbt quiet about telemetry."""
    new = {**settings.dbt_env(), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def release_duckdb_handles() -> None:
    """Close dbt-duckdb's cached connection so other processes can open the warehouse."""
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager

        env = getattr(DuckDBConnectionManager, "_ENV", None)
        if env is not None:
            close = getattr(env, "close", None)
            if close:
                close()
            DuckDBConnectionManager._ENV = None
    except ImportError:  # dbt-duckdb absent: nothing to release
        pass
    try:
        from dbt.adapters.factory import cleanup_connections

        cleanup_connections()
    except Exception:  # noqa: BLE001 - best effort; the handle above is what matters
        pass


def invoke(settings: Settings, args: list[str], *, target_path: Path | None = None) -> Any:
    """Run one dbt command in-process (`args` like ["build", "--selector", "x"]); raise on failure."""
    from dbt.cli.main import dbtRunner

    full = [
        *args,
        "--project-dir", str(settings.project_dir),
        "--profiles-dir", str(settings.profiles_dir),
    ]
    if settings.target:
        full += ["--target", settings.target]
    if target_path is not None:
        full += ["--target-path", str(target_path)]
    with _lock, _environment(settings):
        try:
            result = dbtRunner().invoke(full)
        finally:
            release_duckdb_handles()
    if not result.success:
        detail = f": {result.exception}" if result.exception else ""
        raise WarehouseError(f"`dbt {' '.join(args)}` failed{detail}", hint="see the dbt output above")
    return result


def _newest_source_mtime(project_dir: Path) -> float:
    newest = (project_dir / "dbt_project.yml").stat().st_mtime
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for f in files:
            if f.endswith((".sql", ".yml", ".yaml", ".py", ".md")):
                newest = max(newest, os.stat(os.path.join(root, f)).st_mtime)
    return newest


def load_manifest(settings: Settings, *, force_parse: bool = False) -> dict[str, Any]:
    """The project's manifest, from the bridge's own `dbt parse` when anything changed since."""
    out = settings.dbt_target_path
    manifest = out / "manifest.json"
    stamp = out / "batch_bridge_parse.json"
    fingerprint = {
        "project_dir": str(settings.project_dir),
        "profiles_dir": str(settings.profiles_dir),
        "target": settings.target,
        **settings.dbt_env(),
    }
    fresh = (
        not force_parse
        and manifest.is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()) == fingerprint
        and manifest.stat().st_mtime >= _newest_source_mtime(settings.project_dir)
    )
    if not fresh:
        out.mkdir(parents=True, exist_ok=True)
        try:
            invoke(settings, ["parse", "--quiet"], target_path=out)
        except WarehouseError as e:
            raise ConfigError(f"dbt could not parse the project at {settings.project_dir}: {e.message}") from e
        stamp.write_text(json.dumps(fingerprint))
    if not manifest.is_file():
        raise ConfigError(f"dbt parse wrote no manifest at {manifest}")
    return json.loads(manifest.read_text())
