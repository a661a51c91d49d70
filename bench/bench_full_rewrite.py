"""Benchmark (issue 17): is a full rewrite of the results source linear in keys at the default memory limit?

For each size (default 1,000,000 and 10,000,000 keys), the state `bench_publish.build_state` builds
set-wise (every key answered, `--answer-chars` characters, in batches of 100,000, collected), a first
`publish` (not timed: it also writes every batch's history part), then `publish` again with its marks
forgotten, so it rewrites every bucket file of `current.parquet` into a new directory: the publish that
ends a job's first `run`. Timed in all, and each bucket's writes (its pick is most of the rest);
reported as seconds per million keys, the largest size over the smallest, with the process's peak RSS
during the rewrite above its RSS before it (Linux: VmHWM reset through /proc/self/clear_refs). At 10M
the 16-bucket cap makes each bucket ~625,000 keys (~62,500 at 1M), written in parts of ~62,500.

    .venv/bin/python bench/bench_full_rewrite.py [--sizes 1000000,10000000] [--answer-chars 200]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from _common import machine, workdir
from bench_publish import build_state


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MB."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                got[k] = int(v.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def one(n: int, answer_chars: int) -> tuple[float, dict[str, list[float]], float]:
    """(seconds for the full rewrite, seconds of each file's write by bucket, MB of peak RSS above the RSS
    before it) of a fresh state of `n` keys."""
    from batch_bridge import bridge, results, state
    from helpers import settings_for, write_project

    with workdir() as root:
        write_project(root, {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 200,
                             "prompt_column": "prompt"})
        s = settings_for(root)
        job = bridge.load_jobs(s)[0]
        build_state(s, n, answer_chars)
        with state.connect(s) as con:
            results.publish(con, s, job)
        buckets: dict[str, list[float]] = defaultdict(list)
        write = results._write

        def timed_write(con, query, dest, *a, **kw):
            t = time.perf_counter()
            write(con, query, dest, *a, **kw)
            if dest.parent.name.endswith(results.CURRENT + ".new"):
                buckets[dest.name[:3]].append(time.perf_counter() - t)

        results._write = timed_write
        try:
            with state.connect(s) as con:
                con.execute("DELETE FROM bb_state.published")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
                before, _ = _rss_mb()
                t = time.perf_counter()
                results.publish(con, s, job)
                whole = time.perf_counter() - t
                _, peak = _rss_mb()
        finally:
            results._write = write
    return whole, buckets, peak - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--answer-chars", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(machine())
    print(f"answers of {args.answer_chars} characters, default memory limit (BATCH_BRIDGE_MEMORY_LIMIT unset)")
    per_m, peaks = {}, {}
    for n in sizes:
        whole, buckets, above = one(n, args.answer_chars)
        per_m[n] = whole / (n / 1e6)
        peaks[n] = above
        files = sum(len(v) for v in buckets.values())
        per_bucket = [sum(v) for v in buckets.values()]
        print(f"{n:,} keys: full rewrite {whole:.1f} s = {per_m[n]:.2f} s per million keys; {len(buckets)} buckets "
              f"in {files} files, each bucket's writes {min(per_bucket):.2f}-{max(per_bucket):.2f} s (most of the "
              f"rest: their picks); peak RSS {above:.0f} MB above the RSS before the rewrite", flush=True)
    lo, hi = min(sizes), max(sizes)
    print(f"RATIO s per million keys, {hi:,} / {lo:,} keys (1.00 = linear): {per_m[hi] / per_m[lo]:.2f}x")
    print(f"RATIO peak RSS above the RSS before, {hi:,} / {lo:,} keys: {peaks[hi] / peaks[lo]:.2f}x")


if __name__ == "__main__":
    main()
