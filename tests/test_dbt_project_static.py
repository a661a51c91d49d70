"""The example dbt project, its seed data and the shipped dbt package, tested without the bridge.

The seed generator must be deterministic and plant the awkward cases the bridge has to cope with.
The dbt project runs for real (dbtRunner in-process, DuckDB in tmp_path) on a copy that keeps the
repository's layout (`dbt_project/`, `profiles/`, `batch_bridge/dbt_package/`): `bb_upstream` builds
the job's staging table, then hand-written result files stand in for the bridge and `bb_downstream`
must join them into the marts.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "dbt_project" / "seeds"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
N_ROWS = 2400
JOB = "review_enrichment"
RESULT_COLUMNS = (
    "review_id VARCHAR, custom_id VARCHAR, status VARCHAR, output_text VARCHAR, output_json JSON, "
    "sentiment VARCHAR, topics VARCHAR[], summary VARCHAR, stop_reason VARCHAR, model VARCHAR, "
    "input_tokens BIGINT, output_tokens BIGINT, cache_creation_input_tokens BIGINT, cache_read_input_tokens BIGINT, "
    "cost_usd DOUBLE, deduplicated BOOLEAN, is_stale BOOLEAN, error_type VARCHAR, error_message VARCHAR, "
    "attempt INTEGER, batch_id VARCHAR, request_custom_id VARCHAR, input_hash VARCHAR, "
    "submitted_at TIMESTAMP, collected_at TIMESTAMP"
)


def _load_make_seeds() -> Any:
    """scripts/ is not a package: load make_seeds.py by path (registered, as dataclasses require)."""
    if "make_seeds" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_seeds", REPO / "scripts" / "make_seeds.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_seeds"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_seeds"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- seed generator


def test_seed_generator_is_deterministic_and_committed_seeds_are_current(tmp_path: Path) -> None:
    make_seeds = _load_make_seeds()
    first, second = tmp_path / "a", tmp_path / "b"
    make_seeds.write(first)
    make_seeds.write(second)
    for name in ("reviews.csv", "products.csv"):
        produced = (first / name).read_bytes()
        assert produced == (second / name).read_bytes(), f"{name} differs between two runs"
        assert produced == (SEEDS / name).read_bytes(), f"dbt_project/seeds/{name} is stale: run `make seeds`"
    make_seeds.write(tmp_path / "other", seed=7)
    assert (tmp_path / "other" / "reviews.csv").read_bytes() != (first / "reviews.csv").read_bytes()


def test_seed_has_the_planted_awkward_cases() -> None:
    rows = _read_csv(SEEDS / "reviews.csv")
    products = _read_csv(SEEDS / "products.csv")
    assert len(rows) == N_ROWS
    assert list(rows[0]) == ["review_id", "product", "rating", "title", "body", "created_at"]

    ids = [r["review_id"] for r in rows]
    id_counts = Counter(i for i in ids if i)
    invalid = [i for i in ids if i and not CUSTOM_ID.match(i)]
    assert len(invalid) == 40
    assert any(len(i) > 64 for i in invalid)
    assert {c for i in invalid for c in i} >= {" ", "/", ".", "#"}
    assert any(not i.isascii() for i in invalid)
    assert sum(1 for i in ids if i == "") == 1  # loads as NULL
    repeated_ids = [i for i, n in id_counts.items() if n > 1]
    assert len(repeated_ids) == 1 and id_counts[repeated_ids[0]] == 2
    twins = [r for r in rows if r["review_id"] == repeated_ids[0]]
    assert twins[0]["body"] != twins[1]["body"]
    assert sum(1 for i in ids if CUSTOM_ID.match(i)) == N_ROWS - 40 - 1

    bodies = [r["body"] for r in rows]
    assert sum(1 for b in bodies if b == "") == 20
    assert sum(1 for b in bodies if b and not b.strip()) == 4
    long_bodies = [b for b in bodies if len(b) >= 8000]
    assert len(long_bodies) == 10 and all(len(b) <= 20000 for b in long_bodies)

    # identical prompts: same product, rating, title and body under different ids
    texts = Counter((r["product"], r["rating"], r["title"], r["body"]) for r in rows if r["body"].strip())
    assert sum(n - 1 for n in texts.values()) == 60
    assert sum(n for n in texts.values() if n > 1) == 100  # 40 originals, each copied once or twice

    everything = "".join(r["title"] + r["body"] for r in rows)
    assert re.search(r"[éèüöñç]", everything), "accented Latin text"
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", everything), "CJK text"
    assert any(ord(c) > 0xFFFF for c in everything), "emoji"
    assert sum(1 for r in rows if not (r["title"] + r["body"]).isascii()) > 200
    assert sum(1 for b in bodies if "\n" in b.strip()) > 100
    assert sum(1 for b in bodies if '"' in b) > 10 and sum(1 for b in bodies if "," in b) > 1000

    assert {r["rating"] for r in rows} == {"1", "2", "3", "4", "5"}
    assert min(r["created_at"] for r in rows) >= "2025-01-01" and max(r["created_at"] for r in rows) < "2027"
    assert len(products) == 25 and len({p["category"] for p in products}) >= 5
    assert {r["product"] for r in rows} <= {p["product"] for p in products}

    # rows the bridge can send: a non-NULL key that appears once, and a non-blank body
    sendable = [r for r in rows if r["review_id"] and id_counts[r["review_id"]] == 1 and r["body"].strip()]
    assert len(sendable) == N_ROWS - 1 - 2 - 24
    stats = _load_make_seeds().stats(_load_make_seeds().generate()[0])
    assert stats["sendable"] == len(sendable)
    assert stats["distinct_sendable_prompts"] == len({(r["product"], r["rating"], r["title"], r["body"]) for r in sendable})


# --------------------------------------------------------------------------- dbt project


def _release_duckdb() -> None:
    """dbt-duckdb keeps the warehouse open after invoke() returns; close it so duckdb can open the file."""
    from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    from dbt.adapters.factory import cleanup_connections

    if DuckDBConnectionManager._ENV is not None:
        DuckDBConnectionManager._ENV.close()
        DuckDBConnectionManager._ENV = None
    cleanup_connections()


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.project_dir = root / "dbt_project"
        self.profiles_dir = root / "profiles"
        self.warehouse = root / "warehouse.duckdb"
        self.home = root / "bb_home"
        self.results = self.home / "results" / JOB / "current.parquet"

    def dbt(self, *args: str) -> Any:
        from dbt.cli.main import dbtRunner

        try:
            res = dbtRunner().invoke(
                [*args, "--project-dir", str(self.project_dir), "--profiles-dir", str(self.profiles_dir), "--quiet"]
            )
        finally:
            _release_duckdb()
        assert res.success, f"dbt {' '.join(args)} failed: {res.exception or res.result}"
        return res

    def query(self, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.warehouse), read_only=True) as con:
            return con.execute(sql).fetchall()

    def show(self, inline_sql: str) -> list[tuple]:
        res = self.dbt("show", "--inline", inline_sql, "--limit", "-1")
        return [tuple(row) for row in res.result.results[0].agate_table.rows]

    def write_results(self, values_sql: str | None) -> None:
        """A stand-in for the bridge's current.parquet, with the DESIGN.md columns (None: an empty file)."""
        self.results.parent.mkdir(parents=True, exist_ok=True)
        names = ", ".join(c.split(" ")[0] for c in RESULT_COLUMNS.split(", "))
        casts = ", ".join(f"CAST({c.split(' ')[0]} AS {c.split(' ', 1)[1]}) AS {c.split(' ')[0]}" for c in RESULT_COLUMNS.split(", "))
        body = f"SELECT * FROM (VALUES {values_sql}) t({names})" if values_sql else f"SELECT * FROM (SELECT NULL AS {names.replace(', ', ', NULL AS ')}) WHERE false"
        with duckdb.connect() as con:
            con.execute(f"COPY (SELECT {casts} FROM ({body})) TO '{self.results}' (FORMAT parquet)")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("target", "logs", "dbt_packages", ".user.yml", "*.duckdb*")
    shutil.copytree(REPO / "dbt_project", root / "dbt_project", ignore=ignore)
    shutil.copytree(REPO / "profiles", root / "profiles", ignore=ignore)
    shutil.copytree(REPO / "batch_bridge" / "dbt_package", root / "batch_bridge" / "dbt_package", ignore=ignore)
    p = Project(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("BATCH_BRIDGE_WAREHOUSE", str(p.warehouse))
        mp.setenv("BATCH_BRIDGE_HOME", str(p.home))
        mp.setenv("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        yield p


def test_parse_declares_the_job_and_the_results_source(project: Project) -> None:
    import json

    project.dbt("parse")
    manifest = json.loads((project.project_dir / "target" / "manifest.json").read_text())
    node = manifest["nodes"]["model.batch_bridge_demo.stg_reviews_to_enrich"]
    declared = yaml.safe_load((project.project_dir / "models" / "staging" / "_staging.yml").read_text())
    expected = next(m for m in declared["models"] if m["name"] == "stg_reviews_to_enrich")["config"]["meta"]["batch_bridge"]
    job = node["config"]["meta"]["batch_bridge"]
    assert job == expected
    assert job["job"] == JOB and job["key"] == "review_id" and job["prompt_column"] == "prompt"
    assert job["model"] == "claude-sonnet-4-5" and job["cache_ttl"] == "1h" and job["max_attempts"] == 3
    schema = job["output_schema"]
    assert schema["required"] == ["sentiment", "topics", "summary"] and schema["additionalProperties"] is False
    assert schema["properties"]["sentiment"]["enum"] == ["positive", "neutral", "negative"]
    assert "batch_bridge" in node["config"]["tags"]

    source = manifest["sources"][f"source.batch_bridge_demo.batch_bridge.{JOB}"]
    location = source["meta"]["external_location"]
    assert location == f"read_parquet('{project.home}/results/{{name}}/current.parquet')"
    assert source["loaded_at_field"] == "collected_at"
    assert source["freshness"]["warn_after"] == {"count": 1, "period": "day"}
    assert source["freshness"]["error_after"] == {"count": 7, "period": "day"}
    macros = {m["name"] for m in manifest["macros"].values()}
    assert {"batch_bridge_latest_succeeded", "batch_bridge_pending", "batch_bridge_results_location", "batch_bridge_results"} <= macros


def test_selectors_split_the_project_around_the_bridge(project: Project) -> None:
    up = set(project.dbt("ls", "--selector", "bb_upstream", "--output", "name").result)
    down = set(project.dbt("ls", "--selector", "bb_downstream", "--output", "name").result)
    assert up == {"reviews", "stg_reviews_to_enrich"}
    assert {"review_insights", "product_sentiment", "stg_reviews", "stg_products", "products"} <= down
    assert f"batch_bridge.{JOB}" in down
    assert {n for n in down if n.startswith("source_")} == {
        "source_not_null_batch_bridge_review_enrichment_review_id",
        "source_accepted_values_batch_bridge_review_enrichment_status__succeeded__errored__canceled__expired__parse_failed",
        "source_accepted_values_batch_bridge_review_enrichment_sentiment__positive__neutral__negative",
    }
    assert not up & down


def test_upstream_builds_the_job_staging_table_without_results(project: Project) -> None:
    assert not project.results.exists()
    project.dbt("build", "--selector", "bb_upstream")
    assert project.query("SELECT count(*), count(review_id), count(DISTINCT review_id), count(prompt) FROM stg_reviews_to_enrich") == [
        (N_ROWS, N_ROWS - 1, N_ROWS - 2, N_ROWS - 24)
    ]
    types = dict(project.query("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'reviews'"))
    assert types == {"review_id": "VARCHAR", "product": "VARCHAR", "rating": "INTEGER", "title": "VARCHAR", "body": "VARCHAR", "created_at": "TIMESTAMP"}
    tables = {t for (t,) in project.query("SELECT table_name FROM information_schema.tables")}
    assert "review_insights" not in tables and "stg_reviews" not in tables

    # Text survives the seed load byte for byte (quotes, newlines, CJK, emoji, 20k-character bodies).
    csv_rows = _read_csv(SEEDS / "reviews.csv")
    loaded = project.query("SELECT review_id, title, body FROM reviews")
    assert Counter((r["review_id"] or None, r["title"] or None, r["body"] or None) for r in csv_rows) == Counter(loaded)

    # The prompt: 60 repeated texts give identical prompts; blank bodies give none.
    assert project.query("SELECT count(prompt) - count(DISTINCT prompt) FROM stg_reviews_to_enrich") == [(60,)]
    (prompt,) = project.query("SELECT prompt FROM stg_reviews_to_enrich WHERE review_id = 'R000002'")[0]
    row = next(r for r in csv_rows if r["review_id"] == "R000002")
    assert prompt == f"Product: {row['product']}\nRating: {row['rating']}/5\nTitle: {row['title']}\n\n{row['body'].strip()}"
    blank = [r["review_id"] for r in csv_rows if not r["body"].strip()]
    assert project.query(f"SELECT count(*) FROM stg_reviews_to_enrich WHERE prompt IS NULL AND review_id IN ({', '.join(repr(i) for i in blank if i)})") == [
        (len([i for i in blank if i]),)
    ]


def test_downstream_reads_an_empty_results_file(project: Project) -> None:
    # Before any answers, the bridge writes an empty file with the result columns.
    project.write_results(None)
    project.dbt("build", "--selector", "bb_downstream")
    assert project.query("SELECT count(*), count(DISTINCT review_id), count(*) FILTER (WHERE is_enriched), count(status) FROM review_insights") == [
        (N_ROWS - 2, N_ROWS - 2, 0, 0)
    ]
    assert project.query("SELECT count(*), sum(reviews), sum(enriched) FROM product_sentiment") == [(25, N_ROWS - 2, 0)]


def test_downstream_joins_results_into_the_marts(project: Project) -> None:
    project.write_results(
        """
        ('R000002', 'R000002', 'succeeded', '{}', '{}', 'negative', ['fit', 'comfort'], 'Too small and gave blisters.', 'end_turn', 'claude-haiku-4-5', 500, 40, 0, 450, 0.0004, false, false, NULL, NULL, 1, 'msgbatch_01', 'R000002', 'h2', TIMESTAMP '2026-01-02 10:00:00', TIMESTAMP '2026-01-02 11:00:00'),
        ('R000003', 'R000003', 'errored', NULL, NULL, NULL, NULL, NULL, NULL, 'claude-haiku-4-5', 0, 0, 0, 0, 0.0, false, false, 'overloaded_error', 'Overloaded', 3, 'msgbatch_01', 'R000003', 'h3', TIMESTAMP '2026-01-02 10:00:00', TIMESTAMP '2026-01-02 11:00:00'),
        ('R000004', 'R000004', 'succeeded', '{}', '{}', 'positive', ['price'], 'Good value.', 'end_turn', 'claude-haiku-4-5', 500, 30, 0, 450, 0.0003, false, true, NULL, NULL, 1, 'msgbatch_01', 'R000004', 'h4', TIMESTAMP '2026-01-02 10:00:00', TIMESTAMP '2026-01-02 11:00:00'),
        ('R000005', 'R000005', 'succeeded', '{}', '{}', 'positive', ['fit', 'Comfort ', 'weight'], 'Light and comfy.', 'end_turn', 'claude-haiku-4-5', 500, 30, 0, 450, 0.0, true, false, NULL, NULL, 1, 'msgbatch_01', 'R000002', 'h5', TIMESTAMP '2026-01-02 10:00:00', TIMESTAMP '2026-01-02 11:00:00')
        """
    )
    project.dbt("build", "--selector", "bb_downstream")
    got = project.query(
        "SELECT review_id, is_enriched, sentiment, topics, summary, status, error_type, cost_usd, is_stale, collected_at IS NOT NULL "
        "FROM review_insights WHERE review_id IN ('R000001', 'R000002', 'R000003', 'R000004', 'R000005') ORDER BY review_id"
    )
    assert got == [
        ("R000001", False, None, None, None, None, None, None, None, False),
        ("R000002", True, "negative", ["fit", "comfort"], "Too small and gave blisters.", "succeeded", None, 0.0004, False, True),
        ("R000003", False, None, None, None, "errored", "overloaded_error", 0.0, False, True),
        ("R000004", False, None, None, None, "succeeded", None, 0.0003, True, True),  # stale: status only
        ("R000005", True, "positive", ["fit", "Comfort ", "weight"], "Light and comfy.", "succeeded", None, 0.0, False, True),
    ]
    assert project.query("SELECT count(*), count(DISTINCT review_id) FROM review_insights") == [(N_ROWS - 2, N_ROWS - 2)]

    # product_sentiment counts what review_insights holds, product by product.
    expected = project.query(
        "SELECT product, count(*), count(*) FILTER (WHERE is_enriched), count(*) FILTER (WHERE sentiment = 'positive'), "
        "count(*) FILTER (WHERE sentiment = 'negative') FROM review_insights GROUP BY product ORDER BY product"
    )
    assert project.query("SELECT product, reviews, enriched, positive, negative FROM product_sentiment ORDER BY product") == expected
    assert sum(e[2] for e in expected) == 2
    (product,) = project.query("SELECT product FROM review_insights WHERE review_id = 'R000002'")[0]
    (product5,) = project.query("SELECT product FROM review_insights WHERE review_id = 'R000005'")[0]
    top = project.query(f"SELECT top_topics, positive_share, negative_share FROM product_sentiment WHERE product = '{product}'")[0]
    if product == product5:  # 'fit' and 'comfort' (normalised) are mentioned twice, 'weight' once
        assert top == (["comfort", "fit", "weight"], 0.5, 0.5)
    else:
        assert top == (["comfort", "fit"], 0.0, 1.0)


def test_package_macros(project: Project) -> None:
    # The results of the previous test are still in place (4 rows, 2 usable answers).
    assert project.show(f"select '{{{{ batch_bridge_results_location('{JOB}') }}}}' as p") == [(str(project.results),)]
    assert project.show(f"select count(*) as n from {{{{ batch_bridge_results('{JOB}') }}}}") == [(4,)]
    assert project.show(
        f"select review_id from ({{{{ batch_bridge_latest_succeeded(source('batch_bridge', '{JOB}')) }}}}) order by 1"
    ) == [("R000002",), ("R000005",)]
    pending = project.show(
        "select count(*) as n, count(*) filter (where review_id in ('R000002', 'R000005')) as answered "
        f"from ({{{{ batch_bridge_pending(ref('stg_reviews_to_enrich'), source('batch_bridge', '{JOB}'), ['review_id']) }}}})"
    )
    assert pending == [(N_ROWS - 2, 0)]
