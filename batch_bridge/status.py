"""What the bridge knows, from its own state only (no network, no warehouse): batches and per-job rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

from .export import REJECTED_REASONS
from .state import utcnow


def _iso(d: datetime | None) -> str | None:
    return d.isoformat(timespec="seconds") + "Z" if d else None


def batches(con: duckdb.DuckDBPyConnection, jobs: list[str]) -> list[dict[str, Any]]:
    now = utcnow()
    rows = con.execute(
        """
        SELECT b.batch_id, b.job, b.processing_status, b.local_state, b.request_count, b.processing, b.succeeded,
               b.errored, b.canceled, b.expired, b.created_at, b.expires_at, b.ended_at, b.polled_at,
               b.collected_at, b.note,
               (SELECT sum(cost_usd) FROM bb_state.responses r WHERE r.batch_id = b.batch_id) AS cost_usd
        FROM bb_state.batches b WHERE list_contains($jobs, b.job) ORDER BY b.created_at
        """,
        {"jobs": jobs},
    ).fetchall()
    out = []
    for r in rows:
        (bid, job, ps, ls, n, proc, ok, err, can, exp, created, expires, ended, polled, collected, note, cost) = r
        out.append({
            "batch_id": bid, "job": job, "processing_status": ps, "local_state": ls,
            "request_counts": {"processing": proc, "succeeded": ok, "errored": err, "canceled": can, "expired": exp},
            "requests": n,
            "created_at": _iso(created), "expires_at": _iso(expires), "ended_at": _iso(ended),
            "age_seconds": round((now - created).total_seconds()) if created else None,
            "expires_in_seconds": round((expires - now).total_seconds()) if expires and not ended else None,
            "last_polled_at": _iso(polled), "collected_at": _iso(collected),
            "cost_usd": cost, "note": note,
        })
    return out


def jobs_summary(con: duckdb.DuckDBPyConnection, jobs: list[str]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        row = con.execute(
            """
            WITH latest AS (
                SELECT custom_id, arg_max(input_hash, seen_at) AS h FROM bb_state.key_versions
                WHERE job = $job GROUP BY custom_id
            ),
            last_resp AS (
                SELECT input_hash, arg_max(status, collected_at) AS status FROM bb_state.responses
                WHERE job = $job GROUP BY input_hash
            ),
            ok AS (SELECT DISTINCT input_hash FROM bb_state.responses WHERE job = $job AND status = 'succeeded'),
            flying AS (
                SELECT sr.input_hash, bool_and(su.state = 'prepared') AS queued,
                       bool_and(su.state = 'creating') AS unconfirmed
                FROM bb_state.sent_requests sr
                JOIN bb_state.submissions su USING (submission_id)
                LEFT JOIN bb_state.batches b ON b.batch_id = su.batch_id
                WHERE sr.job = $job AND (su.state IN ('prepared', 'creating')
                      OR (su.state = 'created' AND coalesce(b.local_state, 'submitted') IN ('submitted', 'downloaded')))
                GROUP BY sr.input_hash
            )
            SELECT count(*) AS keys,
                   count(*) FILTER (WHERE ok.input_hash IS NOT NULL) AS succeeded,
                   count(*) FILTER (WHERE ok.input_hash IS NULL AND f.input_hash IS NOT NULL) AS in_flight,
                   count(*) FILTER (WHERE ok.input_hash IS NULL AND f.queued) AS waiting_for_queue,
                   count(*) FILTER (WHERE ok.input_hash IS NULL AND f.unconfirmed) AS create_unconfirmed,
                   count(*) FILTER (WHERE ok.input_hash IS NULL AND f.input_hash IS NULL AND lr.status IS NOT NULL) AS failed,
                   count(*) FILTER (WHERE ok.input_hash IS NULL AND f.input_hash IS NULL AND lr.status IS NULL) AS never_sent
            FROM latest l
            LEFT JOIN ok ON ok.input_hash = l.h
            LEFT JOIN flying f ON f.input_hash = l.h
            LEFT JOIN last_resp lr ON lr.input_hash = l.h
            """,
            {"job": job},
        ).fetchone()
        keys, ok, flying, queued, unconfirmed, failed, never = row
        failures = dict(con.execute(
            """
            SELECT coalesce(error_type, status), count(*) FROM (
                SELECT input_hash, arg_max(status, collected_at) AS status, arg_max(error_type, collected_at) AS error_type
                FROM bb_state.responses WHERE job = $job GROUP BY input_hash
            ) WHERE status <> 'succeeded' GROUP BY ALL
            """,
            {"job": job},
        ).fetchall())
        rejections = con.execute(
            "SELECT reason, count(*), list(DISTINCT detail) FILTER (WHERE detail IS NOT NULL)[1:3] "
            "FROM bb_state.rejections WHERE job = ? GROUP BY reason", [job]
        ).fetchall()
        rejected = {reason: n for reason, n, _ in rejections}
        details = {reason: d for reason, _, d in rejections if d}
        cost, billed, tokens_in, tokens_out, cache_w, cache_r = con.execute(
            """SELECT sum(cost_usd), count(*) FILTER (WHERE status IN ('succeeded', 'parse_failed')),
                      sum(input_tokens), sum(output_tokens), sum(cache_creation_input_tokens),
                      sum(cache_read_input_tokens)
               FROM bb_state.responses WHERE job = ?""", [job]
        ).fetchone()
        unknown_cost = con.execute(
            "SELECT count(*) FROM bb_state.responses WHERE job = ? AND cost_usd IS NULL", [job]
        ).fetchone()[0]
        dedupe_rows, dedupe_saved = con.execute(
            """
            WITH latest AS (
                SELECT custom_id, arg_max(input_hash, seen_at) AS h FROM bb_state.key_versions
                WHERE job = $job GROUP BY custom_id
            ),
            answered AS (
                SELECT input_hash, arg_max(request_custom_id, collected_at) AS sent_as,
                       arg_max(cost_usd, collected_at) AS cost
                FROM bb_state.responses WHERE job = $job AND status = 'succeeded' GROUP BY input_hash
            )
            SELECT count(*), coalesce(sum(a.cost), 0) FROM latest l JOIN answered a ON a.input_hash = l.h
            WHERE a.sent_as <> l.custom_id
            """,
            {"job": job},
        ).fetchone()
        out.append({
            "job": job,
            "dedupe": {"rows": dedupe_rows, "saved_usd": dedupe_saved},
            "rows": {
                "known_keys": keys, "succeeded": ok, "in_flight": flying, "failed": failed,
                "never_sent": never + sum(rejected.values()),
                # of in_flight: rows whose batch is not created yet, for lack of room in the processing
                # queue (BATCH_BRIDGE_MAX_QUEUED_REQUESTS) or after a 429; rows whose create's outcome is
                # unknown and being looked for in `list`
                "waiting_for_queue": queued, "create_unconfirmed": unconfirmed,
            },
            "failures_by_type": failures,
            "not_sent": {k: {"rows": v, "why": REJECTED_REASONS.get(k, k), **({"details": details[k]} if k in details else {})}
                         for k, v in sorted(rejected.items())},
            "cost_usd": (cost or 0.0) if not unknown_cost else None,  # unknown only when a price is missing
            "cost_usd_known_part": cost or 0.0,
            "billed_requests": billed,
            "tokens": {"input": tokens_in or 0, "output": tokens_out or 0,
                       "cache_write": cache_w or 0, "cache_read": cache_r or 0},
        })
    return out
