"""Settings: the one place that reads environment variables and the dbt profile.

Resolution order for every field: command-line flag > environment variable > dbt profile > default.

Paths agree with dbt. dbt-duckdb hands a relative `path` (and `attach:` paths) to DuckDB, which
opens it against the directory dbt runs in: normally the project folder. So the bridge resolves a
relative path against the project folder when it runs there itself, or against `BATCH_BRIDGE_ROOT`
(the directory dbt runs in, when that is not the project folder). Run from anywhere else with a
relative path, it cannot know where dbt would put the file, and says so instead of guessing.
Absolute paths are used as they are; MotherDuck (`md:`) and other URL paths are passed through
untouched and never looked for on disk. Before running dbt itself, the bridge exports the absolute
paths it resolved (BATCH_BRIDGE_WAREHOUSE, BATCH_BRIDGE_HOME), so a profile reading them agrees.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import ConfigError

ENV_WAREHOUSE = "BATCH_BRIDGE_WAREHOUSE"
ENV_HOME = "BATCH_BRIDGE_HOME"
ENV_ROOT = "BATCH_BRIDGE_ROOT"  # the directory dbt runs in, when it is not the project folder
ENV_PROJECT_DIR = "DBT_PROJECT_DIR"
ENV_PROFILES_DIR = "DBT_PROFILES_DIR"
ENV_TARGET = "DBT_TARGET"
ENV_API_KEY = "ANTHROPIC_API_KEY"
ENV_BASE_URL = "ANTHROPIC_BASE_URL"
ENV_POLL_INTERVAL = "BATCH_BRIDGE_POLL_INTERVAL"
ENV_LOCK_TIMEOUT = "BATCH_BRIDGE_LOCK_TIMEOUT"
ENV_PRICES = "BATCH_BRIDGE_PRICES"
ENV_RETENTION_DAYS = "BATCH_BRIDGE_RETENTION_DAYS"
ENV_CONCURRENCY = "BATCH_BRIDGE_CONCURRENCY"
ENV_MEMORY_LIMIT = "BATCH_BRIDGE_MEMORY_LIMIT"
ENV_PREFLIGHT_TIMEOUT = "BATCH_BRIDGE_PREFLIGHT_TIMEOUT"
ENV_MAX_QUEUED = "BATCH_BRIDGE_MAX_QUEUED_REQUESTS"
ENV_RECONCILE_GRACE = "BATCH_BRIDGE_RECONCILE_GRACE"
ENV_CREATE_TIMEOUT = "BATCH_BRIDGE_CREATE_TIMEOUT"
ENV_PUBLISH_BUCKET_ROWS = "BATCH_BRIDGE_PUBLISH_BUCKET_ROWS"
# Keys per file of a job's results source (`current.parquet/` holds one file per bucket of keys, at most 16
# buckets, each written in parts of about this many keys beyond): a change rewrites only its files, and a
# file of this many 600-character answers is written in ~0.2 s.
DEFAULT_PUBLISH_BUCKET_ROWS = 65_536
ENV_LOAD_SLICE = "BATCH_BRIDGE_LOAD_SLICE_BYTES"
# Bytes of a result file loaded per transaction (`collect.load_downloaded`): an uncommitted INSERT is held
# in memory and DuckDB's JSON reader buffers up to 32 MB of its file, so a batch of 100,000 answers
# loaded in one transaction made the peak of a run grow with its batches. 16 MiB loads 100,000 answers
# (78 MB) in 5 slices, 2-10% slower than 32 MiB slices (each slice costs a commit and a pass over the
# batch's sent requests), and a 50,000-answer run's load peaks ~19 MB lower. Measured in
# docs/PERFORMANCE.md (Collect).
DEFAULT_LOAD_SLICE_BYTES = 16 * 2**20
# The API's cap on a workspace's requests in the processing queue at Tier 1 (200,000 at Tier 2): creates
# beyond it answer 429, so the bridge keeps its own batches within it.
DEFAULT_MAX_QUEUED = 100_000
ENV_COUNT_SAMPLE = "BATCH_BRIDGE_COUNT_SAMPLE"
ENV_CACHE_HIT_RATE = "BATCH_BRIDGE_CACHE_HIT_RATE"
# Requests of a job whose input tokens `plan` counts with the token counting endpoint: every request
# when there are no more, else a sample stratified by prompt length. Small enough for the endpoint's
# lowest rate limit (100 a minute); counts are kept, so the next plan counts only new inputs.
DEFAULT_COUNT_SAMPLE = 100
# The share of cache lookups a batch is expected to hit before a job has answers of its own: the middle
# of the 30-98% the API documents for best-effort caching in batches.
DEFAULT_CACHE_HIT_RATE = 0.64
# DuckDB's memory for the bridge's work on rows of ordinary width (it spills to disk beyond); measured in
# BENCHMARKS.md: a 1M-row job runs within it, and 100,000 answers of 6 KB. Unless the user sets
# BATCH_BRIDGE_MEMORY_LIMIT, steps over wider rows get room for a few vectors of them on top
# (`state.room_for_rows`): 2,000 answers of 60 KB did not load within 128MB.
DEFAULT_MEMORY_LIMIT = "128MB"


@dataclass(frozen=True)
class Settings:
    """Everything a command needs, resolved once."""

    project_dir: Path  # the dbt project (contains dbt_project.yml)
    profiles_dir: Path  # contains profiles.yml
    target: str | None  # dbt target name; None means the profile's default
    root: Path  # the directory dbt runs in: relative paths resolve against it (the project folder by default)
    warehouse: Path | str  # the target's DuckDB file the bridge reads (read-only, between dbt runs); str: md:/URL
    home: Path  # the bridge's own directory: state.duckdb, archives, result files
    # The target's `attach:` databases (DuckDB files or URLs) by catalog name: a staging model built
    # into one of them (`database: <alias>`) is read from that file. Other types (sqlite, postgres) by
    # name with their type, so a job reading one gets a clear error.
    attached: dict[str, Path | str] = field(default_factory=dict)
    attached_other: dict[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)  # never printed, never stored
    base_url: str | None = None  # None means the real API
    poll_interval: float = 30.0  # seconds between status polls while waiting
    max_poll_interval: float = 60.0
    lock_timeout: float = 30.0  # seconds to wait for another process's lock before giving up
    concurrency: int = 4  # parallel uploads/downloads
    prices_file: Path | None = None  # user price overrides (JSON), merged over the packaged prices
    retention_days: float | None = None  # archives older than this are removed by `purge`
    memory_limit: str = DEFAULT_MEMORY_LIMIT  # DuckDB's memory for the bridge's work; it spills to disk beyond
    memory_limit_set: bool = False  # given by the user (BATCH_BRIDGE_MEMORY_LIMIT): a cap, never raised for wide rows
    preflight_timeout: float = 5.0  # seconds the Models API gets (one try) before the preflight goes on without it
    max_queued_requests: int = DEFAULT_MAX_QUEUED  # requests the bridge keeps in in_progress batches at once
    # How long a create of unknown outcome (timeout, reset, 5xx) is looked for in `list`, counted from when
    # its outcome became unknown, before its file is sent again. The API has no idempotency key, and a new
    # batch can take a while to show in `list`: a longer grace only delays a resend, a shorter one can pay twice.
    reconcile_grace: float = 300.0
    create_timeout: float = 600.0  # seconds; a create not answered by then has an unknown outcome
    count_sample: int = DEFAULT_COUNT_SAMPLE  # requests per job whose tokens plan counts exactly; 0 = the rule only
    cache_hit_rate: float = DEFAULT_CACHE_HIT_RATE  # expected cache hits before a job has answers of its own
    publish_bucket_rows: int = DEFAULT_PUBLISH_BUCKET_ROWS  # keys per file of the results source (results.py)
    load_slice_bytes: int = DEFAULT_LOAD_SLICE_BYTES  # result-file bytes loaded per transaction (a whole line at least)

    @property
    def state_path(self) -> Path:
        return self.home / "bb_state.duckdb"

    @property
    def requests_dir(self) -> Path:
        return self.home / "requests"

    @property
    def raw_results_dir(self) -> Path:
        return self.home / "results" / "raw"

    def results_dir(self, job: str) -> Path:
        return self.home / "results" / job

    @property
    def dbt_target_path(self) -> Path:
        """Where the bridge's own `dbt parse` writes, so it never disturbs the user's target/."""
        return self.home / "dbt_target" / (self.target or "default")

    def database_location(self, catalog: str) -> Path | str:
        """The file (or md:/URL) holding dbt's catalog `catalog`: an attached database, else the target's path."""
        if catalog in self.attached_other:
            raise ConfigError(
                f"catalog {catalog!r} is attached by the profile as type {self.attached_other[catalog]!r}; "
                "the bridge reads staging models from DuckDB databases only",
                hint="build the job's staging model into the target's DuckDB file or an attached DuckDB database",
            )
        return self.attached.get(catalog, self.warehouse)

    def with_(self, **changes: object) -> "Settings":
        return replace(self, **changes)

    def dbt_env(self) -> dict[str, str]:
        """The absolute paths dbt must see so that it agrees with the bridge."""
        return {ENV_WAREHOUSE: str(self.warehouse), ENV_HOME: str(self.home)}


def _find_project_dir(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "dbt_project.yml").is_file():
            return d
    if (start / "dbt_project" / "dbt_project.yml").is_file():
        return start / "dbt_project"
    return None


def _profile_name(project_dir: Path) -> object:
    try:
        project = yaml.safe_load((project_dir / "dbt_project.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return project.get("profile") if isinstance(project, dict) else None


def _defines(profiles_dir: Path, name: object) -> bool:
    try:
        profiles = yaml.safe_load((profiles_dir / "profiles.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return True  # read_profile_target says what is wrong with it
    return not isinstance(profiles, dict) or name in profiles


def _find_profiles_dir(project_dir: Path, cwd: Path, root: Path, home: Path) -> Path:
    """dbt's own order: the directory dbt runs in (the working directory, or `root` when the bridge
    runs elsewhere), then ~/.dbt. The first of them with a profiles.yml is the one dbt reads, unless it
    lacks the project's profile (then dbt fails, and the bridge may look on). After them, places dbt
    never looks, used only when none of dbt's has the profile (this repository's ../profiles), so
    the bridge never reads another profile than dbt would."""
    name = _profile_name(project_dir)
    places = list(dict.fromkeys([cwd, root, home / ".dbt", project_dir, project_dir.parent / "profiles"]))
    found = [d for d in places if (d / "profiles.yml").is_file()]
    for d in found:
        if _defines(d, name):
            return d
    if found:
        return found[0]  # read_profile_target names the profiles it has
    raise ConfigError(
        f"no profiles.yml found in {', '.join(str(p) for p in places)}",
        hint="pass --profiles-dir or set DBT_PROFILES_DIR",
    )


# `{{ env_var('NAME') }}` or `{{ env_var('NAME', 'default') }}` with plain quoted literals: nearly every
# profile's only Jinja. Rendered without jinja2, whose import costs ~40 ms of every command's start.
_ENV_VAR_CALL = re.compile(
    r"""\{\{\s*env_var\(\s*(?P<q>['"])(?P<name>[^'"\\]*)(?P=q)"""
    r"""(?:\s*,\s*(?P<dq>['"])(?P<default>[^'"\\]*)(?P=dq))?\s*\)\s*\}\}"""
)


def _render_env(text: str, env: dict[str, str]) -> str:
    """Render the `env_var()` calls of a dbt profile (the only Jinja profiles normally use)."""

    def env_var(name: str, default: str | None = None) -> str:
        if name in env:
            return env[name]
        if default is None:
            raise ConfigError(f"profiles.yml uses env_var({name!r}) with no default and it is not set")
        return default

    if "{%" not in text and "{#" not in text and "{{-" not in text and "-}}" not in text:
        plain = _ENV_VAR_CALL.sub(lambda m: env_var(m["name"], m["default"]), text)
        if "{{" not in plain:  # every expression was a plain env_var() call
            return plain[:-1] if plain.endswith("\n") else plain  # Jinja drops a template's last newline
    import jinja2

    return jinja2.Environment().from_string(text).render(env_var=env_var)


def _render_tree(value: object, env: dict[str, str]) -> object:
    """Render env_var() in every string of a profile target (dbt renders each value the same way)."""
    if isinstance(value, str):
        return yaml.safe_load(_render_env(value, env)) if "{{" in value else value
    if isinstance(value, dict):
        return {k: _render_tree(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_tree(v, env) for v in value]
    return value


def read_profile_target(profiles_dir: Path, project_dir: Path, target: str | None, env: dict[str, str]) -> tuple[str, dict]:
    """Return (target name, target dict) of the project's profile, with env_var() rendered."""
    project = yaml.safe_load((project_dir / "dbt_project.yml").read_text()) or {}
    profile_name = project.get("profile")
    profiles = yaml.safe_load((profiles_dir / "profiles.yml").read_text()) or {}
    if profile_name not in profiles:
        raise ConfigError(
            f"profile {profile_name!r} (from {project_dir / 'dbt_project.yml'}) is not in "
            f"{profiles_dir / 'profiles.yml'}; profiles there: {sorted(k for k in profiles if k != 'config')}"
        )
    profile = profiles[profile_name]
    name = target or profile.get("target") or "dev"
    outputs = profile.get("outputs") or {}
    if name not in outputs:
        raise ConfigError(f"target {name!r} is not in profile {profile_name!r}; targets: {sorted(outputs)}")
    rendered = _render_tree(outputs[name], env)
    if rendered.get("type") != "duckdb":
        raise ConfigError(f"target {name!r} has type {rendered.get('type')!r}; batch_bridge supports 'duckdb'")
    return name, rendered


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # md:db, motherduck:db, s3://..., https://... (not C:\\)


def is_remote(path: str | Path) -> bool:
    """A MotherDuck or URL path: DuckDB opens it, not the file system; the bridge passes it through."""
    return isinstance(path, str) and bool(_URL.match(path))


def _path(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p)


@dataclass(frozen=True)
class _Paths:
    """Where relative paths resolve: `root`, if the bridge can know where dbt runs (`known`)."""

    root: Path
    known: bool
    cwd: Path
    project_dir: Path

    def locate(self, value: str, what: str) -> Path | str:
        """An absolute Path for a file path, or the value itself for md:/URL paths."""
        if value == ":memory:" or is_remote(value):
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return p.resolve()
        if not self.known:
            raise ConfigError(
                f"{what} is the relative path {value!r}: dbt resolves it against the directory dbt runs in, "
                f"and this command runs in {self.cwd}, not in the project folder {self.project_dir}, so the "
                "bridge cannot know which file dbt uses",
                hint=f"run batch-bridge from the project folder (cd {self.project_dir}), or set {ENV_ROOT} to the "
                "directory you run dbt in, or make the path absolute (for example through env_var() in profiles.yml)",
            )
        return (self.root / p).resolve()


_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(size: str) -> int:
    """'64MB' -> 64,000,000 and '64MiB' -> 67,108,864, as DuckDB reads a memory_limit."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", size)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _attachments(out: dict, paths: _Paths, target: str) -> tuple[dict[str, Path | str], dict[str, str]]:
    """The target's `attach:` entries by catalog name (dbt-duckdb's alias, else the name DuckDB derives)."""
    duck: dict[str, Path | str] = {}
    other: dict[str, str] = {}
    for i, a in enumerate(out.get("attach") or []):
        if not isinstance(a, dict) or not a.get("path"):
            raise ConfigError(f"target {target!r}: attach entry {i} has no `path`")
        kind = str(a.get("type") or (a.get("options") or {}).get("type") or "duckdb").lower()
        name = str(a.get("alias") or catalog_name(str(a["path"])))
        if kind == "duckdb":
            duck[name] = paths.locate(str(a["path"]), f"the `path` of attach entry {name!r} of target {target!r}")
        else:
            other[name] = kind
    return duck, other


def catalog_name(path: str) -> str:
    """The catalog name DuckDB gives a database opened from `path` (dbt-duckdb's `database`)."""
    from urllib.parse import urlparse

    parsed = urlparse(path)
    base = os.path.basename(parsed.path) if is_remote(path) else os.path.basename(path)
    if parsed.scheme in ("md", "motherduck") and is_remote(path):
        return os.path.splitext(base)[0] or "my_db"
    return base.lstrip(".").split(".")[0]


def _memory(value: str) -> str:
    try:
        size_bytes(value)
    except ValueError:
        raise ConfigError(f"{ENV_MEMORY_LIMIT}={value!r} is not a size; use e.g. 512MB or 2GB") from None
    return value.strip()


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def resolve(
    *,
    project_dir: str | Path | None = None,
    profiles_dir: str | Path | None = None,
    target: str | None = None,
    poll_interval: float | None = None,
    lock_timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve settings from flags (arguments), the environment and the dbt profile."""
    env = dict(os.environ if env is None else env)
    cwd = (cwd or Path.cwd()).resolve()
    if project_dir is None and env.get(ENV_PROJECT_DIR):
        project_dir = env[ENV_PROJECT_DIR]
    if project_dir is not None:
        pdir = Path(project_dir).expanduser().resolve()
        if not (pdir / "dbt_project.yml").is_file():
            raise ConfigError(f"--project-dir {pdir}: no dbt_project.yml there")
    else:
        found = _find_project_dir(cwd)
        if found is None:
            raise ConfigError(
                f"no dbt_project.yml in {cwd}, its parents or ./dbt_project",
                hint="pass --project-dir or set DBT_PROJECT_DIR",
            )
        pdir = found.resolve()
    if profiles_dir is None and env.get(ENV_PROFILES_DIR):
        profiles_dir = env[ENV_PROFILES_DIR]
    if env.get(ENV_ROOT):
        paths = _Paths(Path(env[ENV_ROOT]).expanduser().resolve(), True, cwd, pdir)
    else:
        paths = _Paths(pdir, cwd == pdir, cwd, pdir)
    user_home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    prdir = (Path(profiles_dir).expanduser().resolve() if profiles_dir
             else _find_profiles_dir(pdir, cwd, paths.root, user_home))
    if not (prdir / "profiles.yml").is_file():
        raise ConfigError(f"--profiles-dir {prdir}: no profiles.yml there")
    target = target or env.get(ENV_TARGET) or None

    target_name, out = read_profile_target(prdir, pdir, target, env)
    where = f"the `path` of target {target_name!r} in {prdir / 'profiles.yml'}"
    if env.get(ENV_WAREHOUSE):
        warehouse = paths.locate(env[ENV_WAREHOUSE], ENV_WAREHOUSE)
    else:
        if not out.get("path") or out["path"] == ":memory:":
            raise ConfigError(f"target {target_name!r} has no file `path`; the bridge needs a DuckDB file")
        warehouse = paths.locate(str(out["path"]), where)
    if warehouse == ":memory:":
        raise ConfigError(f"{ENV_WAREHOUSE} is ':memory:'; the bridge needs a DuckDB file")
    attached, attached_other = _attachments(out, paths, target_name)
    if env.get(ENV_HOME):
        home = paths.locate(env[ENV_HOME], ENV_HOME)
        if not isinstance(home, Path):
            raise ConfigError(f"{ENV_HOME}={env[ENV_HOME]!r} is not a local directory", hint="give a directory path")
    elif isinstance(warehouse, Path):
        home = warehouse.parent / ".batch_bridge"
    else:  # MotherDuck/URL warehouse: the bridge's files live with the project
        home = paths.root / ".batch_bridge"

    max_queued = int(_float(env, ENV_MAX_QUEUED, DEFAULT_MAX_QUEUED))
    if max_queued < 1:
        raise ConfigError(f"{ENV_MAX_QUEUED}={max_queued} must be at least 1",
                          hint="your workspace's processing-queue limit: 100000 at Tier 1, 200000 at Tier 2")
    grace, create_timeout = _float(env, ENV_RECONCILE_GRACE, 300.0), _float(env, ENV_CREATE_TIMEOUT, 600.0)
    for name, value in ((ENV_RECONCILE_GRACE, grace), (ENV_CREATE_TIMEOUT, create_timeout)):
        if value < 0:
            raise ConfigError(f"{name}={value:g} must be >= 0 seconds")
    prices = env.get(ENV_PRICES)
    retention = env.get(ENV_RETENTION_DAYS)
    concurrency = int(_float(env, ENV_CONCURRENCY, 4))
    if concurrency < 1:
        raise ConfigError(f"{ENV_CONCURRENCY}={concurrency} must be at least 1")
    count_sample = int(_float(env, ENV_COUNT_SAMPLE, DEFAULT_COUNT_SAMPLE))
    if count_sample < 0:
        raise ConfigError(f"{ENV_COUNT_SAMPLE}={count_sample} must be 0 (do not count) or a number of requests")
    hit_rate = _float(env, ENV_CACHE_HIT_RATE, DEFAULT_CACHE_HIT_RATE)
    bucket_rows = int(_float(env, ENV_PUBLISH_BUCKET_ROWS, DEFAULT_PUBLISH_BUCKET_ROWS))
    if bucket_rows < 1:
        raise ConfigError(f"{ENV_PUBLISH_BUCKET_ROWS}={bucket_rows} must be at least 1 key per results file",
                          hint=f"unset it for the default, {DEFAULT_PUBLISH_BUCKET_ROWS}")
    if not 0 <= hit_rate <= 1:
        raise ConfigError(f"{ENV_CACHE_HIT_RATE}={hit_rate} must be a share between 0 and 1, e.g. 0.64")
    slice_raw = env.get(ENV_LOAD_SLICE) or ""
    try:
        load_slice = int(slice_raw) if slice_raw.strip().isdigit() else size_bytes(slice_raw) if slice_raw else DEFAULT_LOAD_SLICE_BYTES
    except ValueError:
        load_slice = 0
    if load_slice < 1:
        raise ConfigError(f"{ENV_LOAD_SLICE}={slice_raw!r} is not a positive size",
                          hint="give bytes or a size, e.g. 16MiB (the default)")
    return Settings(
        project_dir=pdir,
        profiles_dir=prdir,
        target=target_name,
        root=paths.root,
        warehouse=warehouse,
        home=home.resolve(),
        attached=attached,
        attached_other=attached_other,
        api_key=env.get(ENV_API_KEY) or None,
        base_url=env.get(ENV_BASE_URL) or None,
        poll_interval=poll_interval if poll_interval is not None else _float(env, ENV_POLL_INTERVAL, 30.0),
        # An interval given on the command line is kept as is; otherwise polls back off to 60 s.
        max_poll_interval=poll_interval if poll_interval is not None else 60.0,
        lock_timeout=lock_timeout if lock_timeout is not None else _float(env, ENV_LOCK_TIMEOUT, 30.0),
        concurrency=concurrency,
        prices_file=_path(prices, cwd) if prices else None,  # the bridge's own file: like any CLI argument
        retention_days=float(retention) if retention else None,
        memory_limit=_memory(env.get(ENV_MEMORY_LIMIT) or DEFAULT_MEMORY_LIMIT),
        memory_limit_set=bool(env.get(ENV_MEMORY_LIMIT)),
        preflight_timeout=_float(env, ENV_PREFLIGHT_TIMEOUT, 5.0),
        max_queued_requests=max_queued,
        reconcile_grace=grace,
        create_timeout=create_timeout,
        count_sample=count_sample,
        cache_hit_rate=hit_rate,
        publish_bucket_rows=bucket_rows,
        load_slice_bytes=load_slice,
    )
