"""Benchmark (issues 3, 7): collecting one N-request batch (default 100,000) from the emulator.

Setup (not timed): a dbt project whose staging table holds N rows, the real `bridge.submit` of it to
an emulator subprocess, and a wait until the batch has ended. The results therefore are in the
emulator's exact format and the bridge's state DB knows the batch, as in production.

Timed, side by side, in this one process (min and median of --repeat runs each):
  bridge collect   `bridge.collect`: retrieve + download over HTTP to results/raw/<id>.jsonl +
                   `load_downloaded` (one typed read_json + extraction + joins + INSERT into the state
                   DB + COMMIT) + the command's one publish of current/history/rejected parquet. Before
                   each run the batch is put back to `submitted` and its responses, file and history
                   part removed.
  bridge load      `collect.load_downloaded` on the already downloaded file, then `results.publish`
                   (what `collect` does minus the HTTP part). Before each run the batch is put back to
                   `downloaded`, responses and history part deleted. Split into "insert"
                   (`load_downloaded`: read + extract + INSERT + COMMIT) and "publish".
  (b) duckdb CTAS  a fresh DuckDB file: CREATE TABLE AS SELECT * FROM read_json(file, explicit columns
                   custom_id VARCHAR, result JSON) + close (checkpoint); nothing else.
  (b') typed CTAS  the same with the bridge's typed STRUCT for `result` (reference, not a target).
  (c) SDK list     `list(client.messages.batches.results(batch_id))` with a fresh client: download + a
                   pydantic object per line; nothing written anywhere.

With `--summary-chars N` the job's schema is SUMMARY_SCHEMA and every answer carries a summary of N
characters (`bench/wide_answers.py`), to measure how the schema check's memory follows the answers'
width: the lines below then say when a load slice needed more than its memory limit and ran again.

Targets: bridge load <= 1.3x (b); (c) / bridge collect >= 4.

    .venv/bin/python bench/bench_collect.py [--rows 100000] [--repeat 3] [--schema | --summary-chars N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import duckdb

from _common import emulator, job_meta, machine, make_project, sdk_client, workdir

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "topics": {"type": "array", "items": {"type": "string"}, "description": "at most 3"},
        "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
    "required": ["sentiment", "topics", "score"],
    "additionalProperties": False,
}

SUMMARY_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "topics": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["sentiment", "topics", "summary"],
    "additionalProperties": False,
}


class Stamps:
    """A Progress that remembers when each event happened."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def step(self, message: str) -> None:
        self.events.append((time.perf_counter(), message))

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        self.events.append((time.perf_counter(), what))

    def last(self, what: str) -> float:
        return max(t for t, w in self.events if w == what)


def stats(xs: list[float]) -> str:
    return f"min {min(xs):6.2f} s  median {statistics.median(xs):6.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--schema", action="store_true", help="give the job an output_schema (adds JSON validation)")
    ap.add_argument("--summary-chars", type=int, default=None,
                    help="answers of SUMMARY_SCHEMA with a summary of this many characters (bench/wide_answers.py)")
    ap.add_argument("--slice-bytes", default=None, help="BATCH_BRIDGE_LOAD_SLICE_BYTES (default: the product's, 16MiB)")
    args = ap.parse_args()
    schema = SUMMARY_SCHEMA if args.summary_chars else SCHEMA if args.schema else None
    responder = []
    if args.summary_chars:
        os.environ["BENCH_SUMMARY_CHARS"] = str(args.summary_chars)  # read by the emulator's responder
        responder = ["--responder", "bench.wide_answers:summary_answer"]

    from batch_bridge import api, bridge, collect, results, state

    print(machine())
    with workdir() as root, emulator(0, *responder) as emu:
        meta = job_meta(max_tokens=200 if not args.summary_chars else 1000,
                        **({"output_schema": schema} if schema else {}))
        extra = {"BATCH_BRIDGE_LOAD_SLICE_BYTES": args.slice_bytes} if args.slice_bytes else {}
        s = make_project(root, args.rows, emu.base_url, prompt_chars=args.prompt_chars, meta=meta, **extra)
        jobs = bridge.load_jobs(s)
        client = api.build_client(s)
        t = time.perf_counter()
        rep = bridge.submit(s, jobs, client)
        assert len(rep.batches) == 1, rep.batches
        bid = rep.batches[0]
        while api.retrieve(client, bid).processing_status != "ended":
            time.sleep(0.5)
        print(f"setup: {args.rows:,} rows submitted and ended in {time.perf_counter() - t:.1f} s (not timed below)")

        def reset(to: str) -> None:
            (s.results_dir("items") / "history" / f"{bid}.parquet").unlink(missing_ok=True)
            with state.connect(s) as con:
                con.execute("DELETE FROM bb_state.responses WHERE batch_id = ?", [bid])
                con.execute("DELETE FROM bb_state.input_outcomes WHERE job = 'items'")  # kept from responses at load
                con.execute("DELETE FROM bb_state.published WHERE job = 'items'")  # the next publish writes it all
                con.execute("UPDATE bb_state.batches SET loaded_lines = 0, loaded_bytes = 0 WHERE batch_id = ?", [bid])
                if to == "submitted":
                    f = con.execute("SELECT result_file FROM bb_state.batches WHERE batch_id = ?", [bid]).fetchone()[0]
                    if f:
                        Path(f).unlink(missing_ok=True)
                    con.execute("UPDATE bb_state.batches SET local_state = 'submitted', result_file = NULL, "
                                "result_lines = NULL, collected_at = NULL WHERE batch_id = ?", [bid])
                else:
                    con.execute("UPDATE bb_state.batches SET local_state = 'downloaded', collected_at = NULL "
                                "WHERE batch_id = ?", [bid])

        by_name = {j.name: j for j in jobs}
        collect_t, collect_dl, grown = [], [], []
        for _ in range(args.repeat):
            reset("submitted")
            p = Stamps()
            t0 = time.perf_counter()
            r = bridge.collect(s, jobs, client, progress=p)
            grown.append([m for _, m in p.events if "needed more than" in m])
            collect_t.append(time.perf_counter() - t0)
            collect_dl.append(p.last("batches downloaded") - t0)
            assert r.loaded == {"items": args.rows}, r.loaded
        result_file = Path(s.raw_results_dir / f"{bid}.jsonl")
        size = result_file.stat().st_size

        load_t, load_ins, load_pub = [], [], []
        for _ in range(args.repeat):
            reset("downloaded")
            p = Stamps()
            t0 = time.perf_counter()
            loaded = collect.load_downloaded(s, by_name, progress=p).loaded
            grown.append([m for _, m in p.events if "needed more than" in m])
            t1 = time.perf_counter()
            with state.connect(s) as con:
                for j in jobs:
                    results.publish(con, s, j)
            t2 = time.perf_counter()
            assert loaded == {"items": args.rows}, loaded
            load_t.append(t2 - t0)
            load_ins.append(t1 - t0)
            load_pub.append(t2 - t1)

        ctas_t = []
        for i in range(args.repeat):
            db = root / f"ctas_{i}.duckdb"
            t0 = time.perf_counter()
            con = duckdb.connect(str(db))
            n = con.execute(
                f"CREATE TABLE results AS SELECT * FROM read_json('{result_file}', format = 'newline_delimited', "
                "columns = {custom_id: 'VARCHAR', result: 'JSON'})"
            ).fetchone()[0]
            con.close()
            ctas_t.append(time.perf_counter() - t0)
            assert n == args.rows, n
            db.unlink()

        typed_t = []
        for i in range(args.repeat):
            db = root / f"typed_{i}.duckdb"
            t0 = time.perf_counter()
            con = duckdb.connect(str(db))
            con.execute(f"CREATE TABLE results AS SELECT * FROM {collect._read_sql(str(result_file))}")
            con.close()
            typed_t.append(time.perf_counter() - t0)
            db.unlink()

        sdk_t = []
        for _ in range(args.repeat):
            c = sdk_client(emu.base_url)
            t0 = time.perf_counter()
            items = list(c.messages.batches.results(bid))
            sdk_t.append(time.perf_counter() - t0)
            assert len(items) == args.rows
            del items
            c.close()

    print(f"results file: {args.rows:,} lines, {size / 1e6:.1f} MB; repeat {args.repeat}; "
          f"output_schema: {'yes' if schema else 'no'}"
          + (f", summaries of {args.summary_chars:,} characters" if args.summary_chars else ""))
    for steps in sorted({tuple(g) for g in grown}):
        runs = sum(tuple(g) == steps for g in grown)
        print(f"  {runs} of {len(grown)} loads: " + ("; ".join(m.split(": ", 1)[-1] for m in steps)
                                                     if steps else "within the load's own memory limit"))
    print(f"  bridge collect (HTTP download + load + publish) {stats(collect_t)}   (download part: median {statistics.median(collect_dl):.2f} s)")
    print(f"  bridge load_downloaded + publish                 {stats(load_t)}")
    print(f"     load_downloaded alone (read+extract+INSERT+COMMIT) {stats(load_ins)}; "
          f"publish median {statistics.median(load_pub):.2f} s")
    print(f"  (b) DuckDB read_json CTAS into a file DB         {stats(ctas_t)}")
    print(f"  (b') the same CTAS, result as the typed STRUCT    {stats(typed_t)}  (reference only)")
    print(f"  (c) SDK list(batches.results(id)) incl. download {stats(sdk_t)}")
    r1 = min(load_t) / min(ctas_t)
    r1i = min(load_ins) / min(ctas_t)
    r2 = min(sdk_t) / min(collect_t)
    print(f"RATIO bridge load / (b)           = {r1:.2f}x  (target <= 1.3x: {'met' if r1 <= 1.3 else 'MISSED'}); "
          f"without publish {r1i:.2f}x")
    print(f"RATIO (c) SDK / bridge collect    = {r2:.2f}x  (target >= 4x: {'met' if r2 >= 4 else 'MISSED'})")


if __name__ == "__main__":
    main()
