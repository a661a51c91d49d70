"""Paths agree with dbt in every layout users have: the bridge reads the file dbt writes, and dbt reads
the results the bridge writes (issue: drop into any dbt project).

Each layout test builds a `dbt init`-like project, runs the user's own dbt (in-process, from the
directory and with the flags the layout implies, without the bridge's exported paths), then the
bridge's CLI the same way, then dbt again, and checks which DuckDB files exist and what they hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import yaml
from click.testing import CliRunner

from batch_bridge.cli import cli
from batch_bridge.config import resolve
from batch_bridge.dbt_runner import release_duckdb_handles

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROWS = 20
JOB = {
    "job": "item_labels", "key": "item_id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt",
    "output_schema": {"type": "object", "properties": {"label": {"type": "string", "enum": ["good", "bad"]}},
                      "required": ["label"], "additionalProperties": False},
}
MART = """
select s.item_id, a.label
from {{ ref('stg_items') }} s
left join {{ source('batch_bridge', 'item_labels') }} a on a.item_id = s.item_id and a.status = 'succeeded'
"""


def make_project(folder: Path, profile: dict, *, staging_config: str = "") -> Path:
    """A project as `dbt init` lays it out: dbt_project.yml and models/ in `folder`, the profile elsewhere."""
    (folder / "models" / "staging").mkdir(parents=True)
    (folder / "models" / "marts").mkdir(parents=True)
    (folder / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "shop", "version": "1.0.0", "config-version": 2, "profile": "shop",
        "model-paths": ["models"], "models": {"shop": {"+materialized": "table"}},
    }))
    (folder / "models" / "staging" / "stg_items.sql").write_text(
        f"{staging_config}select 'i' || i as item_id, 'item number ' || i as prompt from range({ROWS}) t(i)\n")
    (folder / "models" / "staging" / "_staging.yml").write_text(yaml.safe_dump(
        {"version": 2, "models": [{"name": "stg_items", "config": {"meta": {"batch_bridge": JOB}}}]}, sort_keys=False))
    return folder


def profile(target: dict) -> dict:
    return {"shop": {"target": "dev", "outputs": {"dev": {"type": "duckdb", "threads": 1, **target}}}}


@pytest.fixture
def world(tmp_path, monkeypatch, emulator):
    """A user's machine: HOME in tmp, no bridge variables, the emulator as the API."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("BATCH_BRIDGE_WAREHOUSE", "BATCH_BRIDGE_HOME", "BATCH_BRIDGE_ROOT", "DBT_PROJECT_DIR",
                 "DBT_PROFILES_DIR", "DBT_TARGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-layouts")
    monkeypatch.setenv("BATCH_BRIDGE_POLL_INTERVAL", "0.05")
    monkeypatch.setenv("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    return tmp_path


def user_dbt(monkeypatch, cwd: Path, *args: str) -> None:
    """The user's own `dbt ...`, run from `cwd` (dbt-duckdb resolves relative paths against it)."""
    from dbt.cli.main import dbtRunner

    monkeypatch.chdir(cwd)
    try:
        res = dbtRunner().invoke([*args, "--quiet"])
    finally:
        release_duckdb_handles()
    assert res.success, f"dbt {' '.join(args)}: {res.exception}"


def bridge(monkeypatch, cwd: Path, *args: str) -> dict | str:
    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if "--json" in args else r.output


def duckdb_files(root: Path) -> set[str]:
    """Every DuckDB file under `root` but the bridge's own state."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*.duckdb") if ".batch_bridge" not in p.parts}


def tables(path: Path) -> set[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def labelled(path: Path) -> tuple[int, int]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT count(*), count(label) FROM items_labelled").fetchone()


def round_trip(monkeypatch, project: Path, cwd: Path, dbt_flags: list[str], bridge_flags: list[str]) -> None:
    """dbt builds the staging model; the bridge writes the source YAML, sends and collects; dbt builds the mart."""
    user_dbt(monkeypatch, cwd, "build", "--select", "stg_items", *dbt_flags)
    out = bridge(monkeypatch, cwd, "sources", "--write", str(project / "models" / "sources" / "batch_bridge.yml"),
                 *bridge_flags)
    assert "wrote source 'batch_bridge'" in out
    (project / "models" / "marts" / "items_labelled.sql").write_text(MART)
    run = bridge(monkeypatch, cwd, "run", "--json", *bridge_flags)
    assert run["loaded"] == {"item_labels": ROWS}
    user_dbt(monkeypatch, cwd, "build", "--select", "items_labelled", *dbt_flags)


def test_a_profile_in_the_project_folder(world, monkeypatch):
    shop = make_project(world / "shop", {})
    (shop / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    round_trip(monkeypatch, shop, shop, ["--profiles-dir", "."], ["--profiles-dir", "."])
    assert duckdb_files(world) == {"shop/shop.duckdb"}
    assert labelled(shop / "shop.duckdb") == (ROWS, ROWS)
    current = shop / ".batch_bridge" / "results" / "item_labels" / "current.parquet"
    # The generated source declares exactly the columns and types of the file the bridge published.
    declared = yaml.safe_load((shop / "models" / "sources" / "batch_bridge.yml").read_text())["sources"][0]["tables"][0]
    with duckdb.connect() as con:
        published = [(n, t.lower()) for n, t, *_ in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{current}')").fetchall()]
    assert [(c["name"], c.get("data_type")) for c in declared["columns"]] == published


def test_b_profile_in_home_dbt_and_no_flags(world, monkeypatch):
    shop = make_project(world / "shop", {})
    (world / "home" / ".dbt").mkdir()
    (world / "home" / ".dbt" / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    round_trip(monkeypatch, shop, shop, [], [])
    assert duckdb_files(world) == {"shop/shop.duckdb"}
    assert labelled(shop / "shop.duckdb") == (ROWS, ROWS)


def test_c_this_repositorys_layout(world, monkeypatch):
    """root/dbt_project, root/profiles (this repository's profile, verbatim), the warehouse in root."""
    repo_profile = yaml.safe_load((REPO / "profiles" / "profiles.yml").read_text())["batch_bridge_demo"]
    shop = make_project(world / "dbt_project", {})
    (world / "profiles").mkdir()
    (world / "profiles" / "profiles.yml").write_text(yaml.safe_dump({"shop": repo_profile}))
    round_trip(monkeypatch, shop, shop, ["--profiles-dir", "../profiles"], [])
    assert duckdb_files(world) == {"warehouse.duckdb"}
    assert labelled(world / "warehouse.duckdb") == (ROWS, ROWS)
    assert (world / ".batch_bridge" / "results" / "item_labels" / "current.parquet").is_dir()


def test_d_an_absolute_path_works_from_any_directory(world, monkeypatch):
    shop = make_project(world / "shop", {})
    data = world / "data"
    data.mkdir()
    (world / "home" / ".dbt").mkdir()
    (world / "home" / ".dbt" / "profiles.yml").write_text(yaml.safe_dump(profile({"path": str(data / "wh.duckdb")})))
    # dbt from the project folder; the bridge from elsewhere: an absolute path needs no guessing.
    user_dbt(monkeypatch, shop, "build", "--select", "stg_items")
    bridge(monkeypatch, world, "sources", "--project-dir", str(shop), "--write", str(shop / "models" / "sources" / "bb.yml"))
    (shop / "models" / "marts" / "items_labelled.sql").write_text(MART)
    assert bridge(monkeypatch, world, "run", "--json", "--project-dir", str(shop))["loaded"] == {"item_labels": ROWS}
    user_dbt(monkeypatch, shop, "build", "--select", "items_labelled")
    assert duckdb_files(world) == {"data/wh.duckdb"}
    assert labelled(data / "wh.duckdb") == (ROWS, ROWS)
    assert (data / ".batch_bridge" / "results" / "item_labels" / "current.parquet").is_dir()


def test_e_path_through_env_var(world, monkeypatch):
    shop = make_project(world / "shop", {})
    (world / "home" / ".dbt").mkdir()
    (world / "home" / ".dbt" / "profiles.yml").write_text(
        yaml.safe_dump(profile({"path": "{{ env_var('SHOP_DB', 'default.duckdb') }}"})))
    monkeypatch.setenv("SHOP_DB", "warehouses/shop_dev.duckdb")
    (shop / "warehouses").mkdir()
    round_trip(monkeypatch, shop, shop, [], [])
    assert duckdb_files(world) == {"shop/warehouses/shop_dev.duckdb"}
    assert labelled(shop / "warehouses" / "shop_dev.duckdb") == (ROWS, ROWS)


def test_g_staging_built_into_an_attached_database(world, monkeypatch):
    """The job's staging model lives in an `attach:` database: the bridge reads that file, not the main one."""
    shop = make_project(world / "shop", {}, staging_config="{{ config(database='staging') }}\n")
    (world / "home" / ".dbt").mkdir()
    (world / "home" / ".dbt" / "profiles.yml").write_text(yaml.safe_dump(profile(
        {"path": "shop.duckdb", "attach": [{"path": "staging_area.duckdb", "alias": "staging"}]})))
    round_trip(monkeypatch, shop, shop, [], [])
    assert duckdb_files(world) == {"shop/shop.duckdb", "shop/staging_area.duckdb"}
    assert "stg_items" in tables(shop / "staging_area.duckdb") and "stg_items" not in tables(shop / "shop.duckdb")
    assert labelled(shop / "shop.duckdb") == (ROWS, ROWS)
    s = resolve(project_dir=shop, cwd=shop)
    assert s.database_location("staging") == shop / "staging_area.duckdb"
    assert s.database_location("shop") == shop / "shop.duckdb"


def test_f_motherduck_path_is_passed_through_and_nothing_on_disk_is_needed(world, monkeypatch):
    shop = make_project(world / "shop", {})
    (world / "home" / ".dbt").mkdir()
    (world / "home" / ".dbt" / "profiles.yml").write_text(yaml.safe_dump(profile(
        {"path": "md:shop_prod?motherduck_token={{ env_var('MOTHERDUCK_TOKEN', '') }}",
         "attach": [{"path": "md:shared_staging", "alias": "stg"}]})))
    s = resolve(project_dir=shop, cwd=world)  # even from another directory: nothing relative to resolve
    assert s.warehouse == "md:shop_prod?motherduck_token="
    assert s.database_location("stg") == "md:shared_staging"
    assert s.home == shop / ".batch_bridge"
    assert s.dbt_env()["BATCH_BRIDGE_WAREHOUSE"] == "md:shop_prod?motherduck_token="
    # Commands that need no warehouse work with nothing on disk; the source points at the project's home.
    out = bridge(monkeypatch, shop, "sources")
    (src,) = yaml.safe_load(out)["sources"]
    assert "env_var('BATCH_BRIDGE_HOME', '.batch_bridge')" in src["config"]["meta"] and "name: item_labels" in out
    assert not list(world.rglob("*.duckdb")) and not list(world.rglob("md:*"))


def test_a_relative_path_from_another_directory_is_refused_with_the_fix(world, monkeypatch):
    shop = make_project(world / "shop", {})
    (shop / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    monkeypatch.chdir(world)
    r = CliRunner().invoke(cli, ["plan", "--project-dir", "shop", "--profiles-dir", "shop"])
    assert r.exit_code == 2
    assert "'shop.duckdb'" in r.output and f"cd {shop}" in r.output and "BATCH_BRIDGE_ROOT" in r.output
    assert not list(world.rglob("*.duckdb"))
    # BATCH_BRIDGE_ROOT says where dbt runs: then the bridge knows.
    s = resolve(project_dir=shop, profiles_dir=shop, cwd=world, env={"BATCH_BRIDGE_ROOT": str(shop)})
    assert s.warehouse == shop / "shop.duckdb" and s.home == shop / ".batch_bridge"
    s = resolve(project_dir=shop, profiles_dir=shop, cwd=world, env={"BATCH_BRIDGE_ROOT": str(world)})
    assert s.warehouse == world / "shop.duckdb"


def test_the_profile_dbt_reads_comes_before_places_dbt_never_looks(tmp_path):
    """dbt reads ./profiles.yml, else ~/.dbt: a ../profiles beside the project, which dbt never reads,
    must not win over ~/.dbt, or the bridge would read another warehouse than dbt."""
    shop = make_project(tmp_path / "shop", {})
    home = tmp_path / "home"
    (home / ".dbt").mkdir(parents=True)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "stale.duckdb"})))
    (home / ".dbt" / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    s = resolve(cwd=shop, env={"HOME": str(home)})
    assert (s.profiles_dir, s.warehouse) == (home / ".dbt", shop / "shop.duckdb")
    # A profiles.yml in the directory dbt runs in comes first, as in dbt.
    (shop / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "here.duckdb"})))
    assert resolve(cwd=shop, env={"HOME": str(home)}).warehouse == shop / "here.duckdb"
    # Where dbt's own places lack the project's profile (dbt itself would fail), ../profiles serves
    # the bridge's own dbt runs, which pass it explicitly.
    (shop / "profiles.yml").unlink()
    (home / ".dbt" / "profiles.yml").write_text(yaml.safe_dump({"other_project": profile({})["shop"]}))
    s = resolve(cwd=shop, env={"HOME": str(home)})
    assert (s.profiles_dir, s.warehouse) == (tmp_path / "profiles", shop / "stale.duckdb")


def test_dbt_run_by_the_bridge_runs_where_batch_bridge_root_says(world, monkeypatch):
    """`batch-bridge dbt` (and `pipeline`) started in another folder, with BATCH_BRIDGE_ROOT naming the
    folder dbt runs in: dbt opens the profile's relative path there, where the bridge reads it."""
    shop = make_project(world / "shop", {})
    (shop / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    elsewhere = world / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("BATCH_BRIDGE_ROOT", str(shop))
    r = CliRunner().invoke(cli, ["dbt", "--project-dir", str(shop), "--profiles-dir", str(shop),
                                 "build", "--select", "stg_items"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert duckdb_files(world) == {"shop/shop.duckdb"}
    assert "stg_items" in tables(shop / "shop.duckdb")
    assert Path.cwd() == elsewhere
    out = CliRunner().invoke(cli, ["plan", "--json", "--project-dir", str(shop), "--profiles-dir", str(shop)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["jobs"][0]["rows_to_send"] == ROWS


def test_sources_write_works_when_a_mart_reads_the_source_before_it_exists(world, monkeypatch):
    """A job and the mart that reads its answers added together: dbt cannot parse the project until the
    source is declared, and the bridge (which parses the project to find the jobs) writes it anyway."""
    shop = make_project(world / "shop", {})
    (shop / "profiles.yml").write_text(yaml.safe_dump(profile({"path": "shop.duckdb"})))
    (shop / "models" / "marts" / "items_labelled.sql").write_text(MART)
    target = shop / "models" / "sources" / "batch_bridge.yml"
    # Another reason not to parse, found once the source is declared: dbt's error, the file as it was.
    (shop / "models" / "marts" / "broken.sql").write_text("select * from {{ ref('no_such_model') }}\n")
    monkeypatch.chdir(shop)
    r = CliRunner().invoke(cli, ["sources", "--write", str(target)])
    assert r.exit_code == 2 and "no_such_model" in r.output, r.output
    assert not target.exists()
    (shop / "models" / "marts" / "broken.sql").write_text(
        "select * from {{ source('batch_bridge', 'item_lables') }}\n")  # a typo: no such job
    r = CliRunner().invoke(cli, ["sources", "--write", str(target)])
    assert r.exit_code == 0, r.output
    assert "source('batch_bridge', 'item_lables'), and no job is named 'item_lables'" in r.output
    (table,) = yaml.safe_load(target.read_text())["sources"][0]["tables"]
    assert table["name"] == "item_labels" and "item_id" in [c["name"] for c in table["columns"]]
    (shop / "models" / "marts" / "broken.sql").unlink()
    user_dbt(monkeypatch, shop, "build", "--select", "stg_items")
    assert bridge(monkeypatch, shop, "run", "--json")["loaded"] == {"item_labels": ROWS}
    user_dbt(monkeypatch, shop, "build", "--select", "items_labelled")
    assert labelled(shop / "shop.duckdb") == (ROWS, ROWS)


def test_profile_env_var_calls_render_as_jinja_renders_them():
    """Plain `env_var()` calls are rendered without jinja2; anything else goes through it. Either way the
    value is Jinja's own rendering of the profile string."""
    import jinja2

    from batch_bridge.config import ConfigError, _render_env

    env = {"SHOP_DB": "warehouses/shop.duckdb", "TOKEN": "abc{{x}}", "EMPTY": ""}

    def jinja(text: str) -> str:
        def env_var(name, default=None):
            if name in env:
                return env[name]
            if default is None:
                raise KeyError(name)
            return default
        return jinja2.Environment().from_string(text).render(env_var=env_var)

    texts = [
        "{{ env_var('SHOP_DB') }}", '{{env_var("SHOP_DB")}}', "{{ env_var('MISSING', 'default.duckdb') }}",
        "md:shop?motherduck_token={{ env_var('TOKEN', '') }}&x={{ env_var( 'EMPTY' , \"d\" ) }}",
        "{{ env_var('SHOP_DB') }}\n", "a {{ env_var('SHOP_DB') }}  b\n\n",
        # Not plain: whitespace control, filters, expressions, statements, comments (rendered by jinja2).
        "x  {{- env_var('SHOP_DB') -}}  y", "{{ env_var('MISSING', 'a') | upper }}", "{{ env_var('SHOP_DB') ~ '.bak' }}",
        "{% if true %}{{ env_var('SHOP_DB') }}{% endif %}", "{# note #}{{ env_var('SHOP_DB') }}", "{{ 'it\\'s' }}",
    ]
    for text in texts:
        assert _render_env(text, env) == jinja(text), text
    with pytest.raises(ConfigError, match="MISSING"):
        _render_env("{{ env_var('MISSING') }}", env)


def test_a_plain_env_var_profile_is_rendered_without_importing_jinja2():
    import subprocess
    import sys

    code = ("import sys\nfrom batch_bridge.config import _render_env\n"
            "assert _render_env(\"{{ env_var('NOPE', 'wh.duckdb') }}\", {}) == 'wh.duckdb'\n"
            "print('jinja2' in sys.modules)\n"
            "_render_env(\"{{ env_var('NOPE', 'wh') | upper }}\", {})\n"
            "print('jinja2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
