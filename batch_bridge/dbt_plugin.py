"""The bridge as a dbt-duckdb plugin: a plain `dbt build` submits new rows and loads ended answers.

    # profiles.yml, in the target                  # dbt_project.yml
    plugins:                                        models:
      - module: batch_bridge.dbt_plugin               +post-hook:
        alias: batch_bridge                             - sql: "{{ batch_bridge_submit() }}"
                                                          transaction: false
    # a source table named after the job
    sources: [{name: batch_bridge, tables: [{name: review_enrichment, config: {meta: {plugin: batch_bridge}}}]}]

Submitting: dbt-duckdb lets a plugin act only through `store()`, which a macro reaches with
`adapter.store_relation`. The shipped macro `batch_bridge_submit()`, a post-hook run after the model's
transaction is committed, calls it for models that declare a job; models without one cost nothing.
So only a run that builds the staging model submits, and a failure (over budget, a bad job) fails that
model's node, naming the job. `store()` runs `bridge.submit`, the CLI's own code: journal, locks,
crash points, hashing, budgets. It returns once the batches are created and never waits for one.

Loading: a source whose meta says `plugin: batch_bridge` is resolved by `load()`, which collects the
job's ended batches first (`bridge.collect`, only when the job has open batches: no network otherwise)
and returns the job's `current.parquet` as the CLI publishes it, so the columns and types are the same
as the Parquet source's. Before any answer exists, that file is empty, with the key columns typed as
in the staging relation.

dbt holds the warehouse file, so the plugin never opens it: staged rows are read through dbt's own
connection (`export.read_through`). The bridge's state is its own file, as for the CLI, so
`batch-bridge status`, `cancel` and `run` see and act on what the plugin sent. Within dbt's process,
one thread works on the bridge at a time (dbt runs models on several); `state.exclusive` keeps other
processes out, as it does between CLI commands.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
from dbt.adapters.duckdb.plugins import BasePlugin
from dbt.adapters.duckdb.utils import SourceConfig, TargetConfig
from dbt_common.exceptions import DbtRuntimeError

from . import api, bridge, config, state
from .errors import BatchBridgeError, ConfigError, JobDefinitionError
from .export import read_through, relation_columns
from .jobs import Job, jobs_from_manifest, parse_job, quote_ident, quote_literal
from .results import publish

# One thread of dbt's at a time works on the bridge: its process lock is a file lock that a second
# thread would wait for against the lock timeout, while this one queues them for as long as it takes.
_work = threading.RLock()


class DbtProgress:
    """Progress as dbt log lines (dbt's own event stream, so they go where dbt's output goes)."""

    def step(self, message: str) -> None:
        from dbt_common.events.functions import fire_event
        from dbt_common.events.types import Note

        fire_event(Note(msg=f"batch_bridge: {message}"))

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        pass


class Plugin(BasePlugin):
    """dbt-duckdb calls `configure_connection` when it opens the warehouse, `store` from the
    `batch_bridge_submit()` post-hook, and `load` when a model or test resolves the results source."""

    def initialize(self, plugin_config: dict[str, Any]) -> None:
        self._conn: duckdb.DuckDBPyConnection | None = None
        # Source table -> its catalog oid when the last `load` of it returned (see `_await_write`).
        self._written: dict[str, int | None] = {}

    def configure_connection(self, conn: duckdb.DuckDBPyConnection) -> None:
        # dbt's connection to the warehouse (again after every reopen): the only way the plugin reads it.
        self._conn = conn
        # dbt-duckdb creates a plugin source's schema from every thread that resolves it; on a new
        # warehouse two of them at once conflict. Created here, once, before any thread runs.
        for database, schema in _plugin_source_schemas(self.name):
            where = f"{quote_ident(database)}.{quote_ident(schema)}" if database else quote_ident(schema)
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {where}")

    # --- settings and jobs, from dbt's own context ---------------------------------------------

    def settings(self) -> config.Settings:
        """The bridge's settings for this dbt invocation: its project and profiles dirs and target, the
        warehouse dbt opened, and the environment for everything else (home, API key, limits)."""
        from dbt.flags import get_flags

        flags = get_flags()
        env = dict(os.environ)
        warehouse = Path(str(self.creds.path)).expanduser() if self.creds else None
        if warehouse is None or str(warehouse) == ":memory:":
            raise ConfigError("the batch_bridge plugin needs a DuckDB file `path` in the profile target")
        # dbt opened the path relative to its working directory: that file is the warehouse.
        env[config.ENV_WAREHOUSE] = str(warehouse if warehouse.is_absolute() else Path.cwd() / warehouse)
        return config.resolve(
            project_dir=getattr(flags, "PROJECT_DIR", None) or None,
            profiles_dir=getattr(flags, "PROFILES_DIR", None) or None,
            target=getattr(flags, "TARGET", None) or None,
            env=env,
        )

    def _reader(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            raise DbtRuntimeError("batch_bridge: dbt has not opened the warehouse yet")
        return self._conn.cursor()

    # --- submit: after a job's staging model is built -----------------------------------------

    def store(self, target_config: TargetConfig) -> None:
        node = _as_dict((target_config.config or {}).get("node")) or {}
        with _errors_named(str(node.get("name", target_config.relation))):
            job = parse_job(node) if node else None
        if job is None or _dry_build():
            return
        with _errors_named(job.name), _work:
            settings = self.settings()
            progress = DbtProgress()
            client = api.build_client(settings)
            source = self._reader()
            try:
                with state.exclusive(settings):
                    report = bridge.submit(settings, [job], client, progress=progress, warehouse=read_through(source))
            finally:
                source.close()
            if report.rejected:
                raise bridge.create_rejected_error(report.rejected)

    # --- load: the results source ----------------------------------------------------------------

    def load(self, source_config: SourceConfig) -> Any:
        name = source_config.name
        with _errors_named(name), _work:
            settings = self.settings()
            self._await_write(source_config, settings.lock_timeout)
            job = _job(settings, name)
            with state.exclusive(settings):
                if _has_open_batches(settings, job.name):
                    bridge.collect(settings, [job], api.build_client(settings), progress=DbtProgress())
                current = settings.results_dir(job.name) / "current.parquet"
                if not current.is_dir():  # a directory of bucket files; a file: published by an older bridge
                    with state.connect(settings) as con:
                        publish(con, settings, job)
                answers = self._current(settings, job, current)
            self._written[source_config.table_name()] = self._table_oid(source_config)
            return answers

    def _table_oid(self, source_config: SourceConfig) -> int | None:
        reader = self._reader()
        try:
            row = reader.execute(
                "SELECT table_oid FROM duckdb_tables() WHERE database_name = coalesce(?, current_database()) "
                "AND schema_name = ? AND table_name = ?",
                [source_config.database, source_config.schema, source_config.identifier]).fetchone()
        finally:
            reader.close()
        return row[0] if row else None

    def _await_write(self, source_config: SourceConfig, timeout: float) -> None:
        """Wait until dbt-duckdb has committed the table the previous `load` of this source returned.

        dbt-duckdb writes the table (CREATE OR REPLACE) after `load` returns, in the resolving thread;
        two such writes at once fail with a write-write conflict (threads > 1: a model and the source's
        tests resolve it together). Loads are serialized (`_work`), and each waits for the previous
        write: a committed CREATE OR REPLACE gives the table a new catalog oid. A write that failed
        never does, so the wait is bounded by the lock timeout."""
        table = source_config.table_name()
        if table not in self._written:
            return
        before = self._written.pop(table)
        deadline = time.monotonic() + timeout
        while self._table_oid(source_config) == before and time.monotonic() < deadline:
            time.sleep(0.02)

    def _current(self, settings: config.Settings, job: Job, path: Path) -> Any:
        """The published answers as Arrow; key columns typed as the staging relation when no submission
        has recorded their types yet (the file then has no rows, and text keys would not join)."""
        with state.connect(settings) as con:
            recorded = con.execute("SELECT count(*) FROM bb_state.jobs WHERE job = ?", [job.name]).fetchone()[0]
            cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({quote_literal(str(path))})").fetchall()]
            types: dict[str, str] = {}
            if not recorded:
                reader = self._reader()
                try:
                    types = {k: v for k, v in relation_columns(reader, job).items() if k in job.key}
                except BatchBridgeError:
                    types = {}  # the staging model was never built: text keys, as the CLI publishes them
                finally:
                    reader.close()
            select = ", ".join(
                f"CAST({quote_ident(c)} AS {types[c]}) AS {quote_ident(c)}" if c in types else quote_ident(c) for c in cols
            )
            return con.sql(f"SELECT {select} FROM read_parquet({quote_literal(str(path))})").to_arrow_table()


def _as_dict(node: Any) -> dict[str, Any] | None:
    if node is None or isinstance(node, dict):
        return node
    to_dict = getattr(node, "to_dict", None)
    return to_dict() if to_dict else None


def _dry_build() -> bool:
    """`dbt build --empty` builds with no rows: nothing to send, and no answers must go stale."""
    from dbt.flags import get_flags

    return bool(getattr(get_flags(), "EMPTY", False))


def _job(settings: config.Settings, name: str) -> Job:
    """The job a results source table is named after, from this invocation's manifest."""
    jobs = {j.name: j for j in jobs_from_manifest(_manifest(settings))}
    if name not in jobs:
        raise ConfigError(
            f"source table {name!r} has meta plugin: batch_bridge but no job is named {name!r}; "
            f"jobs: {', '.join(jobs) or '(none)'}",
            hint="name the source table after the job (meta.batch_bridge.job, default the staging model's name)",
        )
    return jobs[name]


def _manifest(settings: config.Settings) -> dict[str, Any]:
    """The manifest dbt parsed for this invocation: the adapter holds it while dbt runs; dbt also wrote
    it to its target path before running anything."""
    try:
        from dbt.adapters.factory import get_adapter_by_type

        held = getattr(get_adapter_by_type("duckdb"), "_macro_resolver", None)
    except Exception:  # noqa: BLE001 - no adapter registered: fall back to the file
        held = None
    nodes = getattr(held, "nodes", None)
    if nodes:
        return {"nodes": {uid: n.to_dict() for uid, n in nodes.items()
                          if ((getattr(getattr(n, "config", None), "meta", None) or {}).get("batch_bridge")
                              or (getattr(n, "meta", None) or {}).get("batch_bridge"))}}
    from dbt.flags import get_flags

    target = Path(getattr(get_flags(), "TARGET_PATH", None) or "target")
    path = target if target.is_absolute() else settings.project_dir / target
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"dbt wrote no manifest at {manifest}", hint="run dbt without --no-write-json")
    return json.loads(manifest.read_text())


def _plugin_source_schemas(alias: str) -> list[tuple[str | None, str]]:
    """(database, schema) of the sources this plugin resolves, from the manifest dbt holds."""
    try:
        from dbt.adapters.factory import get_adapter_by_type

        sources = getattr(getattr(get_adapter_by_type("duckdb"), "_macro_resolver", None), "sources", None) or {}
    except Exception:  # noqa: BLE001 - no adapter or manifest yet (dbt parse): nothing to prepare
        return []
    out = set()
    for src in sources.values():
        meta = {**(getattr(src, "meta", None) or {}), **(getattr(getattr(src, "config", None), "meta", None) or {})}
        if meta.get("plugin") == alias:
            out.add((src.database, src.schema))
    return sorted(out, key=str)


def _has_open_batches(settings: config.Settings, job: str) -> bool:
    with state.connect(settings) as con:
        return bool(con.execute(
            "SELECT count(*) FROM bb_state.batches WHERE job = ? AND local_state IN ('submitted', 'downloaded')",
            [job]).fetchone()[0])


class _errors_named:
    """Bridge errors as dbt errors naming the job, with the CLI's message and hint."""

    def __init__(self, job: str) -> None:
        self.job = job

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, e: BaseException | None, tb: object) -> bool:
        if isinstance(e, BatchBridgeError):
            named = "" if isinstance(e, JobDefinitionError) or f"job {self.job!r}" in e.message else f"job {self.job!r}: "
            raise DbtRuntimeError(f"batch_bridge: {named}{e}") from e
        return False
