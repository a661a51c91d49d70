"""`batch-bridge sources`: the generated dbt source, and `--write` rewriting only its own block.

The jobs come from manifest-shaped nodes and the settings from a real profile on disk; no dbt run is
needed to generate the YAML (the end-to-end use is in test_layouts.py and test_install.py).
"""

from __future__ import annotations

import jinja2.nativetypes
import pytest
import yaml

from batch_bridge import sources
from batch_bridge.config import resolve
from batch_bridge.errors import ConfigError
from batch_bridge.jobs import parse_job
from batch_bridge.results import COLUMNS_AFTER_KEYS, RESULT_STATUSES

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tone", "tags"], "properties": {
    "tone": {"type": "string", "enum": ["calm", "angry"], "description": "How the writer sounds."},
    "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "integer"},
}}


def job(name="notes", key=("shop", "note_id"), schema=SCHEMA):
    return parse_job({"unique_id": f"model.p.stg_{name}", "name": f"stg_{name}", "database": "p", "schema": "main",
                      "config": {"meta": {"batch_bridge": {"job": name, "key": list(key), "model": "claude-haiku-4-5",
                                                           "max_tokens": 20, "prompt_column": "prompt",
                                                           "output_schema": schema}}}})


@pytest.fixture
def settings(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "dbt_project.yml").write_text("name: p\nversion: '1.0.0'\nconfig-version: 2\nprofile: p\n")
    (project / "profiles.yml").write_text(yaml.safe_dump(
        {"p": {"target": "dev", "outputs": {"dev": {"type": "duckdb", "path": "p.duckdb"}}}}))
    return resolve(project_dir=project, profiles_dir=project, cwd=project, env={})


def test_one_table_per_job_with_every_published_column_typed_tests_and_freshness(settings):
    doc = yaml.safe_load(sources.render(settings, [job(), job("memos", key=("memo_id",), schema=None)]))
    (src,) = doc["sources"]
    assert src["name"] == "batch_bridge"
    assert src["config"]["loaded_at_field"] == "collected_at"
    assert src["config"]["freshness"]["warn_after"] == {"count": 1, "period": "day"}
    # One Jinja expression serves both ways of running: dbt renders it per target (natively, to a dict).
    render = jinja2.nativetypes.NativeEnvironment().from_string(src["config"]["meta"]).render
    env_var = lambda name, default=None: default  # noqa: E731 - BATCH_BRIDGE_HOME unset
    assert render(env_var=env_var, target={"type": "duckdb"}) == {
        "external_location": "read_parquet('.batch_bridge/results/{name}/current.parquet')"}
    plugin = {"type": "duckdb", "plugins": [{"module": "batch_bridge.dbt_plugin", "alias": "batch_bridge"}]}
    assert render(env_var=env_var, target=plugin) == {"plugin": "batch_bridge"}
    notes, memos = src["tables"]
    cols = {c["name"]: c for c in notes["columns"]}
    assert list(cols) == ["shop", "note_id", *COLUMNS_AFTER_KEYS[:4], "tone", "tags", "score", *COLUMNS_AFTER_KEYS[4:]]
    assert all(c["description"] for c in cols.values())
    assert "data_type" not in cols["shop"]  # no state and no warehouse yet: the key's type is not known
    assert (cols["tone"]["data_type"], cols["tags"]["data_type"], cols["score"]["data_type"]) == ("varchar", "varchar[]", "bigint")
    assert cols["collected_at"]["data_type"] == "timestamp" and cols["cost_usd"]["data_type"] == "double"
    assert cols["tone"]["description"].startswith("How the writer sounds.")
    assert cols["shop"]["data_tests"] == ["not_null"] == cols["note_id"]["data_tests"]
    assert cols["status"]["data_tests"] == [{"accepted_values": {"arguments": {"values": list(RESULT_STATUSES)}}}]
    assert cols["tone"]["data_tests"] == [{"accepted_values": {"arguments": {"values": ["calm", "angry"]}}}]
    assert "data_tests" not in cols["tags"]
    assert [c["name"] for c in memos["columns"]] == ["memo_id", *COLUMNS_AFTER_KEYS]


def test_write_owns_only_its_block_and_leaves_the_users_yaml_as_it_was(settings, tmp_path):
    path = settings.project_dir / "models" / "sources.yml"
    path.parent.mkdir()
    mine_before = "version: 2\n\n# the team's raw data\nsources:\n- name: raw\n  tables:\n  - name: orders  # from the shop\n"
    mine_after = "\nmodels:\n- name: stg_notes\n  description: kept as written\n"
    path.write_text(mine_before + mine_after)
    assert sources.write(settings, [job()], path)
    text = path.read_text()
    assert text.startswith("version: 2\n\n# the team's raw data\nsources:\n") and text.endswith(mine_after)
    assert "- name: raw\n  tables:\n  - name: orders  # from the shop\n" in text
    doc = yaml.safe_load(text)
    assert [s["name"] for s in doc["sources"]] == ["batch_bridge", "raw"] and doc["models"][0]["name"] == "stg_notes"

    assert not sources.write(settings, [job()], path)  # nothing changed: the file is not touched
    changed = {**SCHEMA, "properties": {**SCHEMA["properties"], "tone": {"type": "string", "enum": ["calm", "angry", "glad"]}}}
    assert sources.write(settings, [job(schema=changed)], path)
    after = path.read_text()
    outside = lambda t: t[: t.index(sources.BEGIN)] + t[t.index(sources.END):]  # noqa: E731
    assert outside(after) == outside(text) and "glad" in after


def test_write_refuses_to_clobber_a_source_it_did_not_write(settings, tmp_path):
    path = tmp_path / "mixed.yml"
    path.write_text("sources:\n  - name: batch_bridge\n  - name: raw\nmodels:\n  - name: x\n")
    with pytest.raises(ConfigError, match="did not write") as e:
        sources.write(settings, [job()], path)
    assert "--source-name" in e.value.hint
    assert sources.write(settings, [job()], path, name="answers")  # under another name it goes in beside them
    assert [s["name"] for s in yaml.safe_load(path.read_text())["sources"]] == ["answers", "batch_bridge", "raw"]

    damaged = tmp_path / "damaged.yml"
    damaged.write_text(sources.render(settings, [job()]).replace(sources.END, ""))
    with pytest.raises(ConfigError, match="markers are damaged"):
        sources.write(settings, [job()], damaged)


def test_a_hand_written_file_of_the_source_alone_is_taken_over(settings, tmp_path):
    path = tmp_path / "batch_bridge_sources.yml"
    path.write_text("version: 2\nsources:\n  - name: batch_bridge\n    tables:\n      - name: notes\n")
    assert sources.write(settings, [job()], path)
    assert path.read_text() == sources.render(settings, [job()])
