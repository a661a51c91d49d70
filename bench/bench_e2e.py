"""Benchmark (issue 7): end to end on N rows (default 50,000), the bridge CLI vs a plain SDK script.

One emulator subprocess (`--latency 2`: a batch stays in_progress 2 s) serves both sides, in turn.
  A  `python bench/plain_sdk_script.py --poll-interval 1`: read the rows from the warehouse, build
     request dicts, `batches.create(requests=...)`, poll `retrieve` every 1 s, `list(batches.results(id))`.
  B  `batch-bridge run --poll-interval 1` on a dbt project whose staging table holds the same rows;
     it ends with results/items/current.parquet written. Before it, `batch-bridge plan` is run once
     in the same fresh BATCH_BRIDGE_HOME so the dbt parse is done and cached; its time is reported
     separately ("dbt parse + plan"), and B is the `run` process alone.
Both are subprocesses; wall time from spawn to exit, peak RSS of the process and its children summed,
sampled every 20 ms (psutil). An explicit --poll-interval keeps the bridge's polling flat, like the
plain script's.

Targets: wall(B) <= 1.0x wall(A); peak RSS(B) <= 0.5x peak RSS(A).

    .venv/bin/python bench/bench_e2e.py [--rows 50000] [--latency 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics

import duckdb

from _common import BRIDGE_CLI, PY, REPO, cli_env, emulator, machine, make_project, run_measured, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--latency", type=float, default=2.0)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--memory-limit", default=None, help="BATCH_BRIDGE_MEMORY_LIMIT for the bridge (default: the product's)")
    ap.add_argument("--show-stderr", action="store_true", help="print the bridge's stderr lines with times")
    args = ap.parse_args()

    print(machine())
    a_wall, a_rss, b_wall, b_rss, parse_wall = [], [], [], [], []
    with workdir() as root, emulator(latency=args.latency) as emu:
        make_project(root, args.rows, emu.base_url, prompt_chars=args.prompt_chars)
        for i in range(args.repeat):
            extra = {"BATCH_BRIDGE_MEMORY_LIMIT": args.memory_limit} if args.memory_limit else {}
            env = cli_env(root, emu.base_url, BATCH_BRIDGE_HOME=str(root / f"home_{i}"), **extra)
            a = run_measured([PY, str(REPO / "bench" / "plain_sdk_script.py"), "--warehouse", str(root / "warehouse.duckdb"),
                              "--poll-interval", str(args.poll_interval)], env)
            assert a["stdout"].startswith(f"{args.rows} results"), a["stdout"]
            p = run_measured([BRIDGE_CLI, "plan"], env)
            b = run_measured([BRIDGE_CLI, "run", "--poll-interval", str(args.poll_interval)], env)
            parquet = root / f"home_{i}" / "results" / "items" / "current.parquet"
            n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{parquet}')").fetchone()[0]
            assert n == args.rows, n
            a_wall.append(a["wall"]); a_rss.append(a["peak_rss"])
            b_wall.append(b["wall"]); b_rss.append(b["peak_rss"]); parse_wall.append(p["wall"])
            if args.show_stderr:
                for t, line in b["stderr"]:
                    print(f"    B +{t:6.2f}s  {line}")

    med = statistics.median
    print(f"{args.rows:,} rows, emulator latency {args.latency:g} s, poll interval {args.poll_interval:g} s, repeat {args.repeat}")
    print(f"  A plain SDK script        wall {med(a_wall):6.2f} s   peak RSS {med(a_rss) / 1e6:7.1f} MB")
    print(f"  B batch-bridge run        wall {med(b_wall):6.2f} s   peak RSS {med(b_rss) / 1e6:7.1f} MB")
    print(f"    (batch-bridge plan, i.e. dbt parse + plan, run before B: wall {med(parse_wall):.2f} s; "
          f"B + it = {med(b_wall) + med(parse_wall):.2f} s)")
    rw = med(b_wall) / med(a_wall)
    rr = med(b_rss) / med(a_rss)
    rwp = (med(b_wall) + med(parse_wall)) / med(a_wall)
    print(f"RATIO wall B/A     = {rw:.2f}x (target <= 1.0x: {'met' if rw <= 1.0 else 'MISSED'}); "
          f"with the dbt parse {rwp:.2f}x")
    print(f"RATIO peak RSS B/A = {rr:.2f}x (target <= 0.5x: {'met' if rr <= 0.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
