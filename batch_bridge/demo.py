"""`make demo` / `python -m batch_bridge.demo`: the example project end to end on the local emulator.

Starts the emulator on a free port in a subprocess, runs the pipeline (dbt build upstream -> submit,
wait, collect -> dbt build downstream), prints a summary, runs the pipeline again to show that nothing
is resent, edits a few reviews and answers them through a batch and through lane `auto` (synchronous
calls) to show the latency gained, and stops the emulator even on failure. Uses this repository's `dbt_project/` and
`profiles/`, a fresh `warehouse.duckdb` and `.batch_bridge/` in the repository root (or wherever
BATCH_BRIDGE_WAREHOUSE / BATCH_BRIDGE_HOME point).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import duckdb

DEMO_KEY = "sk-demo-not-a-real-key"


def repo_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    if not (here / "dbt_project" / "dbt_project.yml").is_file():
        raise SystemExit(f"the demo needs the repository checkout (dbt_project/ next to {here}); run it from a clone")
    return here


def start_emulator(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_bridge.emulator", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("http"):
        proc.kill()
        raise SystemExit(f"the emulator did not start (first line: {line!r})")
    return proc, line


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_fresh(settings, label: str) -> None:
    """Remove the demo's warehouse (and its WAL) and bridge home, so it runs from nothing."""
    say(f"{label}: starting fresh ({settings.warehouse.name} and {settings.home.name}/ removed)")
    settings.warehouse.unlink(missing_ok=True)
    Path(str(settings.warehouse) + ".wal").unlink(missing_ok=True)
    shutil.rmtree(settings.home, ignore_errors=True)


def say(msg: str) -> None:
    click.secho(msg, fg="cyan", bold=True, err=True)


def summary(settings, job_names: list[str]) -> dict:
    from . import state, status
    from .pricing import load_prices
    from .report_data import sync_usd_same_tokens

    book = load_prices(settings.prices_file)
    with state.connect(settings) as con:
        jobs = status.jobs_summary(con, job_names)
        batches = status.batches(con, job_names)
    out = {"jobs": jobs, "batches": len(batches)}
    con = duckdb.connect()
    try:
        for j in jobs:
            j["sync_usd_same_tokens"] = sync_usd_same_tokens(j, book)
            # Naive: one synchronous call per enriched row, no prompt caching, no deduplication.
            rows = con.execute(
                "SELECT model, coalesce(input_tokens, 0) + coalesce(cache_creation_input_tokens, 0) "
                "+ coalesce(cache_read_input_tokens, 0), coalesce(output_tokens, 0) "
                f"FROM read_parquet('{settings.results_dir(j['job']) / 'current.parquet'}') WHERE status = 'succeeded'"
            ).fetchall()
            naive = [book.cost(m, input_tokens=i, output_tokens=o, batch=False) for m, i, o in rows]
            j["naive_sync_usd"] = None if any(x is None for x in naive) else sum(naive)
            # Caching in batches is best-effort: the share of requests that read the shared prefix from cache.
            j["cache_hit_rate"] = con.execute(
                "SELECT avg(CASE WHEN coalesce(cache_read_input_tokens, 0) > 0 THEN 1.0 ELSE 0.0 END) "
                f"FROM read_parquet('{settings.results_dir(j['job']) / 'current.parquet'}') "
                "WHERE status = 'succeeded' AND NOT deduplicated "
                "AND coalesce(cache_read_input_tokens, 0) + coalesce(cache_creation_input_tokens, 0) > 0"
            ).fetchone()[0]
    finally:
        con.close()
    return out


def print_summary(data: dict, settings) -> None:
    click.echo("")
    click.echo("=" * 72)
    for j in data["jobs"]:
        r, t = j["rows"], j["tokens"]
        click.echo(f"job {j['job']}")
        click.echo(f"  rows enriched        {r['succeeded']:,}  (in flight {r['in_flight']:,}, failed {r['failed']:,})")
        click.echo(f"  batches              {data['batches']}")
        click.echo(f"  tokens               input {t['input']:,}, output {t['output']:,}, "
                   f"cache write {t['cache_write']:,}, cache read {t['cache_read']:,}")
        if j.get("cache_hit_rate") is not None:
            click.echo(f"  prompt cache         {j['cache_hit_rate']:.1%} of requests read the shared prefix from cache "
                       "(best-effort in batches; the rest wrote it again), priced in the cost below")
        cost = j["cost_usd_known_part"] or 0.0
        click.echo(f"  cost                 ${cost:,.4f} at batch prices; ${j['sync_usd_same_tokens']:,.4f} for the "
                   "same tokens synchronously")
        if j.get("naive_sync_usd"):
            click.echo(f"  naive synchronous    ${j['naive_sync_usd']:,.4f} (one call per row, no caching, no dedupe): "
                       f"batch_bridge costs {cost / j['naive_sync_usd']:.2f}x of that")
        if j.get("dedupe"):
            d = j["dedupe"]
            click.echo(f"  deduplicated         {d['rows']:,} rows answered by another row's request "
                       f"(saved ${d['saved_usd']:,.4f})")
        if j["not_sent"]:
            click.echo("  rows not sent")
            for reason, v in j["not_sent"].items():
                click.echo(f"    {reason:<20} {v['rows']:>5,}  {v['why']}")
    con = duckdb.connect(str(settings.warehouse), read_only=True)
    try:
        n, enriched = con.execute("select count(*), count(sentiment) from review_insights").fetchone()
        top = con.execute(
            "select product, reviews, enriched, positive, negative from product_sentiment order by reviews desc limit 5"
        ).fetchall()
    finally:
        con.close()
    click.echo(f"  review_insights      {n:,} reviews, {enriched:,} with sentiment")
    click.echo("  product_sentiment (top 5 by reviews): product, reviews, enriched, positive, negative")
    for row in top:
        click.echo("    " + ", ".join(str(x) for x in row))
    click.echo("=" * 72)


def edit_reviews(settings, job, n: int, mark: str) -> list:
    """Edit the prompts of `n` answered reviews in the staging table, as a day's edits would."""
    con = duckdb.connect(str(settings.warehouse))
    try:
        rel, key, col = job.relation.sql(), job.key[0], job.prompt_column
        keys = [r[0] for r in con.execute(
            f'SELECT "{key}" FROM {rel} WHERE NOT regexp_full_match(coalesce("{col}", \'\'), \'\\s*\') '
            f'GROUP BY 1 HAVING count(*) = 1 ORDER BY 1 LIMIT {int(n)} OFFSET 7').fetchall()]
        con.execute(f'UPDATE {rel} SET "{col}" = "{col}" || ? WHERE list_contains(?, "{key}")', [mark, keys])
    finally:
        con.close()
    return keys


def edited_reviews_by_lane(settings, jobs, client, n: int = 5) -> dict:
    """A few reviews edited, answered by `auto` (synchronously, within one `sync`) and, for comparison,
    the same number of other edits through a batch (`run --lane batch`): seconds and cost of each."""
    from . import bridge, state, status
    from .jobs import with_lane

    out: dict = {}
    for lane, mark in (("batch", " (edited: delivery was late)"), ("auto", " (edited: works well after an update)")):
        edit_reviews(settings, jobs[0], n, mark)
        with state.connect(settings) as con:
            before = status.lanes_summary(con, jobs[0].name)
        started = time.monotonic()
        if lane == "auto":
            bridge.sync(settings, with_lane(jobs, lane), client)
        else:
            bridge.run(settings, with_lane(jobs, lane), client)
        seconds = time.monotonic() - started
        with state.connect(settings) as con:
            after = status.lanes_summary(con, jobs[0].name)
        went = "sync" if lane == "auto" else "batch"
        out[lane] = {"lane": went, "seconds": seconds,
                     "answered": after[went]["billed_requests"] - before[went]["billed_requests"],
                     "cost_usd": (after[went]["cost_usd"] or 0.0) - (before[went]["cost_usd"] or 0.0)}
    return out


ANALYST_SQL = (
    "select product, reviews, enriched, positive, negative from product_sentiment order by reviews desc;",
    "select review_id, sentiment, topics, summary from review_insights where sentiment = 'negative' limit 10;",
)


def query_hint(warehouse: Path | str) -> str:
    """How to look at the marts: the SQL an analyst types, in the DuckDB CLI, any SQL client, or Python."""
    sql = "\n".join(f"    {q}" for q in ANALYST_SQL)
    return (
        f"  in the DuckDB command line (https://duckdb.org/docs/installation):  duckdb -readonly {warehouse}\n"
        f"  or any SQL client with a DuckDB driver (DBeaver, DataGrip, ...): open {warehouse} read-only, then:\n"
        f"{sql}\n"
        "  (a session holding the file, even read-only, keeps dbt and batch-bridge out: close it before they run)\n"
        f"  or from Python:  .venv/bin/python -c \"import duckdb; print(duckdb.connect('{warehouse}', read_only=True)"
        ".sql('select count(*), count(sentiment) from review_insights'))\""
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--latency", default=2.0, show_default=True, help="seconds each batch stays in_progress on the emulator")
@click.option("--keep", is_flag=True, help="keep the previous warehouse and bridge state instead of starting fresh")
def main(latency: float, keep: bool) -> None:
    """Run the example project end to end on the local emulator, twice."""
    from .api import build_client
    from .bridge import load_jobs
    from .config import resolve
    from .pipeline import run_pipeline
    from .cli import StderrProgress

    root = repo_root()
    os.environ.setdefault("BATCH_BRIDGE_WAREHOUSE", str(root / "warehouse.duckdb"))
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    settings = resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles")
    if not keep:
        start_fresh(settings, "demo")
    proc, url = start_emulator(latency)
    say(f"demo: emulator at {url} (latency {latency:g}s)")
    started = time.monotonic()
    try:
        os.environ["ANTHROPIC_BASE_URL"] = url
        os.environ["ANTHROPIC_API_KEY"] = DEMO_KEY
        settings = resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", poll_interval=1.0)
        jobs = load_jobs(settings)
        client = build_client(settings)
        progress = StderrProgress()
        say("demo: run 1 - dbt build, submit, wait, collect, dbt build")
        first = run_pipeline(settings, jobs, client, wait=True, progress=progress, quiet_dbt=True)
        print_summary(summary(settings, [j.name for j in jobs]), settings)
        say("demo: run 2 - the same pipeline again: nothing changed, so nothing is sent")
        second = run_pipeline(settings, jobs, client, wait=True, progress=progress, quiet_dbt=True)
        click.echo(f"run 1 submitted {len(first.submitted)} batch(es); run 2 submitted {len(second.submitted)}.")
        if second.submitted:
            raise SystemExit("unexpected: the second run submitted batches")
        say("demo: run 3 - 5 reviews edited twice: once sent as a batch, once with lane auto (synchronous)")
        lanes = edited_reviews_by_lane(settings, jobs, client)
        for lane, v in lanes.items():
            click.echo(f"  lane {lane:<5} -> {v['lane']:<5} {v['answered']} answered in {v['seconds']:.1f}s "
                       f"for ${v['cost_usd']:,.4f}")
        click.echo(f"  auto answered {lanes['auto']['seconds'] / max(lanes['batch']['seconds'], 1e-9):.2f}x the batch "
                   "lane's time, within the same sync command, at standard prices")
        from .report import write_report

        page = write_report(settings, [j.name for j in jobs], settings.home / "report.html", None)
        click.echo(f"report (rows, cost, batches, errors): {page}")
        say(f"demo: done in {time.monotonic() - started:.0f}s. Query the marts:")
        click.echo(query_hint(settings.warehouse))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
