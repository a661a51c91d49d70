"""Running dbt in-process, one invocation at a time, and reading its manifest.

dbt-duckdb keeps the warehouse file open after `dbtRunner.invoke()` returns (keep_open), which would
lock the bridge out of the warehouse; every invocation here releases the handle before returning.
The bridge parses into its own target path so it never disturbs the user's `target/`.

A parse costs seconds and some 70 MB (dbt is imported only for it), and a scheduled `dbt build` has
usually just written a complete manifest: the bridge reads dbt's own `target/manifest.json` instead
when it is newer than every project file and the profile, and names the staging relations where this
target puts them (the warehouse's catalog or an attached one, the target's schema). Otherwise, and
for anything it cannot vouch for, it parses into its own target path as before.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config import Settings, catalog_name, read_profile_target
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


def _dbt_target_manifest(settings: Settings) -> Path:
    """Where dbt itself writes the manifest: DBT_TARGET_PATH, else the project's `target-path`, else target/."""
    raw = os.environ.get("DBT_TARGET_PATH")
    if not raw:
        project = yaml.safe_load((settings.project_dir / "dbt_project.yml").read_text()) or {}
        raw = str(project.get("target-path") or "target")
    path = Path(raw).expanduser()
    return (path if path.is_absolute() else settings.project_dir / path) / "manifest.json"


def _reusable(settings: Settings, manifest: dict[str, Any]) -> bool:
    """Whether dbt's own manifest names the jobs' staging relations where this target builds them."""
    if (manifest.get("metadata") or {}).get("adapter_type") != "duckdb":
        return False
    try:
        _, target = read_profile_target(settings.profiles_dir, settings.project_dir, settings.target, dict(os.environ))
    except ConfigError:
        return False
    catalogs = {str(target.get("database") or catalog_name(str(settings.warehouse))), *settings.attached}
    schema = str(target.get("schema") or "main")
    for node in (manifest.get("nodes") or {}).values():
        if "batch_bridge" not in ((node.get("config") or {}).get("meta") or {}):
            continue
        if node.get("database") not in catalogs or not (
                node.get("schema") == schema or str(node.get("schema", "")).startswith(schema + "_")):
            return False
    return True


def _dbt_manifest(settings: Settings) -> dict[str, Any] | None:
    """dbt's own manifest when it is fresh (newer than every project file and the profile) and built for
    this target; None otherwise."""
    path = _dbt_target_manifest(settings)
    try:
        written = path.stat().st_mtime
    except OSError:
        return None
    profile = settings.profiles_dir / "profiles.yml"
    if written < _newest_source_mtime(settings.project_dir) or (profile.is_file() and written < profile.stat().st_mtime):
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if _reusable(settings, manifest) else None


def load_manifest(settings: Settings, *, force_parse: bool = False) -> dict[str, Any]:
    """The project's manifest: the bridge's own parse when nothing changed since, else dbt's own fresh
    manifest of this target, else a new `dbt parse` into the bridge's own target path."""
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
    if not fresh and not force_parse:
        theirs = _dbt_manifest(settings)
        if theirs is not None:
            return theirs
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
