"""Cost of the demo job: batch_bridge (batch prices, prompt caching, dedupe) against naive synchronous calls.

Runs the example project on a temporary copy against the in-process emulator, then prices the same
answers three ways from their `usage` and `batch_bridge/prices.json`:
  naive     one synchronous call per sendable row, no caching, no dedupe (what a plain script pays);
  sync      the requests batch_bridge sent, at synchronous prices with the same caching;
  actual    what batch_bridge was billed (batch prices, caching, dedupe).
Also prints `plan`'s estimate made before sending, against the billed cost.

    .venv/bin/python bench/bench_cost.py
"""

from __future__ import annotations

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
            dbt_runner.invoke(s, ["build", "--selector", "bb_upstream", "--quiet"])
            plans, est = bridge.plan(s, jobs)
            bridge.run(s, jobs, api.build_client(s))
        job = jobs[0]
        book = load_prices(None)
        con = duckdb.connect()
        cur = s.results_dir(job.name) / "current.parquet"
        rows = con.execute(
            f"""SELECT model, input_tokens, coalesce(cache_creation_input_tokens, 0), coalesce(cache_read_input_tokens, 0),
                       output_tokens, cost_usd, deduplicated
                FROM read_parquet('{cur}') WHERE status = 'succeeded'"""
        ).fetchall()
        naive = sum(book.cost(m, input_tokens=i + cw + cr, output_tokens=o, batch=False) for m, i, cw, cr, o, _, _ in rows)
        sent = [r for r in rows if not r[6]]
        w1h = job.cache_ttl == "1h"
        sync_same = sum(
            book.cost(m, input_tokens=i, output_tokens=o, cache_1h=cw if w1h else 0, cache_5m=0 if w1h else cw,
                      cache_read=cr, batch=False)
            for m, i, cw, cr, o, _, _ in sent
        )
        actual = sum(r[5] for r in rows)
        e = est[job.name]
        print(f"job {job.name} ({job.model}), {len(rows):,} rows answered by {len(sent):,} requests "
              f"({len(rows) - len(sent):,} deduplicated)")
        print(f"  naive synchronous, every row, no caching   ${naive:9.4f}")
        print(f"  synchronous, same requests and caching      ${sync_same:9.4f}")
        print(f"  batch_bridge billed                         ${actual:9.4f}")
        print(f"  ratio billed / naive                        {actual / naive:9.3f}x")
        print(f"  ratio billed / synchronous same requests    {actual / sync_same:9.3f}x")
        print(f"  plan estimate before sending                ${e.batch_usd:9.4f} "
              f"({(e.batch_usd / actual - 1) * 100:+.1f}% vs billed; upper bound ${e.batch_usd_max:.4f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
