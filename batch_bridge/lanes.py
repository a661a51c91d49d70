"""Which lane a run's requests take: a Message Batch (half price, ends within 24 hours) or synchronous
Messages calls (standard price, answers in seconds).

The choice is made per job and per run from the work at hand, after the rows to send are known
(`classify`) and before anything is written: `batch` and `sync` are taken as they are; `auto` sends a
run of at most `sync_max_requests` requests synchronously (a few changed rows are answered now, where a
batch would add minutes or hours for a saving of cents), and otherwise a batch, unless the job has a
`deadline` sooner than its batches have been seen to take (the 90th percentile of the durations of
its latest ended batches, from `batches.created_at`/`ended_at`; with none observed yet, the 24 hours the
API allows a batch). Routing is by run, not by row: one run's rows share their deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from .jobs import Job

BATCH_WINDOW_SECONDS = 24 * 3600.0  # the API's bound on a batch's processing time
OBSERVED_BATCHES = 20  # the latest ended batches of a job whose durations decide a deadline


@dataclass(frozen=True)
class Route:
    lane: str  # batch | sync
    why: str


def human(seconds: float) -> str:
    """'45s', '12m', '2.5h', '1.2d': a duration as people write them in a job's `deadline`."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


def observed_batch_seconds(con: duckdb.DuckDBPyConnection, job: str) -> tuple[float | None, int]:
    """(90th percentile of the durations of the job's latest ended batches in seconds, how many)."""
    p90, n = con.execute(
        """
        SELECT quantile_cont(epoch(ended_at - created_at), 0.9), count(*) FROM (
            SELECT created_at, ended_at FROM bb_state.batches
            WHERE job = ? AND lane = 'batch' AND ended_at IS NOT NULL AND created_at IS NOT NULL
            ORDER BY ended_at DESC LIMIT ?)
        """,
        [job, OBSERVED_BATCHES],
    ).fetchone()
    return (float(p90) if p90 is not None else None), int(n)


def route(con: duckdb.DuckDBPyConnection, job: Job, requests: int) -> Route:
    """The lane of this run's `requests` requests for `job`, and why, in words `plan` shows."""
    if job.lane != "auto":
        return Route(job.lane, f"lane {job.lane}")
    if requests <= job.sync_max_requests:
        return Route("sync", f"auto: {requests:,} request(s), at most sync_max_requests ({job.sync_max_requests:,})")
    why = f"auto: {requests:,} requests, more than sync_max_requests ({job.sync_max_requests:,})"
    if job.deadline_seconds is None:
        return Route("batch", why)
    took, seen = observed_batch_seconds(con, job.name)
    deadline = human(job.deadline_seconds)
    if took is None:
        if job.deadline_seconds < BATCH_WINDOW_SECONDS:
            return Route("sync", f"{why}, but deadline {deadline} is sooner than the 24h a batch may take "
                                 "(no batch of this job has ended yet)")
        return Route("batch", f"{why}; deadline {deadline} is within the 24h a batch may take")
    observed = f"{human(took)} (90th percentile of its last {seen} batch(es))"
    if job.deadline_seconds < took:
        return Route("sync", f"{why}, but deadline {deadline} is sooner than batches of this job take: {observed}")
    return Route("batch", f"{why}; batches of this job end within deadline {deadline}: {observed}")
