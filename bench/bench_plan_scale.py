"""Benchmark (issue 17): is the plan step of a submit linear in rows, and does its memory stay flat?

For each size (default 1,000,000 and 3,000,000 staged rows, ~200-character prompts, no history: every
row is sent), a fresh project, then `submit.prepare_submissions` offline (no client: the rule estimates,
no preflight call) in a child process of its own: stage, classify, measure, estimate, write the
request files and journal them (`Preparer`). Per step: wall and CPU seconds (the process's, all
threads) per million rows; for the child: peak RSS (sampled every 20 ms, per step and in all; not
ru_maxrss, which a child started by fork and exec inherits from its parent), and its RSS before the
first row was read (the floor: Python, the bridge's modules and DuckDB's first open). Batches are cut at the default caps
(100,000 requests, BATCH_BRIDGE_MAX_QUEUED_REQUESTS 100,000).

    .venv/bin/python bench/bench_plan_scale.py [--sizes 1000000,3000000] [--prompt-chars 200] [--shuffled] [--view]

`--view` makes the staging relation a view over the table (dbt's default materialization), which the
plan copies once into a temp table of its own before reading it by rowid.

The ratio printed is CPU seconds per million rows of the largest size over the smallest (1.0x: linear).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import PY, machine, make_project, rows_sql, staging_as_view, workdir
from helpers import load_staging

STEPS = ("stage", "classify", "measure", "estimate_job", "write_requests", "snapshot_key_versions", "journal")


def child(root: Path, home: str) -> None:
    """One prepare_submissions of the project in `root`, timed by step; prints a JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import psutil
    from helpers import settings_for

    from batch_bridge import bridge, submit

    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    current = ["other"]
    me = psutil.Process()

    def sample() -> None:  # peak RSS per step, sampled every 20 ms
        while True:
            rss = me.memory_info().rss
            peaks[current[0]] = max(peaks.get(current[0], 0), rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            w, c = time.perf_counter(), time.process_time()
            outer, current[0] = current[0], name
            try:
                return fn(*a, **kw)
            finally:
                current[0] = outer
                acc = times.setdefault(name, [0.0, 0.0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.process_time() - c
        return wrapper

    for name in STEPS[:-1]:
        setattr(submit, name, timed(name, getattr(submit, name)))
    submit.Preparer.journal = timed("journal", submit.Preparer.journal)  # its own part: journal rows, COMMIT
    if os.environ.get("BENCH_SQL"):  # experiment: settings run after the bridge's own on every connection
        from batch_bridge import state
        configure = state._configure

        def _configure(con, settings):
            configure(con, settings)
            con.execute(os.environ["BENCH_SQL"])
        state._configure = _configure
    extra = {k: os.environ[k] for k in ("BATCH_BRIDGE_MEMORY_LIMIT",) if k in os.environ}
    s = settings_for(root, None, BATCH_BRIDGE_HOME=home, BATCH_BRIDGE_LOCK_TIMEOUT="60", BATCH_BRIDGE_COUNT_SAMPLE="0",
                     **extra)
    jobs = bridge.load_jobs(s)
    floor = psutil.Process().memory_info().rss
    w, c = time.perf_counter(), time.process_time()
    report = submit.prepare_submissions(s, jobs)
    total = (time.perf_counter() - w, time.process_time() - c)
    p = report.plans[0]
    files = sorted((Path(home) / "requests").glob("*.jsonl")) if (Path(home) / "requests").exists() else []
    print(json.dumps({
        "total": total, "steps": times, "floor": floor, "step_peaks": peaks, "peak": max(peaks.values()),
        "requests": p.send_requests, "batches": len(p.chunks), "bytes": sum(f.stat().st_size for f in files),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,3000000")
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--shuffled", action="store_true",
                    help="store the staging rows in an order unrelated to their custom_ids (as most tables are)")
    ap.add_argument("--view", action="store_true",
                    help="the staging relation a view over the rows (dbt's default materialization)")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "HOME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    print(machine())
    sizes = [int(x) for x in args.sizes.split(",")]
    per_m: dict[int, dict] = {}
    for n in sizes:
        with workdir() as root:
            s = make_project(root, n, None, prompt_chars=args.prompt_chars)
            if args.shuffled:
                load_staging(s, f"SELECT * FROM ({rows_sql(n, args.prompt_chars)}) ORDER BY hash(id)")
            if args.view:  # the rows stay in a table of another name, in the order above
                staging_as_view(s)
            done = subprocess.run([PY, __file__, "--child", str(root), str(root / "home")],
                                  capture_output=True, text=True, env={**os.environ})
            if done.returncode:
                print(f"{n:,} rows: the plan failed:\n{done.stderr[-3000:]}")
                return
            r = json.loads(done.stdout.strip().splitlines()[-1])
        m = n / 1e6
        per_m[n] = r
        print(f"{n:,} rows: {r['requests']:,} requests in {r['batches']} batches ({r['bytes'] / 1e6:,.0f} MB); "
              f"prepare wall {r['total'][0]:.1f} s, CPU {r['total'][1]:.1f} s = {r['total'][1] / m:.1f} CPU s per M rows; "
              f"peak RSS {r['peak'] / 1e6:.0f} MB (floor before any row {r['floor'] / 1e6:.0f} MB)")
        for name in (*STEPS, "other"):
            if name in r["steps"] or name == "other":
                wall, cpu = r["steps"].get(name, (0.0, 0.0))
                print(f"    {name:22s} wall {wall:6.2f} s  CPU {cpu:6.2f} s  = {cpu / m:5.2f} CPU s per M rows  "
                      f"peak RSS in it {r.get('step_peaks', {}).get(name, 0) / 1e6:5.0f} MB")
    small, big = per_m[sizes[0]], per_m[sizes[-1]]
    ratio = (big["total"][1] / sizes[-1]) / (small["total"][1] / sizes[0])
    print(f"RATIO CPU s per M rows {sizes[-1]:,} / {sizes[0]:,} = {ratio:.2f}x (linear: 1.0x); "
          f"wall {(big['total'][0] / sizes[-1]) / (small['total'][0] / sizes[0]):.2f}x; "
          f"peak RSS {big['peak'] / small['peak']:.2f}x")


if __name__ == "__main__":
    main()
