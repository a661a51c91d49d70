"""What `batch-bridge report` shows, read from the bridge's own state only (no API calls, no warehouse).

Row counts come from `status.row_counts` (the page and `status --json` share one definition). Every
other figure is aggregated in DuckDB to one row per batch (or per error type) before Python sees it:
a job of a million rows has a few dozen batches, so the page costs one scan of `responses`, not a
loop over rows. Costs are split by token kind with the current prices and then scaled, per batch, to
the `cost_usd` stored at load time, so the parts always add up to what was billed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb

from . import status
from .errors import ConfigError
from .pricing import PriceBook
from .state import utcnow

COST_PARTS = ("input", "output", "cache_write", "cache_read")
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([hdw])\s*$")
_UNIT = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
EXAMPLE_IDS = 3


def parse_since(value: str) -> timedelta | None:
    """`30d`, `12h`, `2w` -> a window; `all` -> None (everything)."""
    if value.strip().lower() == "all":
        return None
    m = _SINCE.match(value)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f"--since {value!r} is not a time window; allowed: a positive number followed by h, d or w "
            "(hours, days, weeks), e.g. 30d, 12h, 2w, or `all`"
        )
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass
class ReportData:
    generated_at: datetime
    since: datetime | None
    jobs: list[dict[str, Any]]  # status.jobs_summary, plus the report's figures per job
    batches: list[dict[str, Any]]  # one per batch created in the window (or still open)
    errors: list[dict[str, Any]]  # per job and error type, latest first


def _batches(con: duckdb.DuckDBPyConnection, jobs: list[str], since: datetime | None, book: PriceBook) -> list[dict]:
    rows = con.execute(
        """
        WITH picked AS (
            SELECT batch_id FROM bb_state.batches  -- not another client's, adopted and released (its estimate is ours)
            WHERE list_contains($jobs, job) AND local_state <> 'foreign'
              AND ($since IS NULL OR created_at >= $since OR ended_at IS NULL)
        ),
        usage AS (  -- billed usage per batch and model: the only pass over responses
            SELECT batch_id, model,
                   count(*) AS answers,
                   count(*) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS billed,
                   sum(cost_usd) AS cost, count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced,
                   sum(input_tokens) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS i,
                   sum(output_tokens) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS o,
                   sum(coalesce(cache_creation_5m, 0)) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS w5,
                   sum(coalesce(cache_creation_1h, 0)) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS w1,
                   sum(cache_creation_input_tokens) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS w,
                   sum(cache_read_input_tokens) FILTER (WHERE status IN ('succeeded', 'parse_failed')) AS r
            FROM bb_state.responses
            WHERE list_contains($jobs, job) AND batch_id IN (SELECT batch_id FROM picked)
            GROUP BY ALL
        )
        SELECT b.batch_id, b.job, b.processing_status, b.local_state, b.request_count, b.succeeded, b.errored,
               b.canceled, b.expired, b.created_at, b.ended_at, b.collected_at,
               s.estimated_cost_usd, s.estimated_input_tokens, s.estimated_output_tokens,
               s.estimated_cache_write_tokens, s.estimated_cache_read_tokens, s.estimated_sync_usd, b.lane,
               (SELECT list({'model': u.model, 'answers': u.answers, 'billed': u.billed, 'cost': u.cost,
                             'unpriced': u.unpriced, 'i': u.i, 'o': u.o, 'w5': u.w5, 'w1': u.w1, 'w': u.w, 'r': u.r})
                FROM usage u WHERE u.batch_id = b.batch_id) AS usage
        FROM bb_state.batches b
        LEFT JOIN bb_state.submissions s ON s.submission_id = b.submission_id
        WHERE b.batch_id IN (SELECT batch_id FROM picked)
        ORDER BY b.created_at, b.batch_id
        """,
        {"jobs": jobs, "since": since},
    ).fetchall()
    out = []
    for (bid, job, ps, ls, n, ok, err, can, exp, created, ended, collected,
         est, est_i, est_o, est_w, est_r, est_sync, lane, usage) in rows:
        discount = 1.0 if lane == "sync" else book.batch_discount  # the sync lane pays standard prices
        parts = dict.fromkeys(COST_PARTS, 0.0)
        tokens = dict.fromkeys(COST_PARTS, 0)
        billed = cost = 0.0
        answers = billed_n = 0
        known = True
        for u in usage or []:
            answers += u["answers"]
            billed_n += u["billed"]
            cost += u["cost"] or 0.0
            known = known and not u["unpriced"]
            i, o, w5, w1, w, r = (u[k] or 0 for k in ("i", "o", "w5", "w1", "w", "r"))
            tokens["input"] += i
            tokens["output"] += o
            tokens["cache_write"] += w
            tokens["cache_read"] += r
            p = book.lookup(u["model"] or "")
            if p is None:
                continue
            d = discount / 1e6
            parts["input"] += i * p.input * d
            parts["output"] += o * p.output * d
            parts["cache_write"] += (w5 * p.write_5m + w1 * p.write_1h) * p.input * d
            parts["cache_read"] += r * p.input * p.read * d
        # Scale the split to the cost stored at load (prices may have been edited since).
        total = sum(parts.values())
        if total > 0:
            parts = {k: v * cost / total for k, v in parts.items()}
        billed = cost
        seen = sum(tokens.values()) - tokens["output"]
        out.append({
            "batch_id": bid, "job": job, "processing_status": ps, "local_state": ls, "requests": n,
            "request_counts": {"succeeded": ok, "errored": err, "canceled": can, "expired": exp},
            "created_at": created, "ended_at": ended, "collected_at": collected,
            "duration_seconds": (ended - created).total_seconds() if created and ended else None,
            "answers_loaded": answers, "billed_requests": billed_n,
            "cost_usd": billed if known else None, "cost_usd_known_part": billed,
            "cost_parts_usd": parts, "tokens": tokens,
            "lane": lane,
            "sync_usd": billed / discount if known and discount else None,
            "cache_hit_rate": tokens["cache_read"] / seen if seen else None,
            "estimate": None if est is None and est_i is None else {
                "cost_usd": est, "sync_usd": est_sync,
                "tokens": {"input": est_i, "output": est_o, "cache_write": est_w, "cache_read": est_r},
            },
        })
    return out


def _errors(con: duckdb.DuckDBPyConnection, jobs: list[str], since: datetime | None) -> list[dict]:
    rows = con.execute(
        """
        SELECT job, coalesce(error_type, status) AS kind, status, count(*) AS n, max(collected_at) AS latest,
               arg_max(error_message, collected_at) AS message,
               arg_max(request_custom_id, collected_at, $examples) AS examples
        FROM bb_state.responses
        WHERE list_contains($jobs, job) AND status <> 'succeeded' AND ($since IS NULL OR collected_at >= $since)
        GROUP BY ALL ORDER BY latest DESC, n DESC
        """,
        {"jobs": jobs, "since": since, "examples": EXAMPLE_IDS},
    ).fetchall()
    return [{"job": j, "type": k, "status": s, "answers": n, "latest_at": t, "message": m, "examples": ex}
            for j, k, s, n, t, m, ex in rows]


def per_day(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Billed cost and estimates by the day each batch ended (created, while it runs)."""
    days: dict[str, dict[str, Any]] = {}
    for b in batches:
        when = b["ended_at"] or b["created_at"]
        if when is None:
            continue
        d = days.setdefault(when.date().isoformat(), {"day": when.date().isoformat(), "batches": 0,
                                                      "cost_parts_usd": dict.fromkeys(COST_PARTS, 0.0),
                                                      "cost_usd": 0.0, "estimate_usd": None, "sync_usd": 0.0})
        d["batches"] += 1
        d["cost_usd"] += b["cost_usd_known_part"]
        d["sync_usd"] += b["sync_usd"] or 0.0
        for k, v in b["cost_parts_usd"].items():
            d["cost_parts_usd"][k] += v
        if b["estimate"] and b["estimate"]["cost_usd"] is not None:
            d["estimate_usd"] = (d["estimate_usd"] or 0.0) + b["estimate"]["cost_usd"]
    return [days[k] for k in sorted(days)]


def sync_usd_same_tokens(summary: dict, book: PriceBook) -> float | None:
    """What a job's answers would have cost as synchronous calls: its batch lane's cost without the batch
    discount, plus its sync lane's cost (already at standard prices)."""
    if not book.batch_discount:
        return None
    lanes = summary.get("lanes") or {}
    sync = (lanes.get("sync") or {}).get("cost_usd") or 0.0
    return (summary["cost_usd_known_part"] - sync) / book.batch_discount + sync


def gather(con: duckdb.DuckDBPyConnection, jobs: list[str], book: PriceBook, since: timedelta | None) -> ReportData:
    """Everything the page shows, for `jobs`, with time-based figures limited to the last `since`."""
    now = utcnow()
    cutoff = now - since if since is not None else None
    summaries = status.jobs_summary(con, jobs)
    batches = _batches(con, jobs, cutoff, book)
    for j in summaries:
        mine = [b for b in batches if b["job"] == j["job"]]
        j["sync_usd_same_tokens"] = sync_usd_same_tokens(j, book)
        j["window"] = {
            "batches": len(mine),
            "cost_usd": sum(b["cost_usd_known_part"] for b in mine),
            "estimate_usd": sum(b["estimate"]["cost_usd"] or 0.0 for b in mine if b["estimate"]),
            "estimated_batches": sum(1 for b in mine if b["estimate"] and b["estimate"]["cost_usd"] is not None),
        }
    return ReportData(generated_at=now, since=cutoff, jobs=summaries, batches=batches, errors=_errors(con, jobs, cutoff))
