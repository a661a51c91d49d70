"""Benchmark (issue 7): peak RSS of `batch-bridge submit` for one large batch vs the size of its body.

Setup (not timed): N rows (default 100,000) with ~2,000-character prompts, so the create body is
~200 MB (under the 256 MB cap: one batch); an emulator subprocess; `batch-bridge plan` once so the dbt
parse is cached.
Measured: `batch-bridge submit` as a subprocess (through bench/_timed_cli.py, i.e. the real CLI with
phase stamps), peak RSS of it and its children sampled every 20 ms, overall and per phase (plan =
stage/classify/measure, run twice by submit; write_requests = the COPY of the request file; upload =
the create POST streamed from the file). Body size = `api.body_size` of the request file.
For reference, a Python process that only imports the bridge, the SDK and DuckDB is also measured.

Target: peak RSS <= 2x body size.

    .venv/bin/python bench/bench_submit_memory.py [--rows 100000] [--prompt-chars 2000]
"""

from __future__ import annotations

import argparse

from _common import BRIDGE_CLI, PY, REPO, cli_env, emulator, machine, make_project, run_measured, workdir
from _timed_cli import Timeline, exclusive, parse, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--prompt-chars", type=int, default=2000)
    ap.add_argument("--memory-limit", default=None, help="BATCH_BRIDGE_MEMORY_LIMIT (default: the product's)")
    args = ap.parse_args()

    from batch_bridge import api

    print(machine())
    with workdir() as root, emulator(latency=60) as emu:
        make_project(root, args.rows, emu.base_url, prompt_chars=args.prompt_chars)
        extra = {"BATCH_BRIDGE_MEMORY_LIMIT": args.memory_limit} if args.memory_limit else {}
        env = cli_env(root, emu.base_url, **extra)
        run_measured([BRIDGE_CLI, "plan"], env)
        base = run_measured([PY, "-c", "import batch_bridge.cli, batch_bridge.bridge, anthropic, duckdb"], env)
        r = run_measured([PY, str(REPO / "bench" / "_timed_cli.py"), "submit"], env)
        files = sorted((root / ".batch_bridge" / "requests").glob("*.jsonl"))
        body = sum(api.body_size(f) for f in files)
        emu_rss = emu.rss()

    phases, _ = parse(r["stderr"])
    phases = [(n, a - r["t0"], b - r["t0"]) for n, a, b in phases]
    timeline = Timeline(phases)
    shares = exclusive(phases, 0.0, r["wall"], timeline)
    peak_of = peaks(timeline, r["samples"])
    print(f"{args.rows:,} requests in {len(files)} batch(es), create body {body / 1e6:.1f} MB "
          f"({body / args.rows:,.0f} B/request)")
    print(f"  batch-bridge submit: wall {r['wall']:.2f} s, peak RSS {r['peak_rss'] / 1e6:.1f} MB")
    for name in ("other", "manifest", "plan", "write_requests", "upload", "publish"):
        if name in shares:
            print(f"    {name:15s} {shares[name]:6.2f} s   peak RSS {peak_of.get(name, 0) / 1e6:7.1f} MB")
    print(f"  baseline (python importing the bridge, SDK, DuckDB): peak RSS {base['peak_rss'] / 1e6:.1f} MB")
    print(f"  (emulator process RSS after receiving the body: {emu_rss / 1e6:.1f} MB)")
    ratio = r["peak_rss"] / body
    print(f"RATIO peak RSS / body size = {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'MISSED'})")


if __name__ == "__main__":
    main()
