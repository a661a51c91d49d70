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
