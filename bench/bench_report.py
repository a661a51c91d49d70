"""`batch-bridge report` over the state of a job of 1M rows, beside `status` over the same state.

The state is built set-wise in DuckDB (no API, no warehouse): `--rows` keys answered in batches of
100,000 spread over 30 days, with errors, expiries, a batch in flight, changed (stale) keys,
deduplicated keys sharing one request, cache reads and rows refused before sending. Then the
report (gather + render + write) and `status` (`status.jobs_summary` + `status.batches`) are timed
on it, each `--repeat` times, one after the other.

    .venv/bin/python bench/bench_report.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, workdir

BATCH = 100_000


def build_state(settings, rows: int) -> None:
    from batch_bridge import state

    with state.connect(settings) as con:
        con.execute("BEGIN")
        # Every 20th key shares the request of the key before it (dedupe); every 100th changed input
        # after its answer (stale); the last batch is still in flight.
        con.execute(
            f"""CREATE TEMP TABLE k AS
            SELECT i, 'k' || lpad(i::VARCHAR, 8, '0') AS id, i // {BATCH} AS b,
                   md5_number('prompt ' || (CASE WHEN i % 20 = 19 THEN i - 1 ELSE i END)) AS h,
                   i % 20 = 19 AS dup, i % 100 = 7 AS changed
            FROM range({rows}) t(i)"""
        )
        nb = (rows + BATCH - 1) // BATCH
        con.execute(
            f"""INSERT INTO bb_state.submissions (submission_id, job, state, request_file, request_count, body_bytes,
                   estimated_cost_usd, prepared_at, create_started_at, batch_id, created_at, estimated_input_tokens,
                   estimated_output_tokens, estimated_cache_write_tokens, estimated_cache_read_tokens, estimated_sync_usd)
            SELECT 'sub' || b, 'items', 'created', '/dev/null', n, n * 400, n * 0.00012,
                   ts, ts, 'msgbatch_' || lpad(b::VARCHAR, 4, '0'), ts, n * 40, n * 25, 4000, n * 1000, n * 0.0004
            FROM (SELECT b, count(*) FILTER (WHERE NOT dup) AS n,
                         TIMESTAMP '2026-01-01' + INTERVAL (b * 30 // {nb}) DAY + INTERVAL (b) HOUR AS ts
                  FROM k GROUP BY b)"""
        )
        con.execute(
            f"""INSERT INTO bb_state.batches (batch_id, job, submission_id, processing_status, local_state, request_count,
                   succeeded, errored, expired, created_at, expires_at, ended_at, result_lines, collected_at)
            SELECT batch_id, job, submission_id, CASE WHEN b = {nb - 1} THEN 'in_progress' ELSE 'ended' END,
                   CASE WHEN b = {nb - 1} THEN 'submitted' ELSE 'collected' END, request_count,
                   request_count * 0.97, request_count * 0.02, request_count * 0.01, created_at,
                   created_at + INTERVAL 1 DAY,
                   CASE WHEN b < {nb - 1} THEN created_at + INTERVAL (600 + b * 977 % 20000) SECOND END, request_count,
                   CASE WHEN b < {nb - 1} THEN created_at + INTERVAL (700 + b * 977 % 20000) SECOND END
            FROM (SELECT *, substr(submission_id, 4)::INT AS b FROM bb_state.submissions)"""
        )
        con.execute(
            "INSERT INTO bb_state.sent_requests SELECT 'sub' || b, 'items', id, h, 1, CASE WHEN i % 20 = 18 THEN 2 ELSE 1 END, 200 "
            "FROM k WHERE NOT dup"
        )
        con.execute("INSERT INTO bb_state.key_versions SELECT 'items', id, '[\"' || id || '\"]', h, TIMESTAMP '2026-01-01' FROM k")
        con.execute(
            "INSERT INTO bb_state.key_versions SELECT 'items', id, '[\"' || id || '\"]', md5_number('new ' || i), "
            "TIMESTAMP '2026-02-01' FROM k WHERE changed"
        )
        con.execute(
            f"""INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, output_text,
                   stop_reason, model, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens,
                   cache_creation_5m, cache_creation_1h, cost_usd, error_type, error_message, submitted_at, collected_at)
            SELECT 'items', 'msgbatch_' || lpad(b::VARCHAR, 4, '0'), id, h, 1, st, CASE WHEN st = 'succeeded' THEN 'ok' END,
                   'end_turn', 'claude-haiku-4-5', 40 * ok, 25 * ok, CASE WHEN i % {BATCH} = 0 THEN 1000 ELSE 0 END * ok,
                   1000 * ok, 0, CASE WHEN i % {BATCH} = 0 THEN 1000 ELSE 0 END * ok, 0.00016 * ok,
                   CASE WHEN st = 'errored' THEN 'overloaded_error' END, CASE WHEN st = 'errored' THEN 'Overloaded' END,
                   TIMESTAMP '2026-01-01', TIMESTAMP '2026-01-01' + INTERVAL (b) DAY
            FROM (SELECT *, CASE WHEN i % 50 = 3 THEN 'errored' WHEN i % 100 = 5 THEN 'expired' ELSE 'succeeded' END AS st
                  FROM k WHERE NOT dup AND b < {nb - 1}),
                 LATERAL (SELECT (st = 'succeeded')::INT AS ok)"""
        )
        con.execute("INSERT INTO bb_state.input_outcomes " + state.outcomes_select("job = 'items'"))
        # What `submit` keeps beside key_versions: each key's current input, and whether it has an answer.
        con.execute(
            "INSERT INTO bb_state.key_inputs SELECT 'items', custom_id, v.h, coalesce(o.succeeded, false), NULL, NULL, "
            "NULL, NULL, v.key_json FROM (SELECT custom_id, arg_max(input_hash, seen_at) AS h, arg_max(key_json, seen_at) "
            "AS key_json FROM bb_state.key_versions GROUP BY ALL) v "
            "LEFT JOIN bb_state.input_outcomes o ON o.input_hash = v.h"
        )
        con.execute(
            "INSERT INTO bb_state.rejections SELECT 'items', '[\"x' || i || '\"]', "
            "CASE WHEN i % 2 = 0 THEN 'empty_prompt' ELSE 'null_key' END, NULL, TIMESTAMP '2026-02-01' FROM range(1000) t(i)"
        )
        con.execute("COMMIT")
        con.execute("CHECKPOINT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from batch_bridge import state, status
    from batch_bridge.report import write_report
    from helpers import settings_for, write_project

    print(machine())
    with workdir() as root:
        write_project(root, {"job": "items", "key": "id", "model": "claude-haiku-4-5", "prompt_column": "prompt"})
        s = settings_for(root)
        t = time.perf_counter()
        build_state(s, args.rows)
        print(f"setup: state of {args.rows:,} keys built in {time.perf_counter() - t:.1f} s (not timed below)")
        rep, st = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = write_report(s, ["items"], root / "report.html", None)
            rep.append(time.perf_counter() - t)
            t = time.perf_counter()
            with state.connect(s) as con:
                summary = status.jobs_summary(con, ["items"])
                status.batches(con, ["items"])
            st.append(time.perf_counter() - t)
        rows = summary[0]["rows"]
        print(f"  state: {rows['known_keys']:,} keys; succeeded {rows['succeeded']:,}, in flight {rows['in_flight']:,}, "
              f"failed {rows['failed']:,}, never sent {rows['never_sent']:,}, stale {rows['stale']:,}; "
              f"page {out.stat().st_size / 1e3:,.0f} kB")
        print(f"  report (gather + render + write): min {min(rep):.2f} s, median {statistics.median(rep):.2f} s")
        print(f"  status (jobs_summary + batches):  min {min(st):.2f} s, median {statistics.median(st):.2f} s")
    print(f"RESULT report of {args.rows:,} rows: min {min(rep):.2f} s (target < 2 s: "
          f"{'met' if min(rep) < 2 else 'MISSED'}); {min(rep) / min(st):.2f}x the time of status on the same state")


if __name__ == "__main__":
    main()
