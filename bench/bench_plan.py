"""Benchmark (issues 3, 7): `bridge.plan` over a large staging table whose rows are mostly answered.

Setup (not timed): a warehouse with an N-row staging table (default 5,000,000; id VARCHAR, prompt of
~200 characters), and a bridge state DB holding the history a production job would have after one
full run followed by a change of 1% of the prompts:
  - one `responses` row (succeeded, a short output_text) per staged row; for 99% of the rows its
    input_hash is the row's current input hash, for 1% (every 100th row) the hash of an older prompt;
  - the matching `sent_requests`, `submissions` (created) and `batches` (collected, 100,000 each) and
    `key_versions` rows;
  - what collect and submit keep beside them: `input_outcomes` (one row per answered input) and
    `key_inputs` (each key's input with the fingerprint of the prompt that was answered).
Input hashes are computed in SQL exactly as `export.stage` does: md5_number(job.static_hash || prompt).

Also timed once: the same plan with the fingerprints removed, as after upgrading an old state file
(every prompt is md5-hashed again until the next submit records them).

Timed: `bridge.plan(settings, jobs)` in-process (jobs loaded beforehand, so no dbt parse): it attaches
the warehouse, stages, classifies against the history, measures the 1% to send and estimates their
cost. Reference: the same plan with an empty state DB (every row to send). The split of plan time
into stage / classify / measure / estimate is taken by wrapping those functions.

Target: plan < 3 s with history.

    .venv/bin/python bench/bench_plan.py [--rows 5000000] [--changed 0.01] [--repeat 3] [--view]

`--view` makes the staging relation a view over the table (dbt's default materialization).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from _common import machine, make_project, staging_as_view, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of rows whose prompt changed")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--memory-limit", default=None, help="BATCH_BRIDGE_MEMORY_LIMIT (default: the product's)")
    ap.add_argument("--view", action="store_true", help="the staging relation a view over the rows")
    ap.add_argument("--publish", action="store_true",
                    help="also time one results publish over this history (minutes at 5M: it writes every history part)")
    args = ap.parse_args()

    from batch_bridge import bridge, state, submit
    from batch_bridge.export import HASH_VERSION, fingerprint_sql
    from batch_bridge.jobs import quote_literal

    timings: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings[name].append(time.perf_counter() - t)
        return wrapper

    for name in ("stage", "classify", "measure", "estimate_job"):
        setattr(submit, name, timed(name, getattr(submit, name)))

    print(machine())
    every = max(1, round(1 / args.changed)) if args.changed > 0 else 0
    with workdir() as root:
        t = time.perf_counter()
        extra = {"BATCH_BRIDGE_MEMORY_LIMIT": args.memory_limit} if args.memory_limit else {}
        s = make_project(root, args.rows, None, prompt_chars=args.prompt_chars, **extra)
        if args.view:  # the rows stay in a table of another name
            staging_as_view(s)
        jobs = bridge.load_jobs(s)
        job = jobs[0]
        t_wh = time.perf_counter() - t
        t = time.perf_counter()
        changed = f"(i % {every} = 0)" if every else "false"
        with state.connect(s) as con:
            con.execute(f"ATTACH {quote_literal(str(s.warehouse))} AS wh (READ_ONLY)")
            # `sent`: the prompt the history answered (an older wording for the changed rows).
            con.execute(
                f"""CREATE TEMP TABLE hist AS
                SELECT i, id, md5_number({quote_literal(job.static_hash)} || sent) AS input_hash,
                       strlen(prompt) AS prompt_bytes, strlen(sent) AS sent_bytes, {fingerprint_sql('sent')} AS fingerprint
                FROM (SELECT *, CASE WHEN {changed} THEN prompt || ' (an older wording)' ELSE prompt END AS sent
                      FROM (SELECT row_number() OVER () - 1 AS i, id, prompt FROM wh.main.stg_items))"""
            )
            con.execute("DETACH wh")
            con.execute("BEGIN")
            con.execute(
                "INSERT INTO bb_state.submissions (submission_id, job, state, request_file, request_count, body_bytes, "
                "estimated_cost_usd, prepared_at, create_started_at, batch_id, created_at, note) "
                "SELECT 'hist_' || lpad(c::VARCHAR, 4, '0'), 'items', 'created', "
                "'/dev/null', count(*), count(*) * 400, NULL, now(), now(), 'msgbatch_hist_' || lpad(c::VARCHAR, 4, '0'), "
                "now(), NULL FROM (SELECT i // 100000 AS c FROM hist) GROUP BY c"
            )
            con.execute(
                "INSERT INTO bb_state.batches (batch_id, job, submission_id, processing_status, local_state, request_count, "
                "succeeded, created_at, ended_at, result_lines, collected_at) "
                "SELECT batch_id, job, submission_id, 'ended', 'collected', request_count, request_count, now(), now(), "
                "request_count, now() FROM bb_state.submissions"
            )
            sent_cols = {r[0] for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE database_name = 'bb_state' AND table_name = 'sent_requests'"
            ).fetchall()}
            extra = [c for c in ("prompt_bytes", "prompt_chars") if c in sent_cols]  # the schema is still evolving
            con.execute(
                "INSERT INTO bb_state.sent_requests (submission_id, job, request_custom_id, input_hash, attempt, key_count"
                + "".join(f", {c}" for c in extra) + ") "
                "SELECT 'hist_' || lpad((i // 100000)::VARCHAR, 4, '0'), 'items', id, input_hash, 1, 1"
                + ", prompt_bytes" * len(extra) + " FROM hist"
            )
            con.execute(
                "INSERT INTO bb_state.key_versions SELECT 'items', id, '[\"' || id || '\"]', input_hash, now() FROM hist"
            )
            con.execute(
                "INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, output_text, "
                "output_json, stop_reason, model, input_tokens, output_tokens, cache_creation_input_tokens, "
                "cache_read_input_tokens, cache_creation_5m, cache_creation_1h, cost_usd, error_type, error_message, "
                "submitted_at, collected_at) SELECT 'items', 'msgbatch_hist_' || lpad((i // 100000)::VARCHAR, 4, '0'), id, "
                "input_hash, 1, 'succeeded', 'The reviewer is mostly satisfied: late delivery, good value. #' || i, NULL, "
                "'end_turn', 'claude-haiku-4-5', 80, 25, 0, 0, 0, 0, 0.00011, NULL, NULL, now(), now() FROM hist"
            )
            # What `collect` (input_outcomes) and `submit` (key_inputs) maintain beside that history.
            con.execute("INSERT INTO bb_state.input_outcomes " + state.outcomes_select("job = 'items'"))
            con.execute(
                "INSERT INTO bb_state.key_inputs SELECT 'items', id, input_hash, true, ?, ?, sent_bytes, fingerprint, "
                "'[\"' || id || '\"]' FROM hist",
                [job.static_hash, HASH_VERSION],
            )
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        t_state = time.perf_counter() - t
        print(f"setup: warehouse of {args.rows:,} rows + dbt parse {t_wh:.1f} s, history {t_state:.1f} s (not timed below)")

        def run(settings, label: str) -> tuple[list[float], object]:
            timings.clear()
            times, cpus = [], []
            plans = None
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                plans, _ = bridge.plan(settings, jobs)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            p = plans[0]
            parts = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in timings.items())
            print(f"  {label}: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
                  f"CPU (all threads) median {statistics.median(cpus):.2f} s "
                  f"[{p.staged:,} staged, {p.send_keys:,} to send in {len(p.chunks)} batch(es), "
                  f"{p.dispositions.get('up_to_date', 0):,} up to date]  (median s: {parts})")
            return times, p

        with_hist, p = run(s, f"plan with history ({args.changed:.0%} changed)")
        assert p.send_keys == (args.rows + every - 1) // every if every else 0, p.send_keys
        # A state file migrated from before fingerprints: no key has one until the next submit.
        with state.connect(s) as con:
            con.execute("UPDATE bb_state.key_inputs SET static_hash = NULL, fingerprint = NULL")
        repeat, args.repeat = args.repeat, 1
        run(s, "plan with history, no fingerprints yet (first plan after upgrading)")
        args.repeat = repeat
        no_hist, p2 = run(s.with_(home=root / "empty_home"), "plan with no history (reference)")
        assert p2.send_keys == args.rows

        if args.publish:
            # Not plan, but the same history: every collect ends with `publish`, which rewrites
            # current.parquet from the job's latest answers. Timed once (with --publish) because it
            # grows with history too.
            from batch_bridge.results import publish

            with state.connect(s) as con:
                t0 = time.perf_counter()
                publish(con, s, job)
                t_pub = time.perf_counter() - t0
            print(f"  publish (rewrite current/history parquet) over this history: {t_pub:.2f} s")

    print(f"RESULT plan with history: min {min(with_hist):.2f} s (target < 3 s: "
          f"{'met' if min(with_hist) < 3 else 'MISSED'}); no history: min {min(no_hist):.2f} s")


if __name__ == "__main__":
    main()
