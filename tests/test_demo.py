"""The example project end to end (issue: the demo a new user runs first), on a temporary copy."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from batch_bridge import api, bridge, dbt_runner
from batch_bridge.config import resolve
from batch_bridge.demo import ANALYST_SQL
from batch_bridge.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_copy(tmp_path):
    """dbt_project/, profiles/ and the shipped dbt package, keeping their relative layout."""
    shutil.copytree(REPO / "dbt_project", tmp_path / "dbt_project",
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    shutil.copytree(REPO / "profiles", tmp_path / "profiles", ignore=shutil.ignore_patterns(".user.yml"))
    shutil.copytree(REPO / "batch_bridge" / "dbt_package", tmp_path / "batch_bridge" / "dbt_package")
    return tmp_path


def settings(root, base_url):
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-test-demo", "ANTHROPIC_BASE_URL": base_url,
           "BATCH_BRIDGE_POLL_INTERVAL": "0.1"}
    env.pop("BATCH_BRIDGE_WAREHOUSE", None)
    env.pop("BATCH_BRIDGE_HOME", None)
    return resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", env=env, cwd=root / "dbt_project")


def test_demo_pipeline_enriches_every_sendable_review_and_rerun_sends_nothing(demo_copy, emulator):
    s = settings(demo_copy, emulator.base_url)
    assert s.warehouse == demo_copy / "warehouse.duckdb"  # the repository-root default
    jobs = bridge.load_jobs(s)
    assert [j.name for j in jobs] == ["review_enrichment"]
    client = api.build_client(s)

    first = run_pipeline(s, jobs, client, wait=True, quiet_dbt=True)
    assert len(first.submitted) == 1
    con = duckdb.connect(str(s.warehouse), read_only=True)
    n, enriched = con.execute("select count(*), count(sentiment) from review_insights").fetchone()
    sendable = con.execute(
        """select count(*) from (select review_id from stg_reviews_to_enrich
           where review_id is not null and prompt is not null and not regexp_full_match(prompt, '\\s*')
           and review_id in (select review_id from stg_reviews_to_enrich group by 1 having count(*) = 1))"""
    ).fetchone()[0]
    bad = con.execute("select count(*) from review_insights where sentiment not in ('positive','neutral','negative')"
                      ).fetchone()[0]
    products = con.execute("select count(*), sum(enriched) from product_sentiment").fetchone()
    con.close()
    assert n == 2398 and enriched == sendable == 2373 and bad == 0
    assert products[0] == 25 and products[1] == enriched

    before = emulator.counters()["create_posts"]
    second = run_pipeline(s, jobs, client, wait=True, quiet_dbt=True)
    assert second.submitted == [] and emulator.counters()["create_posts"] == before

    dbt_runner.invoke(s, ["source", "freshness", "--quiet"])  # raises if stale or failing


def _billed(s):
    con = duckdb.connect()
    try:
        return con.execute(
            "select sum(cost_usd), sum(input_tokens + coalesce(cache_creation_input_tokens, 0) "
            "+ coalesce(cache_read_input_tokens, 0)) "
            f"from read_parquet('{s.results_dir('review_enrichment') / 'current.parquet'}') where not deduplicated"
        ).fetchone()
    finally:
        con.close()


def test_demo_estimates_are_within_15_then_10_percent_of_billed(demo_copy, emulator):
    """The emulator counts with a real tokenizer, answers with varying lengths and hits its cache 70% of the
    time; the plan counts input tokens with count_tokens and must guess the rest before any answer."""
    s = settings(demo_copy, emulator.base_url)
    jobs = bridge.load_jobs(s)
    client = api.build_client(s)
    dbt_runner.invoke(s, ["build", "--selector", "bb_upstream", "--quiet"])
    _, est = bridge.plan(s, jobs, client=client)
    e = est["review_enrichment"]
    assert e.figures["input_tokens"]["method"] == "count_tokens_sample"  # 2,313 requests, 100 counted
    assert 0 < e.figures["input_tokens"]["relative_error"] < 0.02
    assert e.figures["output_tokens"]["method"] == "schema_typical"
    assert e.figures["cache_hit_rate"]["method"] == "expected" and e.cache_read_tokens > 0
    bridge.run(s, jobs, client)
    billed, billed_input = _billed(s)
    assert e.batch_usd == pytest.approx(billed, rel=0.15)
    assert e.input_tokens + e.cache_write_tokens + e.cache_read_tokens == pytest.approx(billed_input, rel=0.05)

    # Every review edited: all rows go again, and the plan now knows this job's answers and cache hits.
    seed = demo_copy / "dbt_project" / "seeds" / "reviews.csv"
    with open(seed, newline="") as f:
        rows = list(csv.reader(f))
    for r in rows[1:]:
        r[4] = r[4] + " Update after a month: my opinion has not changed." if r[4].strip() else r[4]
    with open(seed, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    dbt_runner.invoke(s, ["build", "--selector", "bb_upstream", "--quiet"])
    _, est = bridge.plan(s, jobs, client=client)
    e = est["review_enrichment"]
    assert e.figures["output_tokens"]["method"] == "observed_mean"
    assert e.figures["cache_hit_rate"]["method"] == "observed"
    bridge.run(s, jobs, client)
    billed, billed_input = _billed(s)
    assert e.batch_usd == pytest.approx(billed, rel=0.10)
    assert e.input_tokens + e.cache_write_tokens + e.cache_read_tokens == pytest.approx(billed_input, rel=0.05)


def test_make_demo_entry_point_runs_from_any_directory(tmp_path):
    env = {**os.environ, "BATCH_BRIDGE_WAREHOUSE": str(tmp_path / "wh.duckdb"),
           "BATCH_BRIDGE_HOME": str(tmp_path / "home"), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    r = subprocess.run([sys.executable, "-m", "batch_bridge.demo", "--latency", "0.2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run 1 submitted 1 batch(es); run 2 submitted 0." in r.stdout
    # The emulator's caching is best-effort (70% of lookups hit by default), and the summary shows what it saw.
    hit = re.search(r"prompt cache +([0-9.]+)% of requests read the shared prefix", r.stdout)
    assert hit is not None and 60 <= float(hit.group(1)) <= 80, r.stdout[-2000:]
    # Run 3: five edited reviews through a batch, then with lane auto: synchronously, in the same sync.
    assert "lane batch -> batch 5 answered in " in r.stdout and "lane auto  -> sync  5 answered in " in r.stdout
    assert "review_insights      2,398 reviews, 2,373 with sentiment" in r.stdout
    page = tmp_path / "home" / "report.html"
    assert f"report (rows, cost, batches, errors): {page}" in r.stdout
    assert 'data-metric="review_enrichment.rows.succeeded">2,373<' in page.read_text()
    assert f"duckdb -readonly {tmp_path / 'wh.duckdb'}" in r.stdout
    con = duckdb.connect(str(tmp_path / "wh.duckdb"), read_only=True)
    assert con.execute("select count(*), count(sentiment) from review_insights").fetchone() == (2398, 2373)
    # The SQL the demo shows an analyst runs on the warehouse it names.
    for sql in ANALYST_SQL:
        assert sql in r.stdout and con.execute(sql).fetchall()
