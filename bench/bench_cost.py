"""Cost of the demo job: batch_bridge (batch prices, prompt caching, dedupe) against naive synchronous calls.

Runs the example project on a temporary copy against the in-process emulator, then prices the same
answers three ways from their `usage` and `batch_bridge/prices.json`:
  naive     one synchronous call per sendable row, no caching, no dedupe (what a plain script pays);
  sync      the requests batch_bridge sent, at synchronous prices with the same caching;
  actual    what batch_bridge was billed (batch prices, caching, dedupe).
Also prints `plan`'s estimate made before sending against the billed cost, twice, with the method of
each figure: run 1 is the demo as `make demo` runs it (no history: input tokens counted by the token
counting endpoint, output and cache hits guessed); run 2 sends every review again after its text was
edited (history: output size and cache hit rate observed). The emulator runs with its defaults: a real
BPE tokenizer, answers of varying length, best-effort caching (70% of lookups hit).

    .venv/bin/python bench/bench_cost.py
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import duckdb

from batch_bridge import api, bridge, dbt_runner
from batch_bridge.config import resolve
from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.pricing import load_prices

REPO = Path(__file__).resolve().parents[1]


def _billed(s, job) -> float:
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT sum(cost_usd) FROM read_parquet('{s.results_dir(job.name) / 'current.parquet'}')").fetchone()[0]
    finally:
        con.close()


def _edit_reviews(seed: Path) -> None:
    """Every review's text changes (a follow-up sentence), so a second run sends all of them again."""
    with open(seed, newline="") as f:
        rows = list(csv.reader(f))
    body = rows[0].index("body")
    for r in rows[1:]:
        if r[body].strip():
            r[body] = r[body] + " Update after a month: my opinion has not changed."
    with open(seed, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _estimate_line(label: str, e, billed: float) -> str:
    f = e.figures
    how = ", ".join(f"{k} by {v['method']}" + (f" (+/-{v['relative_error'] * 100:.1f}%)" if v.get("relative_error") else "")
                    for k, v in f.items() if k != "cache_hit_rate")
    hit = f["cache_hit_rate"]
    return (f"  {label:<44}${e.batch_usd:9.4f} ({(e.batch_usd / billed - 1) * 100:+.1f}% vs billed ${billed:.4f}); "
            f"{how}; cache hit rate {hit['value']:.0%} {hit['method']}")


def _ratios(s, job) -> None:
    """Run 1's answers priced three ways (see the module doc)."""
    book = load_prices(None)
    con = duckdb.connect()
    cur = s.results_dir(job.name) / "current.parquet"
    rows = con.execute(
        f"""SELECT model, input_tokens, coalesce(cache_creation_input_tokens, 0), coalesce(cache_read_input_tokens, 0),
                   output_tokens, cost_usd, deduplicated
            FROM read_parquet('{cur}') WHERE status = 'succeeded'"""
    ).fetchall()
    con.close()
    naive = sum(book.cost(m, input_tokens=i + cw + cr, output_tokens=o, batch=False) for m, i, cw, cr, o, _, _ in rows)
    sent = [r for r in rows if not r[6]]
    w1h = job.cache_ttl == "1h"
    sync_same = sum(
        book.cost(m, input_tokens=i, output_tokens=o, cache_1h=cw if w1h else 0, cache_5m=0 if w1h else cw,
                  cache_read=cr, batch=False)
        for m, i, cw, cr, o, _, _ in sent
    )
    actual = sum(r[5] for r in rows)
    reads = sum(1 for r in sent if r[3])
    print(f"job {job.name} ({job.model}), run 1: {len(rows):,} rows answered by {len(sent):,} requests "
          f"({len(rows) - len(sent):,} deduplicated); {reads / len(sent):.1%} of requests read the prompt cache")
    print(f"  naive synchronous, every row, no caching   ${naive:9.4f}")
    print(f"  synchronous, same requests and caching      ${sync_same:9.4f}")
    print(f"  batch_bridge billed                         ${actual:9.4f}")
    print(f"  ratio billed / naive                        {actual / naive:9.3f}x")
    print(f"  ratio billed / synchronous same requests    {actual / sync_same:9.3f}x")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bb-cost-"))
    try:
        shutil.copytree(REPO / "dbt_project", root / "dbt_project", ignore=shutil.ignore_patterns("target", "logs"))
        shutil.copytree(REPO / "profiles", root / "profiles", ignore=shutil.ignore_patterns(".user.yml"))
        shutil.copytree(REPO / "batch_bridge" / "dbt_package", root / "batch_bridge" / "dbt_package")
        with run_emulator(EmulatorConfig()) as emu:
            env = {**os.environ, "ANTHROPIC_API_KEY": "sk-bench", "ANTHROPIC_BASE_URL": emu.base_url,
                   "BATCH_BRIDGE_POLL_INTERVAL": "0.1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
            env.pop("BATCH_BRIDGE_WAREHOUSE", None)
            env.pop("BATCH_BRIDGE_HOME", None)
            s = resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", env=env, cwd=root / "dbt_project")
            jobs = bridge.load_jobs(s)
            client = api.build_client(s)
            dbt_runner.invoke(s, ["build", "--selector", "bb_upstream", "--quiet"])
            plans, est = bridge.plan(s, jobs, client=client)
            bridge.run(s, jobs, client)
            billed1 = _billed(s, jobs[0])
            _ratios(s, jobs[0])
            # Run 2: every review edited, so every row is sent again; the plan now has run 1's answers.
            _edit_reviews(root / "dbt_project" / "seeds" / "reviews.csv")
            dbt_runner.invoke(s, ["build", "--selector", "bb_upstream", "--quiet"])
            _, est2 = bridge.plan(s, jobs, client=client)
            offline = bridge.plan(s, jobs)[1]  # the same plan without a client: the calibrated rule
            bridge.run(s, jobs, client)
            billed2 = _billed(s, jobs[0])
        job = jobs[0]
        e = est[job.name]
        print(f"  upper bound of the run 1 plan (max_tokens, 30% cache hits) ${e.batch_usd_max:.4f}")
        print("plan estimate before sending, against what that run was billed:")
        print(_estimate_line("run 1 (no history)", e, billed1))
        print(_estimate_line("run 2 (every review edited, history)", est2[job.name], billed2))
        print(_estimate_line("run 2 offline (no client: the rule)", offline[job.name], billed2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
