"""Run every benchmark in sequence (one at a time: they compete for the CPUs) and print a summary.

Moderate sizes by default, so `make bench` takes about 5-10 minutes on 2 cores; `--full` uses each
script's own defaults (the sizes quoted in BENCHMARKS.md: 5M-row plan, 1M-row scale run, ...).
Each script's full output is printed as it finishes; the summary lists its RATIO/RESULT lines.

    .venv/bin/python bench/run_all.py [--full] [--only collect,plan,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODERATE = {
    "collect": ["--rows", "100000", "--repeat", "2"],
    "plan": ["--rows", "1000000", "--repeat", "2"],
    "plan_scale": ["--sizes", "200000,600000"],
    "e2e": ["--rows", "50000"],
    "submit_memory": ["--rows", "50000"],
    "scale": ["--rows", "300000", "--small", "50000"],
    "emulator": [],
    "report": ["--rows", "1000000", "--repeat", "2"],
    "publish": ["--rows", "300000", "--repeat", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="each benchmark's own (larger) defaults")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(MODERATE))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(MODERATE)
    summary: list[tuple[str, float, list[str]]] = []
    for name in names:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            summary.append((name, 0.0, ["(script not present)"]))
            continue
        cmd = [sys.executable, str(script), *([] if args.full else MODERATE[name])]
        print(f"\n=== {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
        t = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        took = time.monotonic() - t
        print(p.stdout, end="")
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            summary.append((name, took, [f"FAILED (exit {p.returncode})"]))
            continue
        keys = [line for line in p.stdout.splitlines() if line.startswith(("RATIO", "RESULT"))]
        summary.append((name, took, keys or ["(no RATIO/RESULT line)"]))
    print("\n=== summary")
    for name, took, lines in summary:
        print(f"{name:14s} ({took:5.0f} s)  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':24s}{line}")


if __name__ == "__main__":
    main()
