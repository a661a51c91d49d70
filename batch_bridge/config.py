"""Settings: the one place that reads environment variables and the dbt profile.

Resolution order for every field: command-line flag > environment variable > dbt profile > default.
Relative paths (in environment variables and in the profile) are resolved against the *root*: the
parent of the dbt project directory (`BATCH_BRIDGE_ROOT` overrides it). That is where this
repository keeps `warehouse.duckdb`, and it makes every command behave the same from any working
directory. Before running dbt, the bridge exports the absolute paths it resolved, so dbt agrees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import ConfigError

ENV_WAREHOUSE = "BATCH_BRIDGE_WAREHOUSE"
ENV_HOME = "BATCH_BRIDGE_HOME"
ENV_ROOT = "BATCH_BRIDGE_ROOT"
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
    root: Path  # base for relative paths
    warehouse: Path  # the dbt DuckDB file the bridge reads (read-only, between dbt runs)
    home: Path  # the bridge's own directory: state.duckdb, archives, result files
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
    count_sample: int = DEFAULT_COUNT_SAMPLE  # requests per job whose tokens plan counts exactly; 0 = the rule only
    cache_hit_rate: float = DEFAULT_CACHE_HIT_RATE  # expected cache hits before a job has answers of its own

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


def _find_profiles_dir(project_dir: Path, cwd: Path) -> Path:
    for d in (project_dir, project_dir.parent / "profiles", cwd, Path.home() / ".dbt"):
        if (d / "profiles.yml").is_file():
            return d
    raise ConfigError(
        f"no profiles.yml found in {project_dir}, {project_dir.parent / 'profiles'}, {cwd} or ~/.dbt",
        hint="pass --profiles-dir or set DBT_PROFILES_DIR",
    )


def _render_env(text: str, env: dict[str, str]) -> str:
    """Render the `env_var()` calls of a dbt profile (the only Jinja profiles normally use)."""
    import jinja2

    def env_var(name: str, default: str | None = None) -> str:
        if name in env:
            return env[name]
        if default is None:
            raise ConfigError(f"profiles.yml uses env_var({name!r}) with no default and it is not set")
        return default

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


def _path(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p)


_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(size: str) -> int:
    """'64MB' -> 64,000,000 and '64MiB' -> 67,108,864, as DuckDB reads a memory_limit."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", size)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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
    prdir = Path(profiles_dir).expanduser().resolve() if profiles_dir else _find_profiles_dir(pdir, cwd)
    if not (prdir / "profiles.yml").is_file():
        raise ConfigError(f"--profiles-dir {prdir}: no profiles.yml there")
    target = target or env.get(ENV_TARGET) or None
    root = Path(env[ENV_ROOT]).expanduser().resolve() if env.get(ENV_ROOT) else pdir.parent

    if env.get(ENV_WAREHOUSE):
        warehouse = _path(env[ENV_WAREHOUSE], root)
        target_name = target
    else:
        target_name, out = read_profile_target(prdir, pdir, target, env)
        if not out.get("path") or out["path"] == ":memory:":
            raise ConfigError(f"target {target_name!r} has no file `path`; the bridge needs a DuckDB file")
        warehouse = _path(str(out["path"]), root)
    home = _path(env[ENV_HOME], root) if env.get(ENV_HOME) else warehouse.parent / ".batch_bridge"

    prices = env.get(ENV_PRICES)
    retention = env.get(ENV_RETENTION_DAYS)
    concurrency = int(_float(env, ENV_CONCURRENCY, 4))
    if concurrency < 1:
        raise ConfigError(f"{ENV_CONCURRENCY}={concurrency} must be at least 1")
    count_sample = int(_float(env, ENV_COUNT_SAMPLE, DEFAULT_COUNT_SAMPLE))
    if count_sample < 0:
        raise ConfigError(f"{ENV_COUNT_SAMPLE}={count_sample} must be 0 (do not count) or a number of requests")
    hit_rate = _float(env, ENV_CACHE_HIT_RATE, DEFAULT_CACHE_HIT_RATE)
    if not 0 <= hit_rate <= 1:
        raise ConfigError(f"{ENV_CACHE_HIT_RATE}={hit_rate} must be a share between 0 and 1, e.g. 0.64")
    return Settings(
        project_dir=pdir,
        profiles_dir=prdir,
        target=target_name,
        root=root,
        warehouse=warehouse.resolve(),
        home=home.resolve(),
        api_key=env.get(ENV_API_KEY) or None,
        base_url=env.get(ENV_BASE_URL) or None,
        poll_interval=poll_interval if poll_interval is not None else _float(env, ENV_POLL_INTERVAL, 30.0),
        # An interval given on the command line is kept as is; otherwise polls back off to 60 s.
        max_poll_interval=poll_interval if poll_interval is not None else 60.0,
        lock_timeout=lock_timeout if lock_timeout is not None else _float(env, ENV_LOCK_TIMEOUT, 30.0),
        concurrency=concurrency,
        prices_file=_path(prices, root) if prices else None,
        retention_days=float(retention) if retention else None,
        memory_limit=_memory(env.get(ENV_MEMORY_LIMIT) or DEFAULT_MEMORY_LIMIT),
        memory_limit_set=bool(env.get(ENV_MEMORY_LIMIT)),
        count_sample=count_sample,
        cache_hit_rate=hit_rate,
    )
