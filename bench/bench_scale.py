"""Benchmark (issues 7, 17): does `batch-bridge run` scale? N rows (default 1,000,000: 11 batches, sent
100,000 requests at a time by the processing-queue limit) against a small run (default 50,000), same
emulator, same settings.

Each run: a fresh dbt project + warehouse, `batch-bridge plan` once (caches the dbt parse; reported
separately), then `run --poll-interval 1` as a subprocess through bench/_timed_cli.py (the real CLI
with phase stamps). Measured per run:
  - wall time of the `run` process and its peak RSS (with children, sampled every 20 ms);
  - the share of wall time in each phase, from the stamps (innermost phase wins when they nest or
    overlap, e.g. downloads running in 4 threads count once): manifest (read the cached manifest),
    plan (stage/classify/measure, twice in submit), write_requests (export COPY), upload (create
    POSTs), poll (retrieve calls), sleep (waiting between polls), download, load (of which load_cut:
    copying a slice of a result file, load_insert: its read_json + INSERT, load_finish: a batch marked
    collected), fold (loaded answers folded into the per-input summaries), publish (parquet files; of
    which publish_history: the history parts),
    state_open / state_close (opening the state DB, and closing it), refresh / pending / send_pending
    (the `run` loop between batches), other (imports, ...);
  - the CPU seconds (user + system, all threads) of the `run` process in each phase, from the same
    samples, which the disk's pace moves less than the wall;
  - the emulator's CPU seconds during the run (psutil cpu_times of its process) / wall, split into create
    parsing, batch processing and the rest (HTTP) from the emulator's own `cpu_seconds` stats.
The emulator runs with `--latency 1` so waiting is short and the bridge's own work dominates.

Target: peak RSS of the large run does not grow with the job (ratio large/small close to 1).

    .venv/bin/python bench/bench_scale.py [--rows 1000000] [--small 50000] [--latency 1]
"""

from __future__ import annotations

import argparse
import os

import duckdb

from _common import BRIDGE_CLI, PY, REPO, cli_env, emulator, machine, make_project, run_measured, workdir
from _timed_cli import Timeline, exclusive, parse, peaks

CORES = os.cpu_count() or 1
ORDER = ("other", "manifest", "state_open", "state_close", "refresh", "pending", "send_pending", "plan", "write_requests",
         "upload", "poll", "sleep", "download", "load", "load_cut", "load_insert", "load_finish", "fold", "publish",
         "publish_history")


def by_phase(timeline: Timeline, samples: list[tuple[float, float]]) -> dict[str, float]:
    """CPU seconds by phase: each 20 ms sample's increase goes to the phase active midway between it and
    the sample before (the process's start, before the first sample, to "other")."""
    out: dict[str, float] = {}
    before = (0.0, 0.0)
    for t, c in samples:
        name = timeline.at((before[0] + t) / 2)
        out[name] = out.get(name, 0.0) + (c - before[1])
        before = (t, c)
    return out


def one(n: int, args: argparse.Namespace, **env_extra: str) -> dict:
    """One measured `run` of n staged rows in a fresh project (the bridge's env plus `env_extra`)."""
    with workdir() as root, emulator(latency=args.latency) as emu:
        make_project(root, n, emu.base_url, prompt_chars=args.prompt_chars)
        extra = {"BATCH_BRIDGE_MEMORY_LIMIT": args.memory_limit} if args.memory_limit else {}
        env = cli_env(root, emu.base_url, **extra, **env_extra)
        p = run_measured([BRIDGE_CLI, "plan"], env)
        cpu0, split0 = emu.cpu_seconds(), emu.cpu_split()
        r = run_measured([PY, str(REPO / "bench" / "_timed_cli.py"), "run", "--poll-interval", str(args.poll_interval)], env)
        cpu, split1 = emu.cpu_seconds() - cpu0, emu.cpu_split()
        split = {k: split1[k] - split0.get(k, 0.0) for k in split1}
        emu_rss = emu.rss()
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        with duckdb.connect(str(root / ".batch_bridge" / "bb_state.duckdb"), read_only=True) as con:
            (created,) = con.execute("SELECT count(*) FROM batches").fetchone()
    phases, lines = parse(r["stderr"])
    phases = [(name, a - r["t0"], b - r["t0"]) for name, a, b in phases]
    timeline = Timeline(phases)
    shares = exclusive(phases, 0.0, r["wall"], timeline)
    own_cpu, own_system = by_phase(timeline, r["cpu_samples"]), by_phase(timeline, r["system_samples"])
    return {"n": n, "wall": r["wall"], "rss": r["peak_rss"], "shares": shares, "peaks": peaks(timeline, r["samples"]), "cpu": own_cpu, "system": own_system, "plan_wall": p["wall"],
            "emu_cpu": cpu, "emu_split": split, "emu_rss": emu_rss, "disk": disk, "batches": f"{created} batches", "lines": lines,
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=50_000)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--memory-limit", default=None, help="BATCH_BRIDGE_MEMORY_LIMIT for both runs (default: the product's)")
    ap.add_argument("--show-stderr", action="store_true")
    args = ap.parse_args()

    print(machine())
    if args.memory_limit:
        print(f"BATCH_BRIDGE_MEMORY_LIMIT={args.memory_limit}")
    runs = [one(args.small, args), one(args.rows, args)]
    for r in runs:
        print(f"{r['n']:,} rows ({r['batches']}): run wall {r['wall']:.1f} s, peak RSS {r['rss'] / 1e6:.1f} MB; "
              f"emulator CPU {r['emu_cpu']:.1f} s = {r['emu_cpu'] / r['wall']:.0%} of wall "
              f"(emulator RSS at end {r['emu_rss'] / 1e6:.0f} MB); `batch-bridge plan` before it {r['plan_wall']:.1f} s")
        if r["emu_split"]:
            parse, proc = r["emu_split"]["create_parse"], r["emu_split"]["processing"]
            rest = r["emu_cpu"] - parse - proc
            print(f"    emulator CPU by stage: create parsing {parse:.1f} s ({parse / r['wall']:.0%} of wall), "
                  f"batch processing {proc:.1f} s ({proc / r['wall']:.0%}), HTTP and the rest {rest:.1f} s "
                  f"({rest / r['wall']:.0%}); {r['n'] / max(proc, 1e-9):,.0f} requests/s per CPU second processing; "
                  f"the emulator used {r['emu_cpu'] / (CORES * r['wall']):.0%} of the machine ({CORES} cores x wall)")
        for name in ORDER:
            if name in r["shares"]:
                s = r["shares"][name]
                print(f"    {name:15s} {s:7.2f} s {s / r['wall']:6.1%}   CPU {r['cpu'].get(name, 0.0):7.2f} s "
                      f"(system {r['system'].get(name, 0.0):5.2f} s)   "
                      f"peak RSS in it {r['peaks'].get(name, 0) / 1e6:7.1f} MB")
        if args.show_stderr:
            for t, line in r["lines"]:
                print(f"      +{t:7.2f}s {line}")
    small, big = runs
    ratio = big["rss"] / small["rss"]
    print(f"RATIO peak RSS {big['n']:,} / {small['n']:,} rows = {ratio:.2f}x "
          f"(rows x{big['n'] / small['n']:.0f}; target: no higher, <= 1.1x allowing for 20 ms sampling noise: "
          f"{'met' if ratio <= 1.1 else 'MISSED'})")
    print(f"RATIO wall {big['n']:,} / {small['n']:,} rows = {big['wall'] / small['wall']:.1f}x; "
          f"throughput {big['n'] / big['wall']:,.0f} rows/s vs {small['n'] / small['wall']:,.0f} rows/s")


if __name__ == "__main__":
    main()
