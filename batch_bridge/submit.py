"""Request files -> batches, with the submission journal that makes a crash or timeout cost nothing twice.

For every batch: the request file is written and a `prepared` journal row committed; the row moves to
`creating` right before the create call and to `created` with the batch id right after. The create
runs without SDK retries. When its outcome is unknown (timeout, 5xx, a crash in between), the batch is
looked for with `list` (created since the call, not yet known, same request count) and adopted;
only when it is certainly absent is the same file sent again.

Because adoption can only match on the request count, two submissions with the same count are never
in the create window at the same time: they are created one after the other (different counts still
go in parallel). Otherwise a crash after both creates could let each adopt the other's batch.

Two knobs are read from the environment at call time (seconds; both are for operators and tests):
`BATCH_BRIDGE_RECONCILE_GRACE` (default 60): how long a create of unknown outcome is looked for in
`list` before the file is sent again; `BATCH_BRIDGE_CREATE_TIMEOUT` (default 600): the create call's
timeout, after which its outcome is unknown and reconciled.
"""

from __future__ import annotations

import os
import threading
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import anthropic
import duckdb

from . import api, state
from .config import Settings
from .errors import ApiAuthError, ApiError, ApiRequestRejected, BudgetExceeded, ConfigError
from .estimate import Counting, Estimate, estimate_job
from .export import HASH_VERSION, JobPlan, classify, key_json_sql, measure, stage, warehouse_attached, write_requests
from .jobs import Job
from .pricing import load_prices
from .progress import Progress, Silent

# A create whose outcome is unknown is looked for in `list` for this long before the file is resent.
RECONCILE_GRACE = timedelta(seconds=60)
CREATE_TIMEOUT = 600.0
ENV_RECONCILE_GRACE = "BATCH_BRIDGE_RECONCILE_GRACE"
ENV_CREATE_TIMEOUT = "BATCH_BRIDGE_CREATE_TIMEOUT"
CLOCK_SKEW = timedelta(minutes=5)
MAX_CREATE_TRIES = 4
# One adoption at a time in this process, so two threads can never adopt the same orphan.
_adopt_lock = threading.Lock()


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must be >= 0 seconds")
    return value


def reconcile_grace() -> timedelta:
    """How long a create of unknown outcome is looked for before its file is sent again."""
    return timedelta(seconds=_env_seconds(ENV_RECONCILE_GRACE, RECONCILE_GRACE.total_seconds()))


def create_timeout() -> float:
    return _env_seconds(ENV_CREATE_TIMEOUT, CREATE_TIMEOUT)


@dataclass
class SubmitReport:
    plans: list[JobPlan] = field(default_factory=list)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)  # batch ids created (or adopted) by this run
    adopted: list[str] = field(default_factory=list)
    pending_unknown: list[str] = field(default_factory=list)  # submissions still being reconciled


def snapshot_key_versions(con: duckdb.DuckDBPyConnection, job: Job, key_types: dict[str, str]) -> None:
    """Record each key's current input (only keys that are new or changed) and the job definition.

    Only rows of `bb_classified` can be new or changed: the others are hits of `key_inputs`, unchanged
    by definition. `key_inputs` (the latest input of each key, with its prompt fingerprint) is written
    in the same transaction as `key_versions`, so the two never disagree."""
    now = state.utcnow()
    stored = "c.disposition NOT IN ('null_key', 'duplicate_key', 'empty_prompt')"
    con.execute(
        f"""
        INSERT INTO bb_state.key_versions
        SELECT $job, c.custom_id, {key_json_sql(job, 'c')}, c.input_hash, $now
        FROM bb_classified c
        LEFT JOIN (SELECT custom_id, input_hash FROM bb_state.key_inputs WHERE job = $job) k ON k.custom_id = c.custom_id
        WHERE {stored} AND (k.input_hash IS NULL OR k.input_hash <> c.input_hash)
        """,
        {"job": job.name, "now": now},
    )
    con.execute(
        f"""
        MERGE INTO bb_state.key_inputs t
        USING (SELECT custom_id, input_hash, disposition = 'up_to_date' AS answered, prompt_bytes, fingerprint
               FROM bb_classified c WHERE {stored}) n
        ON t.job = $job AND t.custom_id = n.custom_id
        WHEN MATCHED AND (t.input_hash <> n.input_hash OR t.answered <> n.answered
                          OR t.fingerprint IS DISTINCT FROM n.fingerprint OR t.prompt_bytes IS DISTINCT FROM n.prompt_bytes
                          OR t.static_hash IS DISTINCT FROM $static_hash OR t.hash_version IS DISTINCT FROM $hash_version)
          THEN UPDATE SET input_hash = n.input_hash, answered = n.answered, static_hash = $static_hash,
                          hash_version = $hash_version, prompt_bytes = n.prompt_bytes, fingerprint = n.fingerprint
        WHEN NOT MATCHED THEN INSERT VALUES ($job, n.custom_id, n.input_hash, n.answered, $static_hash, $hash_version,
                                             n.prompt_bytes, n.fingerprint)
        """,
        {"job": job.name, "static_hash": job.static_hash, "hash_version": HASH_VERSION},
    )
    con.execute("DELETE FROM bb_state.rejections WHERE job = ?", [job.name])
    con.execute(
        f"""
        INSERT INTO bb_state.rejections
        SELECT $job, {key_json_sql(job, 'c')}, disposition, NULL, $now FROM bb_classified c
        WHERE disposition NOT IN ('send', 'up_to_date', 'in_flight')
        """,
        {"job": job.name, "now": now},
    )
    con.execute(
        "INSERT OR REPLACE INTO bb_state.jobs VALUES (?, ?, ?, ?, ?)",
        [job.name, json.dumps(job.to_json()), job.static_hash, json.dumps(list(key_types.items())), now],
    )


def counting_for(settings: Settings, client: anthropic.Anthropic | None) -> Counting | None:
    """The token counting endpoint of `client` for estimates; None offline or when counting is off."""
    if client is None or settings.count_sample == 0:
        return None
    return Counting(lambda params: api.count_tokens(client, params), api.endpoint_of(client),
                    sample=settings.count_sample, workers=settings.concurrency)


def plan_jobs(
    con: duckdb.DuckDBPyConnection, settings: Settings, jobs: list[Job], *, progress: Progress = Silent(),
    prepare: Callable[[Job, JobPlan, duckdb.DuckDBPyConnection, dict[str, str]], None] | None = None,
    client: anthropic.Anthropic | None = None,
) -> tuple[list[JobPlan], dict[str, Estimate]]:
    """Stage and classify every job (warehouse attached read-only); optionally prepare submissions.
    With a client, input tokens are counted by the API (see estimate.py); without, a rule estimates them."""
    plans, estimates = [], {}
    book = load_prices(settings.prices_file)
    counting = counting_for(settings, client)
    by_catalog: dict[str, list[Job]] = {}
    for j in jobs:
        by_catalog.setdefault(j.relation.database, []).append(j)
    for catalog, group in by_catalog.items():
        with warehouse_attached(con, settings, catalog):
            for job in group:
                plan = JobPlan(job)
                key_types = stage(con, job)
                classify(con, job, plan)
                if plan.send_requests:
                    measure(con, job, plan)
                estimates[job.name] = estimate_job(con, job, plan, book, counting,
                                                   cache_hit_rate=settings.cache_hit_rate)
                for warning in estimates[job.name].warnings:
                    progress.step(f"{job.name}: warning: {warning}")
                progress.step(
                    f"{job.name}: {plan.staged:,} rows staged, {plan.send_keys:,} to send as "
                    f"{plan.send_requests:,} requests in {len(plan.chunks)} batch(es)"
                )
                if prepare is not None:
                    prepare(job, plan, con, key_types)
                plans.append(plan)
    return plans, estimates


def check_budget(job: Job, estimate: Estimate, max_cost: float | None) -> None:
    limits = [(v, n) for v, n in ((job.budget_usd, f"meta.batch_bridge.budget_usd of job {job.name!r}"),
                                  (max_cost, "--max-cost")) if v is not None]
    for limit, name in limits:
        if estimate.batch_usd is None:
            raise BudgetExceeded(
                f"job {job.name!r}: the cost of model {job.model!r} is unknown, so it cannot be held to "
                f"{name} = ${limit:.2f}; nothing was sent",
                hint="add the model to a price file (BATCH_BRIDGE_PRICES) or remove the budget",
            )
        if estimate.batch_usd > limit:
            raise BudgetExceeded(
                f"job {job.name!r}: estimated cost ${estimate.batch_usd:.4f} for {estimate.requests:,} requests "
                f"exceeds {name} = ${limit:.2f}; nothing was sent",
                hint="raise the budget, pass a larger --max-cost, or send fewer rows",
            )


def _prepare(settings: Settings, run_stamp: str, out: list[str],
             fault: Callable[[str], None] | None = None) -> Callable[..., None]:
    def prepare(job: Job, plan: JobPlan, con: duckdb.DuckDBPyConnection, key_types: dict[str, str]) -> None:
        names = [f"{run_stamp}_{job.name}_{c.index:03d}_{uuid.uuid4().hex[:6]}" for c in plan.chunks]
        paths = write_requests(con, job, plan, settings.requests_dir, names) if plan.chunks else []
        con.execute("BEGIN")
        try:
            snapshot_key_versions(con, job, key_types)
            now = state.utcnow()
            for chunk, name, path in zip(plan.chunks, names, paths):
                con.execute(
                    "INSERT INTO bb_state.submissions (submission_id, job, state, request_file, request_count, "
                    "body_bytes, prepared_at) VALUES (?, ?, 'prepared', ?, ?, ?, ?)",
                    [name, job.name, str(path), chunk.requests, chunk.body_bytes, now],
                )
                con.execute(
                    "INSERT INTO bb_state.sent_requests SELECT ?, ?, request_custom_id, input_hash, attempt, key_count, prompt_chars "
                    "FROM bb_lines WHERE rn BETWEEN ? AND ?",
                    [name, job.name, chunk.first, chunk.last],
                )
                out.append(name)
            if fault:
                fault("before_prepare_commit")
            con.execute("COMMIT")
        except Exception:
            state.rollback(con)
            raise

    return prepare


def prepare_submissions(
    settings: Settings, jobs: list[Job], *, max_cost: float | None = None, progress: Progress = Silent(),
    fault: Callable[[str], None] | None = None, client: anthropic.Anthropic | None = None,
) -> SubmitReport:
    """Plan every job, check budgets, and journal `prepared` submissions with their request files."""
    report = SubmitReport()
    stamp = state.utcnow().strftime("%Y%m%dT%H%M%SZ")
    with state.connect(settings) as con:
        # Budgets are checked on a dry plan first, so that a refused job writes nothing at all (and
        # no job is sent when another is refused). Without any budget there is nothing to check.
        if max_cost is not None or any(j.budget_usd is not None for j in jobs):
            plans, estimates = plan_jobs(con, settings, jobs, progress=Silent(), client=client)
            for plan in plans:
                check_budget(plan.job, estimates[plan.job.name], max_cost)
        names: list[str] = []
        plans, estimates = plan_jobs(con, settings, jobs, progress=progress, prepare=_prepare(settings, stamp, names, fault),
                                     client=client)
    report.plans, report.estimates = plans, estimates
    return report


def _known_batch_ids(settings: Settings) -> set[str]:
    with state.connect(settings) as con:
        return {r[0] for r in con.execute("SELECT batch_id FROM bb_state.batches").fetchall()}


def find_orphan(client: anthropic.Anthropic, settings: Settings, started: datetime, request_count: int) -> api.BatchInfo | None:
    """A batch created since `started` that we do not know and that has our request count."""
    known = _known_batch_ids(settings)
    candidates = [
        b for b in api.list_since(client, started - CLOCK_SKEW)
        if b.id not in known and b.total == request_count
    ]
    candidates.sort(key=lambda b: b.created_at or started)
    return candidates[0] if candidates else None


def _record_batch(settings: Settings, sub_id: str, job: str, info: api.BatchInfo, note: str | None) -> None:
    with state.connect(settings) as con:
        con.execute("BEGIN")
        state.record_created(con, sub_id, info.id, note)
        con.execute(
            "INSERT INTO bb_state.batches (batch_id, job, submission_id, processing_status, local_state, request_count, "
            "processing, succeeded, errored, canceled, expired, created_at, expires_at, ended_at, "
            "cancel_initiated_at, archived_at, results_url, polled_at) "
            "VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [info.id, job, sub_id, info.processing_status, info.total, info.processing, info.succeeded,
             info.errored, info.canceled, info.expired, info.created_at, info.expires_at, info.ended_at,
             info.cancel_initiated_at, info.archived_at, info.results_url, state.utcnow()],
        )
        con.execute("COMMIT")


def _adopt(client: anthropic.Anthropic, settings: Settings, sub: dict, started: datetime, note: str) -> str | None:
    """Adopt the orphan of an interrupted create, if `list` shows one. Returns its id."""
    with _adopt_lock:
        orphan = find_orphan(client, settings, started, sub["request_count"])
        if orphan is None:
            return None
        _record_batch(settings, sub["submission_id"], sub["job"], orphan, note)
        return orphan.id


def create_one(
    client: anthropic.Anthropic, settings: Settings, sub: dict, *, sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = state.utcnow, fault: Callable[[str], None] | None = None,
) -> tuple[str | None, bool]:
    """Create (or adopt) the batch of one journalled submission. Returns (batch id or None, adopted)."""
    sub_id, path = sub["submission_id"], Path(sub["request_file"])
    grace = reconcile_grace()
    if sub["state"] == "creating":
        # A previous run was interrupted during the create call: the batch may exist.
        started = sub["create_started_at"]
        adopted = _adopt(client, settings, sub, started, "adopted after an interrupted create")
        if adopted is not None:
            return adopted, True
        if now() - started < grace:
            return None, False  # too early to be sure it is absent; the next run looks again
    for attempt in range(MAX_CREATE_TRIES):
        if fault:
            fault("before_journal")
        with state.connect(settings) as con:
            state.start_create(con, sub_id)
        started = now()
        if fault:
            fault("before_create")
        try:
            info = api.create_batch(client, path, timeout=create_timeout())
        except api.CreateRefused as e:
            with state.connect(settings) as con:
                state.refuse_create(con, sub_id, f"create refused: {e.message}")
            api.sleep_backoff(attempt, e.retry_after, sleep)
            continue
        except (ApiAuthError, ApiRequestRejected) as e:
            # A definite 4xx (bad key, bad body): nothing was created, so no reconciliation is needed.
            with state.connect(settings) as con:
                state.refuse_create(con, sub_id, f"create rejected: {e.message}")
            raise
        except api.CreateOutcomeUnknown:
            # The server may have created it. Look for it a few times before sending the file again.
            for look in range(4):
                adopted = _adopt(client, settings, sub, started, "adopted after an ambiguous create")
                if adopted is not None:
                    return adopted, True
                if look < 3:
                    api.sleep_backoff(look, None, sleep, cap=8.0)
            if now() - started < grace:
                return None, False  # leave it `creating`: the next run reconciles
            continue
        if fault:
            fault("after_create")
        _record_batch(settings, sub_id, sub["job"], info, None)
        return info.id, False
    raise ApiError(f"submission {sub_id}: the API refused the create {MAX_CREATE_TRIES} times; it stays journalled "
                   "and the next run tries again")


def pending_submissions(settings: Settings, jobs: list[str] | None = None) -> list[dict]:
    with state.connect(settings) as con:
        rows = con.execute(
            "SELECT submission_id, job, state, request_file, request_count, create_started_at FROM bb_state.submissions "
            "WHERE state IN ('prepared', 'creating') ORDER BY prepared_at, submission_id"
        ).fetchall()
    cols = ["submission_id", "job", "state", "request_file", "request_count", "create_started_at"]
    subs = [dict(zip(cols, r)) for r in rows]
    return [s for s in subs if jobs is None or s["job"] in jobs]


def send_pending(
    client: anthropic.Anthropic, settings: Settings, *, jobs: list[str] | None = None, progress: Progress = Silent(),
    sleep: Callable[[float], None] = time.sleep, fault: Callable[[str], None] | None = None,
) -> SubmitReport:
    """Create a batch for every journalled submission (also those left by an interrupted run)."""
    report = SubmitReport()
    subs = pending_submissions(settings, jobs)
    if not subs:
        return report
    done = 0

    # Submissions with the same request count go one after the other (see the module docstring).
    groups: dict[int, list[dict]] = {}
    for s in subs:
        groups.setdefault(s["request_count"], []).append(s)

    def one_group(group: list[dict]) -> list[tuple[dict, str | None, bool] | Exception]:
        out: list[tuple[dict, str | None, bool] | Exception] = []
        for sub in group:
            try:
                bid, adopted = create_one(client, settings, sub, sleep=sleep, fault=fault)
            except ApiError as e:
                out.append(e)
                break  # the rest of this group stays journalled for the next run
            out.append((sub, bid, adopted))
        return out

    errors: list[Exception] = []
    with ThreadPoolExecutor(max_workers=min(settings.concurrency, len(groups))) as pool:
        futures = [pool.submit(one_group, g) for g in groups.values()]
        for fut in futures:
            for item in fut.result():
                if isinstance(item, Exception):
                    errors.append(item)
                    continue
                sub, bid, adopted = item
                done += 1
                if bid is None:
                    report.pending_unknown.append(sub["submission_id"])
                else:
                    report.batches.append(bid)
                    if adopted:
                        report.adopted.append(bid)
                progress.tick("batches submitted", done, len(subs))
    if errors:
        raise errors[0]
    return report
