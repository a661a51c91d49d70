"""The baseline of bench_e2e.py: what a plain script with the official SDK does, written the obvious way.

Reads the staging rows from the DuckDB warehouse, builds one request dict per row, creates one batch
with `client.messages.batches.create(requests=...)`, polls `retrieve` every --poll-interval seconds
until it has ended, and iterates `client.messages.batches.results(id)` into a list.
The request params are the same as the bridge job's in bench_e2e.py (model, max_tokens, system).
Reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL from the environment like any SDK script.

    .venv/bin/python bench/plain_sdk_script.py --warehouse W.duckdb [--table stg_items] [--poll-interval 1]
"""

from __future__ import annotations

import argparse
import time

import anthropic
import duckdb


def read_requests(args: argparse.Namespace) -> list[dict]:
    """One request dict per staging row, read from the warehouse (what any such script starts with)."""
    con = duckdb.connect(args.warehouse, read_only=True)
    rows = con.execute(f'SELECT id, prompt FROM main."{args.table}" ORDER BY id').fetchall()
    con.close()
    return [
        {
            "custom_id": str(id_),
            "params": {
                "model": args.model,
                "max_tokens": args.max_tokens,
                "system": args.system,
                "messages": [{"role": "user", "content": prompt}],
            },
        }
        for id_, prompt in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", default="stg_items")
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--model", default="claude-haiku-4-5")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--system", default="You label short product reviews.")
    args = ap.parse_args()

    requests = read_requests(args)
    client = anthropic.Anthropic()
    batch = client.messages.batches.create(requests=requests)
    while batch.processing_status != "ended":
        time.sleep(args.poll_interval)
        batch = client.messages.batches.retrieve(batch.id)
    results = list(client.messages.batches.results(batch.id))
    ok = sum(1 for r in results if r.result.type == "succeeded")
    print(f"{len(results)} results, {ok} succeeded, batch {batch.id}")


if __name__ == "__main__":
    main()
