"""Benchmark (issue 16): rows through the sync lane against the emulator, per-call latency 200 ms.

Setup (not timed): a project of N rows with `lane: sync` and `sync_concurrency: 16`, an emulator
subprocess with `--messages-latency 0.2`, `batch-bridge plan` once so the dbt parse is cached.
Measured: `batch-bridge sync --json` as a subprocess, its wall time and peak RSS (with children,
sampled every 20 ms), and the sync lane's own span (the run's `created_at` to `ended_at` in the
bridge's state: from the first call to the last answer written). Ideal = N x 0.2 s / 16.
Run for two sizes side by side; the ratios printed are lane span / ideal per size, and peak RSS of the
larger over the smaller (flat: near 1).

    .venv/bin/python bench/bench_sync_lane.py [--rows 250 1000] [--latency 0.2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json

from _common import BRIDGE_CLI, cli_env, emulator, job_meta, machine, make_project, mb, run_measured, table, workdir


def one(n: int, latency: float, concurrency: int, base_url: str) -> dict:
    import duckdb

    with workdir() as root:
        s = make_project(root, n, base_url, meta=job_meta(lane="sync", sync_concurrency=concurrency,
                                                          cache_ttl="none", max_tokens=50))
        env = cli_env(root, base_url)
        run_measured([BRIDGE_CLI, "plan"], env)
        r = run_measured([BRIDGE_CLI, "sync", "--json"], env)
        answered = json.loads(r["stdout"])["sync_lane"]["answered"].get("items", 0)
        con = duckdb.connect(str(s.state_path), read_only=True)
        try:
            (span,) = con.execute("SELECT epoch(max(ended_at) - min(created_at)) FROM batches WHERE lane = 'sync'").fetchone()
        finally:
            con.close()
    ideal = n * latency / concurrency
    return {"rows": n, "answered": answered, "wall": r["wall"], "span": float(span), "ideal": ideal,
            "peak_rss": r["peak_rss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    print(machine())
    with emulator(0.0, "--messages-latency", str(args.latency)) as emu:
        results = [one(n, args.latency, args.concurrency, emu.base_url) for n in args.rows]
    print(table([(f"{x['rows']:,}", f"{x['answered']:,}", f"{x['ideal']:.1f} s", f"{x['span']:.1f} s",
                  f"{x['span'] / x['ideal']:.2f}x", f"{x['wall']:.1f} s", mb(x["peak_rss"])) for x in results],
                ("rows", "answered", "ideal", "sync lane span", "span / ideal", "command wall", "peak RSS")))
    small, big = results[0], results[-1]
    print(f"peak RSS {big['rows']:,} rows / {small['rows']:,} rows: {big['peak_rss'] / small['peak_rss']:.2f}x "
          f"(rows {big['rows'] / small['rows']:.0f}x)")


if __name__ == "__main__":
    main()
