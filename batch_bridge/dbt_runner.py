"""Running dbt in-process, one invocation at a time, and reading its manifest.

dbt-duckdb keeps the warehouse file open after `dbtRunner.invoke()` returns (keep_open), which would
lock the bridge out of the warehouse; every invocation here releases the handle before returning.
The bridge parses into its own target path so it never disturbs the user's `target/`.

A parse costs seconds and some 70 MB (dbt is imported only for it), and a scheduled `dbt build` has
usually just written a complete manifest: the bridge reads dbt's own `target/manifest.json` instead
when it is newer than every change to the files dbt parses and to the profile, and names the staging
relations where this target puts them (the warehouse's catalog or an attached one, the target's
schema). Otherwise, and for anything it cannot vouch for, it parses into its own target path; that
parse is kept under the same two conditions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import imports
from .config import Settings, catalog_name, read_profile_target
from .errors import ConfigError, WarehouseError

_lock = threading.Lock()
# What dbt parses: files of these kinds in the project's resource paths (dbt's defaults below, or the
# project's own `*-paths`), and the project-level files next to dbt_project.yml.
_SOURCE_SUFFIXES = (".sql", ".yml", ".yaml", ".py", ".md")
_RESOURCE_PATHS = {"model-paths": ["models"], "macro-paths": ["macros"], "snapshot-paths": ["snapshots"],
                   "analysis-paths": ["analyses"], "test-paths": ["tests"], "seed-paths": ["seeds"], "docs-paths": []}
# package-lock.yml: `dbt deps` rewrites it when it installs other versions of the packages.
_PROJECT_FILES = ("dbt_project.yml", "packages.yml", "dependencies.yml", "package-lock.yml", "selectors.yml")


@contextmanager
def _environment(settings: Settings) -> Iterator[None]:
    """Export the absolute paths dbt must agree on, keep dbt quiet about telemetry, and run it in the
    directory dbt runs in (`settings.root`): dbt-duckdb opens a relative `path` (and `attach:` paths)
    against the working directory, which is where the bridge resolved them, not where it was started
    from when BATCH_BRIDGE_ROOT names another folder."""
    new = {**settings.dbt_env(), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    started_in = os.getcwd()
    os.chdir(settings.root)
    try:
        yield
    finally:
        os.chdir(started_in)
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
    dbtRunner = imports.import_module("dbt.cli.main").dbtRunner  # noqa: N806 - dbt's class

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


def _changed_at(path: str | Path) -> float:
    """When a file or directory last changed: its mtime, or its ctime when later. Copies that keep
    their source's mtime (`rsync -a`, `cp -p`, `tar x`) still set the ctime, and a directory's times
    move when a file in it is added, removed or renamed."""
    st = os.stat(path)
    return max(st.st_mtime, st.st_ctime)


def _newest_change(project_dir: Path, *, packages: bool = True) -> float:
    """The latest change to what dbt parses in `project_dir`: its project files and every directory and
    source file under its resource paths, and (with `packages`) the same in its `local:` packages.

    Only the resource paths are walked: a warehouse file beside the models, or dbt's own outputs,
    change while dbt runs, after it wrote its manifest. Infinity when dbt_project.yml cannot be read
    (dbt's own parse then says why)."""
    try:
        project = yaml.safe_load((project_dir / "dbt_project.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return float("inf")
    if not isinstance(project, dict):
        return float("inf")
    newest = 0.0
    for name in _PROJECT_FILES:
        if (project_dir / name).is_file():
            newest = max(newest, _changed_at(project_dir / name))
    roots = set()
    for key, default in _RESOURCE_PATHS.items():
        paths = project.get(key) or default
        roots.update(map(str, paths if isinstance(paths, list) else [paths]))
    if any("{{" in root for root in roots):
        return float("inf")  # a path dbt renders from the environment: not ours to guess
    for root in sorted(roots):
        top = project_dir / root
        if not top.is_dir():
            continue
        for here, dirs, files in os.walk(top, followlinks=True):  # as dbt finds its files
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            newest = max(newest, _changed_at(here))
            for f in files:
                if f.endswith(_SOURCE_SUFFIXES):
                    newest = max(newest, _changed_at(os.path.join(here, f)))
    if packages:
        for local in _local_packages(project_dir):
            newest = max(newest, _newest_change(local, packages=False))
    return newest


def _local_packages(project_dir: Path) -> list[Path]:
    """The directories of the project's `local:` packages (packages.yml or dependencies.yml); one that
    is not a dbt project (or a path dbt renders) makes `_newest_change` infinite."""
    found = []
    for name in ("packages.yml", "dependencies.yml"):
        try:
            doc = yaml.safe_load((project_dir / name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for entry in (doc.get("packages") or []) if isinstance(doc, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("local"), str):
                path = Path(entry["local"]).expanduser()
                found.append(path if path.is_absolute() else project_dir / path)
    return found


def _sources_changed(settings: Settings) -> float:
    """The latest change to the project (`_newest_change`) or to the profile dbt reads."""
    profile = settings.profiles_dir / "profiles.yml"
    return max(_newest_change(settings.project_dir), _changed_at(profile) if profile.is_file() else 0.0)


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
    """dbt's own manifest when it is fresh (newer than every change to the project and the profile) and
    built for this target; None otherwise."""
    path = _dbt_target_manifest(settings)
    try:
        written = path.stat().st_mtime
    except OSError:
        return None
    if written <= _sources_changed(settings):  # a change in the same clock tick may be after it
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if _reusable(settings, manifest) else None


# `env_var('X'`, also as YAML writes it in a quoted scalar (`env_var(''X''`, `env_var(\"X\"`).
_ENV_VAR_CALL = re.compile(r"""env_var\(\s*\\?['"]+([^'"\\\s]+)""")


def _env_vars_read(settings: Settings) -> str:
    """A digest of the environment variables the profile and dbt_project.yml read (`env_var('X')`) and
    their values as dbt sees them: a target whose schema or path comes from the environment moves with
    it, without a change to any file. A digest, because such variables often hold credentials."""
    names: set[str] = set()
    for path in (settings.profiles_dir / "profiles.yml", settings.project_dir / "dbt_project.yml"):
        try:
            names.update(_ENV_VAR_CALL.findall(path.read_text()))
        except OSError:
            continue
    env = {**os.environ, **settings.dbt_env()}
    return hashlib.sha256("\0".join(f"{n}={env.get(n, '')}" for n in sorted(names)).encode()).hexdigest()


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
        "env_vars": _env_vars_read(settings),
    }
    if (
        not force_parse
        and manifest.is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()) == fingerprint
        and manifest.stat().st_mtime > _sources_changed(settings)
    ):
        return json.loads(manifest.read_text())
    if not force_parse:
        theirs = _dbt_manifest(settings)
        if theirs is not None:
            return theirs
    out.mkdir(parents=True, exist_ok=True)
    try:
        invoke(settings, ["parse", "--quiet"], target_path=out)
    except WarehouseError as e:
        raise ConfigError(f"dbt could not parse the project at {settings.project_dir}: {e.message}") from e
    stamp.write_text(json.dumps(fingerprint))
    if not manifest.is_file():
        raise ConfigError(f"dbt parse wrote no manifest at {manifest}")
    return json.loads(manifest.read_text())
