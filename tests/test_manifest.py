"""The bridge reads dbt's own fresh manifest instead of parsing the project again (a cold run after a
`dbt build` pays no second parse), and parses whenever it cannot vouch for that manifest."""

from __future__ import annotations

import os
import time

import yaml

from batch_bridge import bridge
from batch_bridge.dbt_runner import invoke, load_manifest
from helpers import PROFILE, settings_for, write_project

META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 50, "prompt_column": "prompt"}


def own_parse(s) -> bool:
    return (s.dbt_target_path / "manifest.json").is_file()


def test_a_fresh_dbt_manifest_of_this_target_is_read_and_a_stale_one_is_not(tmp_path):
    write_project(tmp_path, META)
    s = settings_for(tmp_path)
    invoke(s, ["parse", "--quiet"])  # what `dbt build` leaves in the project's target/
    assert (s.project_dir / "target" / "manifest.json").is_file()
    jobs = bridge.load_jobs(s)
    assert [j.name for j in jobs] == ["items"] and jobs[0].relation.identifier == "stg_items"
    assert not own_parse(s)  # no second parse
    # The project changed after dbt's manifest: the bridge parses (and so sees the change).
    time.sleep(0.01)
    schema = s.project_dir / "models" / "schema.yml"
    doc = yaml.safe_load(schema.read_text())
    doc["models"][0]["config"]["meta"]["batch_bridge"]["max_tokens"] = 77
    schema.write_text(yaml.safe_dump(doc, sort_keys=False))
    later = time.time() + 1
    os.utime(schema, (later, later))
    jobs = bridge.load_jobs(s)
    assert own_parse(s) and jobs[0].max_tokens == 77


def test_a_manifest_built_for_another_target_is_not_trusted(tmp_path):
    write_project(tmp_path, META)
    profile = {"bb_test": {**PROFILE["bb_test"], "outputs": {
        **PROFILE["bb_test"]["outputs"],
        "other": {**PROFILE["bb_test"]["outputs"]["dev"], "schema": "analytics"}}}}
    (tmp_path / "profiles" / "profiles.yml").write_text(yaml.safe_dump(profile))
    s = settings_for(tmp_path)
    invoke(s.with_(target="other"), ["parse", "--quiet"])  # dbt ran for target `other` (schema analytics)
    manifest = load_manifest(s)  # the bridge's target is dev (schema main): it parses for itself
    assert own_parse(s)
    node = next(n for n in manifest["nodes"].values() if n["name"] == "stg_items")
    assert node["schema"] == "main"


def _newer_than_dbt(s) -> None:
    """Leave the file clock past dbt's manifest (a change in the same tick would be in doubt)."""
    written = (s.project_dir / "target" / "manifest.json").stat().st_mtime
    while time.time() <= written + 0.02:
        time.sleep(0.01)


def test_a_job_whose_files_were_removed_after_dbt_wrote_its_manifest_is_gone(tmp_path):
    write_project(tmp_path, META)
    models = tmp_path / "dbt_project" / "models"
    (models / "stg_other.sql").write_text("select 1 as id, 'x' as prompt\n")
    (models / "other.yml").write_text(yaml.safe_dump({"version": 2, "models": [
        {"name": "stg_other", "config": {"meta": {"batch_bridge": {**META, "job": "other"}}}}]}))
    s = settings_for(tmp_path)
    invoke(s, ["parse", "--quiet"])
    assert sorted(j.name for j in bridge.load_jobs(s)) == ["items", "other"] and not own_parse(s)
    _newer_than_dbt(s)
    (models / "stg_other.sql").unlink()  # no file left is newer than dbt's manifest; the directory is
    (models / "other.yml").unlink()
    assert [j.name for j in bridge.load_jobs(s)] == ["items"] and own_parse(s)


def test_a_file_copied_in_with_its_older_time_kept_is_seen(tmp_path):
    """`rsync -a`, `cp -p` and `tar x` keep a file's mtime; its ctime is the copy's."""
    write_project(tmp_path, META)
    s = settings_for(tmp_path)
    invoke(s, ["parse", "--quiet"])
    assert bridge.load_jobs(s)[0].max_tokens == 50
    _newer_than_dbt(s)
    schema = s.project_dir / "models" / "schema.yml"
    doc = yaml.safe_load(schema.read_text())
    doc["models"][0]["config"]["meta"]["batch_bridge"]["max_tokens"] = 77
    schema.write_text(yaml.safe_dump(doc, sort_keys=False))
    an_hour_ago = time.time() - 3600
    os.utime(schema, (an_hour_ago, an_hour_ago))
    assert bridge.load_jobs(s)[0].max_tokens == 77


def test_the_bridges_own_parse_follows_the_profile_and_the_environment_it_reads(tmp_path, monkeypatch):
    write_project(tmp_path, META)
    outputs = PROFILE["bb_test"]["outputs"]
    profile = tmp_path / "profiles" / "profiles.yml"
    profile.write_text(yaml.safe_dump({"bb_test": {**PROFILE["bb_test"], "outputs": {
        "dev": {**outputs["dev"], "schema": "{{ env_var('BB_TEST_SCHEMA', 'main') }}"}}}}))
    monkeypatch.delenv("BB_TEST_SCHEMA", raising=False)
    s = settings_for(tmp_path)
    assert bridge.load_jobs(s)[0].relation.schema == "main" and own_parse(s)  # no dbt manifest: its own parse
    monkeypatch.setenv("BB_TEST_SCHEMA", "analytics")  # no file changed
    assert bridge.load_jobs(s)[0].relation.schema == "analytics"
    time.sleep(0.02)
    profile.write_text(yaml.safe_dump({"bb_test": {**PROFILE["bb_test"], "outputs": {
        "dev": {**outputs["dev"], "schema": "marts"}}}}))
    assert bridge.load_jobs(s)[0].relation.schema == "marts"
    stamp = (s.dbt_target_path / "batch_bridge_parse.json").read_text()
    assert "analytics" not in stamp  # the environment is kept as a digest: such variables hold credentials


def test_what_dbt_and_the_warehouse_write_while_dbt_runs_leaves_its_manifest_trusted(tmp_path):
    """Only what dbt parses is watched: a warehouse (and its WAL) in the project directory, dbt's logs
    and its compiled files under a custom target-path change after dbt wrote its manifest."""
    project = write_project(tmp_path, META)
    doc = yaml.safe_load((project / "dbt_project.yml").read_text())
    (project / "dbt_project.yml").write_text(yaml.safe_dump({**doc, "target-path": "build"}))
    s = settings_for(tmp_path, BATCH_BRIDGE_WAREHOUSE=str(project / "warehouse.duckdb"))
    invoke(s, ["parse", "--quiet"])
    time.sleep(0.02)
    (project / "warehouse.duckdb.wal").write_text("")
    (project / "warehouse.duckdb.wal").unlink()
    (project / "build" / "compiled").mkdir(parents=True)
    (project / "build" / "compiled" / "stg_items.sql").write_text("select 1")
    (project / "logs").mkdir(exist_ok=True)
    (project / "logs" / "dbt.log").write_text("done")
    assert [j.name for j in bridge.load_jobs(s)] == ["items"]
    assert not own_parse(s)


def test_a_change_in_a_local_package_is_seen(tmp_path):
    """A `local:` package is parsed with the project (dbt_packages/ holds only a link to it)."""
    project = write_project(tmp_path, META)
    pkg = tmp_path / "shared"
    (pkg / "models").mkdir(parents=True)
    (pkg / "dbt_project.yml").write_text(yaml.safe_dump({"name": "shared", "version": "1.0.0", "config-version": 2}))
    (pkg / "models" / "stg_shared.sql").write_text("select 1 as id, 'x' as prompt\n")
    shared = pkg / "models" / "shared.yml"
    shared.write_text(yaml.safe_dump({"version": 2, "models": [
        {"name": "stg_shared", "config": {"meta": {"batch_bridge": {**META, "job": "shared"}}}}]}))
    (project / "packages.yml").write_text(yaml.safe_dump({"packages": [{"local": "../shared"}]}))
    s = settings_for(tmp_path)
    invoke(s, ["deps"])
    invoke(s, ["parse", "--quiet"])
    assert {j.name: j.max_tokens for j in bridge.load_jobs(s)} == {"items": 50, "shared": 50} and not own_parse(s)
    _newer_than_dbt(s)
    doc = yaml.safe_load(shared.read_text())
    doc["models"][0]["config"]["meta"]["batch_bridge"]["max_tokens"] = 9
    shared.write_text(yaml.safe_dump(doc))
    assert {j.name: j.max_tokens for j in bridge.load_jobs(s)} == {"items": 50, "shared": 9}


def test_resource_paths_dbt_renders_from_the_environment_leave_its_manifest_untrusted(tmp_path):
    """Which folders dbt parsed then depends on the environment it ran in: the bridge parses itself."""
    project = write_project(tmp_path, META)
    doc = yaml.safe_load((project / "dbt_project.yml").read_text())
    (project / "dbt_project.yml").write_text(yaml.safe_dump(
        {**doc, "model-paths": ["{{ env_var('BB_TEST_MODELS', 'models') }}"]}))
    s = settings_for(tmp_path)
    invoke(s, ["parse", "--quiet"])
    assert [j.name for j in bridge.load_jobs(s)] == ["items"]
    assert own_parse(s)
