"""The strongest fair baseline of bench_e2e.py: an official-SDK script written well.

Like `plain_sdk_script.py` (rows read from the DuckDB warehouse, one batch created with
`client.messages.batches.create(requests=...)`, `retrieve` polled every --poll-interval seconds), but
the results are streamed: `client.messages.batches.results(id)` is iterated and written to a Parquet
file in chunks of --chunk rows (custom_id, result type, answer text, token counts, error type), so no
list of every result is ever held. This is what a careful engineer writes without batch_bridge.

    .venv/bin/python bench/streamed_sdk_script.py --warehouse W.duckdb --out results.parquet [--chunk 5000]
"""

from __future__ import annotations

import argparse
import time

import anthropic
import pyarrow as pa
import pyarrow.parquet as pq

from plain_sdk_script import read_requests

SCHEMA = pa.schema([("custom_id", pa.string()), ("type", pa.string()), ("text", pa.string()),
                    ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("error_type", pa.string())])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default="stg_items")
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--model", default="claude-haiku-4-5")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--system", default="You label short product reviews.")
    args = ap.parse_args()

    requests = read_requests(args)  # the same requests as the plain script
    client = anthropic.Anthropic()
    batch = client.messages.batches.create(requests=requests)
    del requests
    while batch.processing_status != "ended":
        time.sleep(args.poll_interval)
        batch = client.messages.batches.retrieve(batch.id)
    n = ok = 0
    buf: dict[str, list] = {f.name: [] for f in SCHEMA}
    with pq.ParquetWriter(args.out, SCHEMA) as writer:
        def flush() -> None:
            writer.write_table(pa.table(buf, schema=SCHEMA))
            for v in buf.values():
                v.clear()

        for r in client.messages.batches.results(batch.id):
            res = r.result
            msg = getattr(res, "message", None)
            err = getattr(res, "error", None)
            buf["custom_id"].append(r.custom_id)
            buf["type"].append(res.type)
            buf["text"].append("".join(b.text for b in msg.content if b.type == "text") if msg else None)
            buf["input_tokens"].append(msg.usage.input_tokens if msg else None)
            buf["output_tokens"].append(msg.usage.output_tokens if msg else None)
            buf["error_type"].append(err.error.type if err is not None else None)
            n += 1
            ok += res.type == "succeeded"
            if len(buf["custom_id"]) >= args.chunk:
                flush()
        if buf["custom_id"]:
            flush()
    print(f"{n} results, {ok} succeeded, batch {batch.id}")


if __name__ == "__main__":
    main()
