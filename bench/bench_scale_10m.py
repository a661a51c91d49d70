"""Benchmark (issue 17): is `batch-bridge run` linear in rows up to 10M staged rows, paced by the
processing-queue limit, with flat memory? Runs of 1,000,000 and 10,000,000 staged rows (by default),
each in a fresh project against a fresh emulator, with `BATCH_BRIDGE_MAX_QUEUED_REQUESTS` at the
product's default (100,000): the job's batches (cap 100,000 requests, cut at most 4 apart) go out one
queue's worth at a time, and `run` creates the next as earlier ones end: 10 and 100+ batches.

Per run, through bench/_timed_cli.py (the real CLI with phase stamps, see bench_scale.py):
  - seconds per million rows of each stage: plan (stage, classify, measure), submit (write the request
    files, create the batches), collect (download and load the results), publish (the results
    source), and the time spent waiting for batches (polls and sleeps between them);
  - the CPU seconds per million rows of each stage (the `run` process, all threads): the bridge's own
    work, which the disk's pace moves less than the wall;
  - peak RSS of the `run` process (with children) overall and in each stage;
  - the emulator's CPU seconds over the run as a share of the machine (cores x wall);
  - bytes on disk at the end (warehouse, state DB, request and result files).
The ratio of s per million rows between the two sizes is the linearity check (1.0 = linear); the
ratio of CPU s per million rows says how much of a stage's growth is the bridge's work, not its waits.

The emulator runs with `--latency 1` and counts tokens with its characters/4 fallback
(BATCH_BRIDGE_TOKENIZER=/nonexistent, set by this script for the emulator only): the real tokenizer
doubles its CPU per request, and at 10M rows that would measure the emulator rather than the bridge.
Prompts are short (`--prompt-chars 40`) so that 10M rows fit a small machine's disk and time.

    .venv/bin/python bench/bench_scale_10m.py [--sizes 1000000,10000000] [--latency 1] [--prompt-chars 40]
"""

from __future__ import annotations

import argparse
import os

from _common import machine
from bench_scale import CORES, one

STAGES = {  # stage -> the bench/_timed_cli.py phases it is made of
    "plan": ("plan",),
    "submit": ("write_requests", "upload"),
    "collect": ("download", "load", "load_insert", "load_finish", "load_cut", "fold"),
    "publish": ("publish", "publish_history"),
    "waiting": ("poll", "sleep"),
    "other": ("other", "manifest", "state_open", "state_close", "refresh", "pending", "send_pending"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000", help="staged rows per run, comma-separated")
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--prompt-chars", type=int, default=40)
    ap.add_argument("--max-queued", type=int, default=None,
                    help="BATCH_BRIDGE_MAX_QUEUED_REQUESTS (default: the product's, 100000)")
    ap.add_argument("--memory-limit", default=None)
    ap.add_argument("--show-stderr", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("BATCH_BRIDGE_TOKENIZER", "/nonexistent")  # the emulator's characters/4 fallback

    print(machine())
    print(f"emulator --latency {args.latency:g}, tokens counted as characters/4 "
          f"(BATCH_BRIDGE_TOKENIZER={os.environ['BATCH_BRIDGE_TOKENIZER']}); prompts of {args.prompt_chars} "
          f"characters; BATCH_BRIDGE_MAX_QUEUED_REQUESTS={args.max_queued or 'default (100000)'}")
    extra = {"BATCH_BRIDGE_MAX_QUEUED_REQUESTS": str(args.max_queued)} if args.max_queued else {}
    runs = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = one(n, args, **extra)
        runs.append(r)
        m = n / 1e6
        stages = {k: sum(r["shares"].get(p, 0.0) for p in ps) for k, ps in STAGES.items()}
        peaks = {k: max((r["peaks"].get(p, 0) for p in ps), default=0) for k, ps in STAGES.items()}
        cpu = {k: sum(r["cpu"].get(p, 0.0) for p in ps) for k, ps in STAGES.items()}
        r["per_m"] = {k: v / m for k, v in stages.items()}
        r["cpu_per_m"] = {k: v / m for k, v in cpu.items()}
        print(f"{n:,} rows ({r['batches']}): run wall {r['wall']:.1f} s = {r['wall'] / m:.1f} s per million rows; "
              f"peak RSS {r['rss'] / 1e6:.1f} MB; on disk at the end {r['disk'] / 1e9:.2f} GB")
        print(f"    emulator CPU {r['emu_cpu']:.1f} s = {r['emu_cpu'] / (CORES * r['wall']):.0%} of the machine "
              f"({CORES} cores x wall), {r['emu_cpu'] / r['wall']:.0%} of one core; emulator RSS at the end "
              f"{r['emu_rss'] / 1e6:.0f} MB")
        print(f"    the bridge's CPU {sum(cpu.values()):.1f} s (all threads) = {sum(cpu.values()) / m:.2f} s per million rows")
        for k, v in stages.items():
            print(f"    {k:8s} {v:8.1f} s  {v / m:7.2f} s per million rows  CPU {cpu[k] / m:6.2f} s per million rows  "
                  f"peak RSS in it {peaks[k] / 1e6:7.1f} MB")
        folds = [b - a for name, a, b in r["phases"] if name == "fold" and b - a >= 0.01]
        print(f"    of collect: reading and inserting slices {r['shares'].get('load_insert', 0):.1f} s, folding the "
              f"answers into the per-input summaries {r['shares'].get('fold', 0):.1f} s ({len(folds)} folds of 10 ms "
              f"or more" + (f", the longest {max(folds):.2f} s)" if folds else ")"))
        inside = r["shares"]
        print("    seconds (CPU s, of it system; peak RSS MB) by phase: " + ", ".join(
            f"{k} {v:.1f} ({r['cpu'].get(k, 0.0):.1f}, {r['system'].get(k, 0.0):.1f}; {r['peaks'].get(k, 0) / 1e6:.0f})"
            for k, v in sorted(inside.items(), key=lambda kv: -kv[1])))
        if args.show_stderr:
            for t, line in r["lines"]:
                print(f"      +{t:7.2f}s {line}")
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        print(f"RATIO s per million rows, {b['n']:,} / {a['n']:,} rows (1.00 = linear): " + ", ".join(
            f"{k} {b['per_m'][k] / a['per_m'][k]:.2f}x" for k in ("plan", "submit", "collect", "publish")
            if a["per_m"][k] > 0) + f"; whole run {b['wall'] / b['n'] / (a['wall'] / a['n']):.2f}x")
        print("RATIO CPU s per million rows (the bridge's own work, which the disk's pace moves less): " + ", ".join(
            f"{k} {b['cpu_per_m'][k] / a['cpu_per_m'][k]:.2f}x" for k in ("plan", "submit", "collect", "publish")
            if a["cpu_per_m"][k] > 0) + f"; whole run {sum(b['cpu_per_m'].values()) / sum(a['cpu_per_m'].values()):.2f}x")
        print(f"RATIO peak RSS {b['n']:,} / {a['n']:,} rows = {b['rss'] / a['rss']:.2f}x (target: flat, <= 1.1x)")


if __name__ == "__main__":
    main()
