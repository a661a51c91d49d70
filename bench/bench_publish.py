"""Publish after a change of one row in a job of 1M rows, beside the full rewrite of the results source.

The state is built set-wise in DuckDB (no API, no warehouse), as `submit` and `collect` leave it: `--rows`
keys, each answered (`--answer-chars` characters) in batches of 100,000, collected. Not timed: that
setup and the first publish (it also writes every batch's history part).

Timed, one after the other in one run, each `--repeat` times:
  - full, one file (the baseline): the whole current answer set picked and written to one Parquet file,
    as the results source was written before it was split into buckets (`pick_current` over every
    key, then one COPY);
  - full, buckets: `publish` with its marks forgotten, so it writes every bucket into a new directory;
  - one row's input changed (a `key_versions` row and `key_inputs` updated as `submit` records them),
    then `publish`: cold (a new connection: DuckDB's buffers empty; the OS page cache is not dropped)
    and warm (the same connection again, for another key);
  - one new answer loaded for that changed input (a `responses` row as `collect` writes it), then `publish`;
  - once: a tenth of the keys changed and answered (one batch's worth, as one collect leaves them), then
    `publish` (every bucket merged), with its peak RSS (Linux: VmHWM, reset before it).

Target: <= 1 s for a one-row change at 1M rows.

    .venv/bin/python bench/bench_publish.py [--rows 1000000] [--answer-chars 600] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, workdir

BATCH = 100_000
# Answer text of words picked by hash: it compresses about as well as prose (a padded string would not be a fair
# load for the writer), and DuckDB's hash() makes 1M of them in seconds.
WORDS = ("the", "reviewer", "is", "mostly", "satisfied", "delivery", "was", "late", "but", "value", "good", "and",
         "product", "quality", "arrived", "damaged", "support", "answered", "quickly", "price", "fair", "would",
         "buy", "again", "not", "recommend", "colour", "size", "fits", "well", "battery", "lasts", "long", "screen")
TEXT = ("left(id || ': ' || array_to_string(list_transform(range($chars // 5), lambda x: "
        f"{list(WORDS)}[(1 + hash(id, x) % {len(WORDS)})::BIGINT]), ' '), $chars)")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_now_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """The process's peak RSS since `reset_peak` (Linux: VmHWM)."""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def build_state(settings, rows: int, answer_chars: int) -> None:
    from batch_bridge import state

    with state.connect(settings) as con:
        con.execute("BEGIN")
        con.execute(f"""CREATE TEMP TABLE k AS SELECT 'k' || lpad(i::VARCHAR, 8, '0') AS id, i // {BATCH} AS b,
                        md5_number('prompt ' || i) AS h, 'msgbatch_' || lpad((i // {BATCH})::VARCHAR, 4, '0') AS batch_id
                        FROM range({rows}) t(i)""")
        con.execute("INSERT INTO bb_state.submissions (submission_id, job, state, request_file, request_count, body_bytes, "
                    "prepared_at, create_started_at, batch_id, created_at) SELECT 'sub' || b, 'items', 'created', "
                    "'/dev/null', count(*), count(*) * 400, now(), now(), any_value(batch_id), now() FROM k GROUP BY b")
        con.execute("INSERT INTO bb_state.batches (batch_id, job, submission_id, processing_status, local_state, "
                    "request_count, succeeded, created_at, ended_at, result_lines, result_bytes, collected_at) "
                    "SELECT batch_id, 'items', submission_id, 'ended', 'collected', request_count, request_count, now(), "
                    f"now(), request_count, request_count * {answer_chars + 400}, now() FROM bb_state.submissions")
        con.execute("INSERT INTO bb_state.key_versions SELECT 'items', id, '[\"' || id || '\"]', h, "
                    "TIMESTAMP '2026-01-01' FROM k")
        con.execute(
            "INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, output_text, "
            "stop_reason, model, input_tokens, output_tokens, cost_usd, submitted_at, collected_at) "
            f"SELECT 'items', batch_id, id, h, 1, 'succeeded', {TEXT}, "
            "'end_turn', 'claude-haiku-4-5', 40, 25, 0.00016, TIMESTAMP '2026-01-01', TIMESTAMP '2026-01-01' + "
            "INTERVAL (b) HOUR FROM k", {"chars": answer_chars})
        con.execute("INSERT INTO bb_state.input_outcomes " + state.outcomes_select("job = 'items'"))
        con.execute("INSERT INTO bb_state.key_inputs SELECT 'items', id, h, true, NULL, NULL, NULL, NULL, '[\"' || id || '\"]' "
                    "FROM k")
        con.execute("COMMIT")
        con.execute("CHECKPOINT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--answer-chars", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from batch_bridge import bridge, state
    from batch_bridge.jobs import quote_literal
    from batch_bridge.results import CURRENT, PARQUET, _answer_bytes, current_sql, pick_current, publish
    from batch_bridge.state import grown_until_it_fits, joins_as_written, room_for_rows, single_threaded
    from helpers import settings_for, write_project

    print(machine())
    with workdir() as root:
        write_project(root, {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 200,
                             "prompt_column": "prompt"})
        s = settings_for(root)
        job = bridge.load_jobs(s)[0]
        t = time.perf_counter()
        build_state(s, args.rows, args.answer_chars)
        t_state = time.perf_counter() - t
        t = time.perf_counter()
        with state.connect(s) as con:
            publish(con, s, job)
        t_first = time.perf_counter() - t
        current = s.results_dir("items") / CURRENT
        files = sorted(current.iterdir())
        size = sum(p.stat().st_size for p in files)
        print(f"setup: state of {args.rows:,} keys, answers of {args.answer_chars} characters, {t_state:.1f} s; "
              f"first publish (with every history part) {t_first:.1f} s -> {len(files)} bucket files, "
              f"{size / 1e6:,.0f} MB (not timed below)")

        single, full, cold, warm, answer = [], [], [], [], []
        connect = []
        single_file = root / "single.parquet"
        for r in range(args.repeat):
            with state.connect(s) as con:
                # The baseline: the results source as one file, every key picked and written.
                # With the settings `publish` runs under (one thread, joins as written, room for wide rows).
                t = time.perf_counter()
                with single_threaded(con), joins_as_written(con), room_for_rows(con, s, _answer_bytes(con, job)):
                    # Again with more room if DuckDB runs out, as a publish's steps are (1M picks in one
                    # hash table did not fit 128MB and did not spill).
                    grown_until_it_fits(con, s, lambda: pick_current(con, job))
                    grown_until_it_fits(con, s, lambda: con.execute(
                        f"COPY ({current_sql(con, job)}) TO {quote_literal(str(single_file))} ({PARQUET})"))
                    con.execute("DROP TABLE bb_picked")
                single.append(time.perf_counter() - t)
                con.execute("DELETE FROM bb_state.published")
                t = time.perf_counter()
                publish(con, s, job)
                full.append(time.perf_counter() - t)

            def change(con, key: str) -> None:
                """One row's input changed, recorded as `submit.snapshot_key_versions` records it."""
                con.execute("INSERT INTO bb_state.key_versions VALUES ('items', ?, ?, md5_number(? || ?), now()::TIMESTAMP)",
                            [key, f'["{key}"]', key, f"changed {r}"])
                con.execute("UPDATE bb_state.key_inputs SET input_hash = md5_number(? || ?), answered = false "
                            "WHERE job = 'items' AND custom_id = ?", [key, f"changed {r}", key])

            cold_key, warm_key = f"k{(r * 7919 + 11) % args.rows:08d}", f"k{(r * 104729 + 13) % args.rows:08d}"
            with state.connect(s) as con:
                change(con, cold_key)
            before = {p.name: p.stat().st_mtime_ns for p in current.iterdir()}
            t = time.perf_counter()
            with state.connect(s) as con:
                connect.append(time.perf_counter() - t)
                t = time.perf_counter()
                publish(con, s, job)
                cold.append(time.perf_counter() - t)
                rewritten = [n for n, m in before.items() if (current / n).stat().st_mtime_ns != m]
                change(con, warm_key)
                t = time.perf_counter()
                publish(con, s, job)
                warm.append(time.perf_counter() - t)
                # The changed input's answer arrives, as `collect` loads it.
                con.execute(
                    "INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, "
                    "output_text, model, input_tokens, output_tokens, cost_usd, submitted_at, collected_at) "
                    "SELECT 'items', 'msgbatch_new', ?, md5_number(? || ?), 1, 'succeeded', rpad('new answer', ?, ' .'), "
                    "'claude-haiku-4-5', 40, 25, 0.00016, now()::TIMESTAMP, now()::TIMESTAMP",
                    [warm_key, warm_key, f"changed {r}", args.answer_chars])
                t = time.perf_counter()
                publish(con, s, job)
                answer.append(time.perf_counter() - t)
                (n, keys, stale) = con.execute(
                    f"SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE id IN (?, ?) AND is_stale) "
                    f"FROM read_parquet({quote_literal(str(current))})", [cold_key, warm_key]).fetchone()
            assert n == keys, (n, keys)  # one row per key, whatever was rewritten
            assert stale == 1, stale  # the cold key still stale, the warm key answered
            print(f"  repeat {r + 1}: one-row change rewrote {len(rewritten)} of {len(before)} files ({', '.join(rewritten)})")

        # A batch's worth of keys (every 10th) changed and answered, as one collect leaves them: every
        # bucket is merged (fewer than half the keys changed), against the full rewrite above.
        batch = args.rows // 10
        with state.connect(s) as con:
            con.execute("CREATE TEMP TABLE chg AS SELECT custom_id AS id, md5_number(custom_id || 'batch') AS h "
                        "FROM bb_state.key_inputs WHERE job = 'items' AND hash(custom_id) % 10 = 0")
            con.execute("INSERT INTO bb_state.key_versions SELECT 'items', id, '[\"' || id || '\"]', h, now()::TIMESTAMP FROM chg")
            con.execute("UPDATE bb_state.key_inputs SET input_hash = chg.h FROM chg WHERE custom_id = chg.id")
            con.execute(
                "INSERT INTO bb_state.responses (job, batch_id, request_custom_id, input_hash, attempt, status, output_text, "
                "stop_reason, model, input_tokens, output_tokens, cost_usd, submitted_at, collected_at) "
                f"SELECT 'items', 'msgbatch_batch', id, h, 1, 'succeeded', {TEXT}, 'end_turn', 'claude-haiku-4-5', 40, 25, "
                "0.00016, now()::TIMESTAMP, now()::TIMESTAMP FROM chg", {"chars": args.answer_chars})
            (batch,) = con.execute("SELECT count(*) FROM chg").fetchone()
            con.execute("DROP TABLE chg")
            con.execute("CHECKPOINT")
            before_mb = rss_now_mb()
            reset_peak()
            t = time.perf_counter()
            publish(con, s, job)
            merged = time.perf_counter() - t
            merged_peak_mb = peak_mb()
            (n, keys, new) = con.execute(
                f"SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE batch_id = 'msgbatch_batch') "
                f"FROM read_parquet({quote_literal(str(current))})").fetchone()
        assert n == keys and new == batch, (n, keys, new, batch)

        def above_before(peak: float, before: float) -> str:
            # The merge can free more than it takes (the state's cache let go): no growth is not "-0 MB".
            grew = round(peak - before)
            return f"{grew} MB above the process's before it" if grew > 0 else "no higher than the process's before it"

        def fig(xs: list[float]) -> str:
            return f"min {min(xs):.2f} s, median {statistics.median(xs):.2f} s"

        print(f"  full, one file (baseline):            {fig(single)}")
        print(f"  full, buckets (every bucket, swapped): {fig(full)}  ({min(full) / min(single):.2f}x the one file)")
        print(f"  one row's input changed, cold:       {fig(cold)}  (+ opening the state {statistics.median(connect):.2f} s)")
        print(f"  one row's input changed, warm:       {fig(warm)}")
        print(f"  one new answer loaded, warm:         {fig(answer)}")
        print(f"  {batch:,} keys changed and answered (a batch; every bucket merged): {merged:.2f} s "
              f"({merged / min(full):.2f}x the full bucket rewrite, {merged / min(single):.2f}x the one file); "
              f"peak RSS {merged_peak_mb:.0f} MB, {above_before(merged_peak_mb, before_mb)}")
    worst = max(statistics.median(cold), statistics.median(warm), statistics.median(answer))
    print(f"RESULT publish after a one-row change of {args.rows:,} rows: cold median {statistics.median(cold):.2f} s, "
          f"warm {statistics.median(warm):.2f} s, new answer {statistics.median(answer):.2f} s (target <= 1 s: "
          f"{'met' if worst <= 1 else 'MISSED'}); {min(single) / worst:.0f}x faster than the full one-file rewrite "
          f"({min(single):.2f} s)")


if __name__ == "__main__":
    main()
