"""What the bridge knows, from its own state only (no network, no warehouse): batches and per-job rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

from . import state
from .export import REJECTED_REASONS
from .results import LATEST
from .state import utcnow

NEVER_SENT_WHY = {**REJECTED_REASONS,
                  "not_sent_yet": "known but not sent yet (its submission was abandoned or its batch lost)"}


def _iso(d: datetime | None) -> str | None:
    return d.isoformat(timespec="seconds") + "Z" if d else None


def batch_state(processing_status: str | None, local_state: str) -> str:
    """What a batch's two states say together, in the words a user acts on.

    `processing_status` is the API's last answer; once the bridge has marked a batch lost, that
    answer (often `in_progress`) is stale and would mislead, so the local state speaks alone."""
    if local_state == "lost":
        return "lost: gone from the API, its rows are sent again"
    if local_state == "foreign":
        return "another client's: adopted on its size, released; never loaded, cancelled or deleted"
    if local_state == "collected":
        return "collected"
    if local_state == "downloaded":
        return "ended, downloaded, not yet loaded"
    return processing_status or "submitted"


def batches(con: duckdb.DuckDBPyConnection, jobs: list[str]) -> list[dict[str, Any]]:
    now = utcnow()
    rows = con.execute(
        """
        SELECT b.batch_id, b.job, b.processing_status, b.local_state, b.request_count, b.processing, b.succeeded,
               b.errored, b.canceled, b.expired, b.created_at, b.expires_at, b.ended_at, b.polled_at,
               b.collected_at, b.note, b.lane,
               (SELECT sum(cost_usd) FROM bb_state.responses r WHERE r.batch_id = b.batch_id) AS cost_usd
        FROM bb_state.batches b WHERE list_contains($jobs, b.job) ORDER BY b.created_at
        """,
        {"jobs": jobs},
    ).fetchall()
    out = []
    for r in rows:
        (bid, job, ps, ls, n, proc, ok, err, can, exp, created, expires, ended, polled, collected, note, lane,
         cost) = r
        out.append({
            "batch_id": bid, "job": job, "lane": lane, "processing_status": ps, "local_state": ls, "state": batch_state(ps, ls),
            "request_counts": {"processing": proc, "succeeded": ok, "errored": err, "canceled": can, "expired": exp},
            "requests": n,
            "created_at": _iso(created), "expires_at": _iso(expires), "ended_at": _iso(ended),
            "age_seconds": round((now - created).total_seconds()) if created else None,
            "expires_in_seconds": round((expires - now).total_seconds()) if expires and not ended else None,
            "last_polled_at": _iso(polled), "collected_at": _iso(collected),
            "cost_usd": cost, "note": note,
        })
    return out


# Rejection reasons of rows that never become keys (no key_versions row): counted only through `rejections`.
# The other reasons name keys that are stored, and that are counted once, by what their answers say.
UNSTORED_REASONS = ("null_key", "duplicate_key", "empty_prompt")
# Reasons of stored keys that were never sent (the others name keys with answers: failed).
STORED_NEVER_SENT = ("too_large", "create_rejected")


def row_counts(con: duckdb.DuckDBPyConnection, job: str) -> dict[str, Any]:
    """Each key of the job in exactly one class (succeeded, in flight, failed, never sent), failures by
    the type of their latest answer and rows never sent by reason, so that the parts add up; plus
    `stale`: keys without an answer for their current input that still show an earlier answer.
    Shared by `status` and `report`."""
    state.fold_outcomes(con, job)  # answers loaded so far count in `key_inputs.answered`
    rows = con.execute(
        f"""
        WITH keys AS (SELECT custom_id, input_hash AS h, answered FROM bb_state.key_inputs WHERE job = $job),
        flying AS (  -- with whether its batch waits for queue room, or its create's outcome is unknown
            SELECT sr.input_hash, bool_and(su.state = 'prepared') AS queued, bool_and(su.state = 'creating') AS unconfirmed
            FROM bb_state.sent_requests sr
            JOIN (SELECT su.submission_id, su.state FROM bb_state.submissions su
                  LEFT JOIN bb_state.batches b ON b.batch_id = su.batch_id
                  WHERE su.job = $job AND (su.state IN ('prepared', 'creating')
                        OR (su.state = 'created' AND coalesce(b.local_state, 'submitted') IN ('submitted', 'downloaded')))
                 ) su USING (submission_id)
            WHERE sr.job = $job GROUP BY sr.input_hash
        ),
        open AS (  -- keys without an answer for their current input: few, when the job is healthy
            SELECT k.custom_id, k.h, f.input_hash IS NOT NULL AS flying,
                   CASE WHEN f.queued THEN 'waiting_for_queue' WHEN f.unconfirmed THEN 'create_unconfirmed' END AS waiting
            FROM keys k LEFT JOIN flying f ON f.input_hash = k.h WHERE NOT k.answered
        ),
        tried AS (  -- the latest answer, as the results source picks it (results.LATEST)
            SELECT input_hash, arg_max(status, {LATEST}) AS status, arg_max(error_type, {LATEST}) AS error_type
            FROM bb_state.responses
            WHERE job = $job AND input_hash IN (SELECT h FROM open WHERE NOT flying) GROUP BY input_hash
        ),
        classed AS (
            SELECT CASE WHEN o.flying THEN 'in_flight' WHEN t.status IS NOT NULL THEN 'failed' ELSE 'never_sent' END AS class,
                   CASE WHEN NOT o.flying THEN coalesce(t.error_type, t.status) ELSE o.waiting END AS failure
            FROM open o LEFT JOIN tried t ON t.input_hash = o.h
            UNION ALL
            SELECT 'succeeded', NULL FROM keys WHERE answered
        ),
        stale AS (  -- open keys one of whose earlier inputs has an answer
            SELECT count(DISTINCT v.custom_id) AS n FROM bb_state.key_versions v
            JOIN open o ON o.custom_id = v.custom_id AND v.input_hash <> o.h
            WHERE v.job = $job AND v.input_hash IN (
                SELECT input_hash FROM bb_state.input_outcomes WHERE job = $job AND succeeded)
        )
        SELECT class, failure, count(*), any_value((SELECT n FROM stale)) FROM classed GROUP BY ALL
        """,
        {"job": job},
    ).fetchall()
    counts = {"succeeded": 0, "in_flight": 0, "failed": 0, "never_sent": 0}
    # Of in_flight: rows whose batch is not created yet for lack of room in the processing queue
    # (BATCH_BRIDGE_MAX_QUEUED_REQUESTS, or a 429), and rows whose create's outcome is being looked for.
    waiting = {"waiting_for_queue": 0, "create_unconfirmed": 0}
    failures: dict[str, int] = {}
    stale = 0
    for cls, failure, n, st in rows:
        counts[cls] += n
        stale = st or 0
        if cls == "failed":
            failures[failure] = failures.get(failure, 0) + n
        elif cls == "in_flight" and failure:
            waiting[failure] += n
    keys = sum(counts.values())
    rejections = con.execute(
        "SELECT reason, count(*), list(DISTINCT detail) FILTER (WHERE detail IS NOT NULL)[1:3] "
        "FROM bb_state.rejections WHERE job = ? GROUP BY reason", [job]
    ).fetchall()
    rejected = {reason: n for reason, n, _ in rejections}
    # Stored keys never sent: too large for a batch, in a create the API rejected for good (with its
    # message), or not sent yet (prepared but abandoned, or lost).
    never: dict[str, int] = {r: rejected[r] for r in UNSTORED_REASONS if rejected.get(r)}
    left = counts["never_sent"]
    for reason in STORED_NEVER_SENT:
        n = min(rejected.get(reason, 0), left)
        if n:
            never[reason] = n
            left -= n
    if left:
        never["not_sent_yet"] = left
    return {
        "rows": {"known_keys": keys, **counts, "never_sent": sum(never.values()), "stale": stale, **waiting},
        "failures_by_type": dict(sorted(failures.items(), key=lambda kv: -kv[1])),
        "never_sent_by_reason": never,
        "rejected": rejected,
        "details": {reason: d for reason, _, d in rejections if d},  # e.g. the API's message of a rejected create
    }


def lanes_summary(con: duckdb.DuckDBPyConnection, job: str) -> dict[str, dict[str, Any]]:
    """Per lane (batch, sync): keys whose current answer came through it, answers billed, and their cost."""
    rows = {lane: {"rows_answered": 0, "billed_requests": 0, "cost_usd": 0.0} for lane in ("batch", "sync")}
    state.fold_outcomes(con, job)  # answers loaded so far count in `key_inputs.answered`
    for lane, billed, cost, unknown in con.execute(
        """SELECT lane, count(*) FILTER (WHERE status IN ('succeeded', 'parse_failed')), coalesce(sum(cost_usd), 0),
                  count(*) FILTER (WHERE cost_usd IS NULL AND status IN ('succeeded', 'parse_failed'))
           FROM bb_state.responses WHERE job = ? GROUP BY lane""", [job]).fetchall():
        rows[lane].update(billed_requests=billed, cost_usd=None if unknown else cost)
    # A key is answered by the lane of the latest successful answer to its current input.
    for lane, n in con.execute(
        """
        WITH answer AS (SELECT input_hash, arg_max(lane, collected_at) AS lane FROM bb_state.responses
                        WHERE job = $job AND status = 'succeeded' GROUP BY input_hash)
        SELECT a.lane, count(*) FROM bb_state.key_inputs k JOIN answer a USING (input_hash)
        WHERE k.job = $job AND k.answered GROUP BY a.lane
        """, {"job": job}).fetchall():
        rows[lane]["rows_answered"] = n
    return rows


def jobs_summary(con: duckdb.DuckDBPyConnection, jobs: list[str]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        counted = row_counts(con, job)
        rejected = counted["rejected"]
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
            WITH deduped AS (  -- answered keys whose own request did not bring the answer
                SELECT k.input_hash FROM bb_state.key_inputs k
                ANTI JOIN (SELECT input_hash, request_custom_id FROM bb_state.responses
                           WHERE job = $job AND status = 'succeeded') r
                     ON r.input_hash = k.input_hash AND r.request_custom_id = k.custom_id
                WHERE k.job = $job AND k.answered
            ),
            answered AS (
                SELECT input_hash, arg_max(cost_usd, collected_at) AS cost FROM bb_state.responses
                WHERE job = $job AND status = 'succeeded' AND input_hash IN (SELECT input_hash FROM deduped)
                GROUP BY input_hash
            )
            SELECT count(*), coalesce(sum(a.cost), 0) FROM deduped d JOIN answered a USING (input_hash)
            """,
            {"job": job},
        ).fetchone()
        out.append({
            "job": job,
            "lanes": lanes_summary(con, job),
            "dedupe": {"rows": dedupe_rows, "saved_usd": dedupe_saved},
            "rows": counted["rows"],
            "failures_by_type": counted["failures_by_type"],
            "never_sent_by_reason": {k: {"rows": v, "why": NEVER_SENT_WHY.get(k, k)}
                                     for k, v in counted["never_sent_by_reason"].items()},
            "not_sent": {k: {"rows": v, "why": REJECTED_REASONS.get(k, k),
                             **({"details": counted["details"][k]} if k in counted["details"] else {})}
                         for k, v in sorted(rejected.items())},
            "cost_usd": (cost or 0.0) if not unknown_cost else None,  # unknown only when a price is missing
            "cost_usd_known_part": cost or 0.0,
            "billed_requests": billed,
            "tokens": {"input": tokens_in or 0, "output": tokens_out or 0,
                       "cache_write": cache_w or 0, "cache_read": cache_r or 0},
        })
    return out
