"""Request files -> batches, with the submission journal that makes a crash or timeout cost nothing twice.

For every batch: the request file is written and a `prepared` journal row committed; the row moves to
`creating` right before the create call and to `created` with the batch id right after. The create
runs without SDK retries: the API has no idempotency key, and a workspace is shared with other clients.

When a create's outcome is unknown (timeout, reset, 5xx, a crash in between), the moment is journalled
(`outcome_unknown_at`) and the batch is looked for with `list`: created since the first attempt began,
not yet known, with our request count. The file is sent again only once it has been looked for over a
whole grace (`Settings.reconcile_grace`) counted from that moment, across runs if needed: a run that
cannot decide yet leaves the submission `creating` and the next run looks again. A new batch can take a
while to appear in `list` (propagation delay), which is why the grace counts from the unknown outcome.

Adoption matches on the request count, so it is checked, not assumed: an adopted batch is confirmed by
its answers (their custom_ids are ours) before anything is loaded (`collect.py`); one that proves
foreign is released (`state.release_foreign`: never loaded, cancelled or deleted) and the search goes
on among the other candidates. Two of our submissions with the same count are never in the create window
together: they are created one after the other (the cut in export.py gives consecutive batches
different counts, so several can still be created at once).

The bridge keeps its own requests in `in_progress` batches within the workspace's processing-queue limit
(`Settings.max_queued_requests`); what does not fit stays `prepared` for a later run (or for `run`, as
batches end), and a 429 on create is waited out briefly or left for the next run, never an error.
A create the API rejects for good (400, 413) abandons that submission only: its inputs are recorded in
`refused_inputs` with the API's message (not sent again until the rows or the job change).
"""

from __future__ import annotations

import threading
import json
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import duckdb

from . import api, collect, lanes, state
from .config import Settings
from .errors import ApiAccountError, ApiRequestRejected, BudgetExceeded
from .estimate import Counting, Estimate, StartedCount, calibration, estimate_job, input_tokens_sql, start_count
from .export import (HASH_VERSION, InputLimit, JobPlan, WarehouseAccess, classify, key_json_sql, measure,
                     release_rows, stage, warehouse_attached, widest_prompts, write_requests)
from .jobs import Job, quote_literal
from .preflight import JobPreflight, cache_warning, check_jobs
from .pricing import load_prices
from .progress import Progress, Silent
from .sync_lane import SyncReport

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

CLOCK_SKEW = timedelta(minutes=5)
MAX_CREATE_TRIES = 4
# Refused creates (429/529) are waited out in this run for this long in all, per submission; a longer
# wait is left for a later run, so that a scheduled `sync` ends within about a minute of its work.
MAX_WAIT_IN_RUN = 60.0
# Looks in `list` right after an ambiguous create, before leaving the decision to a later run.
LOOKS_AFTER_UNKNOWN = 4
# One adoption at a time in this process, so two threads can never adopt the same orphan.
_adopt_lock = threading.Lock()
Outcome = Literal["created", "adopted", "undecided", "deferred", "held", "rejected"]


@dataclass
class SubmitReport:
    plans: list[JobPlan] = field(default_factory=list)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)  # batch ids created (or adopted) by this run
    adopted: list[str] = field(default_factory=list)
    pending_unknown: list[str] = field(default_factory=list)  # submissions still being reconciled
    waiting_for_queue: list[str] = field(default_factory=list)  # left `prepared`: no room in the queue, or a 429
    # left `prepared` because a create of the same request count is still undecided (see the module docstring)
    held: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # submission id -> the API's message (400/413)
    sync: SyncReport = field(default_factory=SyncReport)  # the sync lane's calls
    sync_loaded: dict[str, int] = field(default_factory=dict)  # job -> answers loaded (sync runs, ended batches)

    def absorb(self, other: "SubmitReport") -> None:
        """Add the create outcomes of another pass over the journal."""
        self.batches += other.batches
        self.adopted += other.adopted
        self.pending_unknown = sorted(set(self.pending_unknown) | set(other.pending_unknown))
        self.waiting_for_queue = sorted(set(other.waiting_for_queue))
        self.held = sorted(set(other.held))
        self.rejected.update(other.rejected)


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
    current = (f"SELECT custom_id, input_hash, disposition = 'up_to_date' AS answered, prompt_bytes, fingerprint, "
               f"{key_json_sql(job, 'c')} AS key_json FROM bb_classified c WHERE {stored}")
    known = {"job": job.name, "static_hash": job.static_hash, "hash_version": HASH_VERSION}
    (first,) = con.execute("SELECT NOT EXISTS (SELECT 1 FROM bb_state.key_inputs WHERE job = $job)",
                           {"job": job.name}).fetchone()
    if first:
        # The job's first submit: every key is new, and a MERGE would join them all with nothing
        # (measured: 1.2 s for 1M keys against 0.7 s for the INSERT, ~15 s for 10M against 9-10 s).
        con.execute(
            f"""
            INSERT INTO bb_state.key_inputs
            SELECT $job, n.custom_id, n.input_hash, n.answered, $static_hash, $hash_version, n.prompt_bytes,
                   n.fingerprint, n.key_json
            FROM ({current}) n
            """,
            known,
        )
    else:
        _merge_key_inputs(con, current, known)
    con.execute("DELETE FROM bb_state.rejections WHERE job = ?", [job.name])
    con.execute(
        f"""
        INSERT INTO bb_state.rejections
        SELECT $job, {key_json_sql(job, 'c')}, disposition,
               CASE WHEN disposition = 'too_long' THEN '~' || input_tokens_est || ' input tokens (estimated)'
                    ELSE refusal END,
               $now
        FROM bb_classified c
        WHERE disposition NOT IN ('send', 'up_to_date', 'in_flight')
        """,
        {"job": job.name, "now": now},
    )
    con.execute(
        "INSERT OR REPLACE INTO bb_state.jobs VALUES (?, ?, ?, ?, ?)",
        [job.name, json.dumps(job.to_json()), job.static_hash, json.dumps(list(key_types.items())), now],
    )


def _merge_key_inputs(con: duckdb.DuckDBPyConnection, current: str, known: dict[str, str]) -> None:
    """`key_inputs` brought up to the keys' `current` inputs: changed keys updated, new keys added.
    A key's `key_json` changes with its input, as its `key_versions` rows do."""
    con.execute(
        f"""
        MERGE INTO bb_state.key_inputs t
        USING ({current}) n
        ON t.job = $job AND t.custom_id = n.custom_id
        WHEN MATCHED AND (t.input_hash <> n.input_hash OR t.answered <> n.answered
                          OR t.fingerprint IS DISTINCT FROM n.fingerprint OR t.prompt_bytes IS DISTINCT FROM n.prompt_bytes
                          OR t.static_hash IS DISTINCT FROM $static_hash OR t.hash_version IS DISTINCT FROM $hash_version)
          THEN UPDATE SET input_hash = n.input_hash, answered = n.answered, static_hash = $static_hash,
                          hash_version = $hash_version, prompt_bytes = n.prompt_bytes, fingerprint = n.fingerprint,
                          key_json = CASE WHEN t.input_hash <> n.input_hash THEN n.key_json ELSE t.key_json END
        WHEN NOT MATCHED THEN INSERT VALUES ($job, n.custom_id, n.input_hash, n.answered, $static_hash, $hash_version,
                                             n.prompt_bytes, n.fingerprint, n.key_json)
        """,
        known,
    )


def counting_for(settings: Settings, client: anthropic.Anthropic | None) -> Counting | None:
    """The token counting endpoint of `client` for estimates; None offline or when counting is off."""
    if client is None or settings.count_sample == 0:
        return None
    return Counting(lambda params: api.count_tokens(client, params), api.endpoint_for(settings),
                    sample=settings.count_sample, workers=settings.concurrency)


def plan_jobs(
    con: duckdb.DuckDBPyConnection, settings: Settings, jobs: list[Job], *, progress: Progress = Silent(),
    prepare: Preparer | None = None,
    warehouse: WarehouseAccess | None = None,
    preflights: dict[str, JobPreflight] | Future[dict[str, JobPreflight]] | None = None,
    client: anthropic.Anthropic | None = None,
) -> tuple[list[JobPlan], dict[str, Estimate]]:
    """Stage and classify every job (warehouse attached read-only, or read through `warehouse`);
    optionally prepare submissions (`prepare`: write their request files, then journal them).

    With the preflight's findings (or a Future of them, still being found: it is waited for once the
    rows are classified, their request files written and journalled in a transaction not yet
    committed), rows longer than the model's context window are `too_long`, and each plan carries the
    findings (with a warning when a cache marked in the job cannot work). With a client, input tokens
    are counted by the API (see estimate.py); without, a rule estimates them."""
    plans, estimates = [], {}
    book = load_prices(settings.prices_file)
    counting = counting_for(settings, client)
    with state.room_for_joining(con, settings):
        for j in jobs:  # classify reads the per-input summaries: answers loaded so far must be in them
            state.fold_outcomes(con, j.name)
    by_catalog: dict[str, list[Job]] = {}
    for j in jobs:
        by_catalog.setdefault(j.relation.database, []).append(j)
    for catalog, group in by_catalog.items():
        opened = warehouse(con, settings, catalog, group) if warehouse else warehouse_attached(con, settings, catalog)
        with opened:
            for job in group:
                # Under the plan's own limit, with room for the widest prompts once they are staged:
                # their width is not known before (`state.grown_until_it_fits`).
                with state.room_for_joining(con, settings):
                    key_types = state.grown_until_it_fits(con, settings, lambda: stage(con, job))
                with state.room_for_joining(con, settings, widest_prompts(con)):
                    if isinstance(preflights, Future) and preflights.done():
                        preflights = preflights.result()
                    written: Written | None = None
                    counts: StartedCount | None = None
                    try:
                        if isinstance(preflights, Future):
                            # Still asking the API (the SDK's import comes first): classify as if the model's
                            # context window held every row, write the request files and journal them in a
                            # transaction on that guess meanwhile, then wait. The guess stands when no staged
                            # row is over the window (the journal is committed below); otherwise it is rolled
                            # back, and the rows are classified, written and journalled again with the window.
                            plan = _classified(con, settings, job, None)
                            # The sample's token counts are asked for now: their threads wait for the SDK's
                            # import like the preflight, then ask beside it, not after it. Picked before the
                            # journal's transaction begins: a pick that runs out of memory is picked again
                            # with more (`state.grown_until_it_fits`), which an aborted transaction would refuse.
                            counts = _start_count(con, settings, job, plan, counting)
                            if prepare is not None:
                                written = prepare.write(job, plan, con)
                                prepare.begin(job, plan, con, key_types, written)
                            preflights = preflights.result()
                            found = preflights.get(job.name) or JobPreflight(job.name, job.model)
                            limit = _input_limit(con, job, found)
                            if limit is not None and _any_over(con, limit):
                                if prepare is not None and written is not None:
                                    prepare.abandon(con, written)
                                    written = None
                                if counts is not None:  # a sample of requests not sent as they were: not waited for
                                    counts.close(wait=False)
                                    counts = None
                                plan = _classified(con, settings, job, limit)
                        else:
                            found = (preflights or {}).get(job.name) or JobPreflight(job.name, job.model)
                            plan = _classified(con, settings, job, _input_limit(con, job, found))
                        # When the preflight had answered before the rows were classified (or they were
                        # classified again), the sample's token counts are asked for now (HTTP, in threads),
                        # while the request files are written and journalled.
                        if counts is None:
                            counts = _start_count(con, settings, job, plan, counting)
                        if prepare is not None:
                            if written is None:  # not written during the preflight
                                written = prepare.write(job, plan, con)
                            prepare.journal(job, plan, con, key_types, written)
                            written = None  # journalled: the submissions own the files now
                        estimates[job.name] = estimate_job(con, job, plan, book, counting,
                                                           cache_hit_rate=settings.cache_hit_rate, started=counts)
                    finally:
                        if counts is not None:  # gathered by the estimate, or not needed (no waiting for a refused job's)
                            counts.close(wait=False)
                        if prepare is not None and written is not None:  # refused, or failed before its journal's COMMIT
                            prepare.abandon(con, written)
                    # A view's copied rows (every prompt) are not needed once the request files are written;
                    # after an error, closing the connection drops them.
                    release_rows(con, job)
                    for warning in estimates[job.name].warnings:
                        progress.step(f"{job.name}: warning: {warning}")
                    warning = cache_warning(job, estimates[job.name])
                    plan.preflight = found.to_json()
                    if warning:
                        plan.preflight["warnings"] = [*plan.preflight["warnings"], warning]
                    where = (f"in {len(plan.chunks)} batch(es)" if plan.lane == "batch"
                             else "as synchronous calls")
                    progress.step(
                        f"{job.name}: {plan.staged:,} rows staged, {plan.send_keys:,} to send as "
                        f"{plan.send_requests:,} requests {where}" + (f" ({plan.lane_why})" if plan.send_requests else "")
                    )
                    plans.append(plan)
    return plans, estimates


def _start_count(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, plan: JobPlan, counting: Counting | None
                 ) -> StartedCount | None:
    """The token counting of the plan's sample, begun (None when nothing is to be counted)."""
    if counting is None or counting.sample <= 0 or not plan.send_requests:
        return None
    return state.grown_until_it_fits(con, settings, lambda: start_count(con, job, counting))


def _classified(con: duckdb.DuckDBPyConnection, settings: Settings, job: Job, limit: InputLimit | None) -> JobPlan:
    """The staged rows of `job` classified (held to `limit`), routed to a lane and measured."""
    def classified() -> JobPlan:
        plan = JobPlan(job)
        classify(con, job, plan, limit)
        routed = lanes.route(con, job, plan.send_requests)
        plan.lane, plan.lane_why = routed.lane, routed.why
        if plan.send_requests:
            measure(con, job, plan, settings.max_queued_requests)
        return plan

    # Temp tables from `bb_staged` only: run again, with more memory, if DuckDB runs out of the plan's.
    return state.grown_until_it_fits(con, settings, classified)


def _any_over(con: duckdb.DuckDBPyConnection, limit: InputLimit) -> bool:
    """Whether a staged row's input is over the context window: only then does holding rows to it
    change their classification."""
    (over,) = con.execute(
        f"SELECT count(*) > 0 FROM bb_staged s WHERE CAST({limit.tokens_sql} AS BIGINT) > $window",
        {"window": limit.max_input_tokens}).fetchone()
    return bool(over)


def _input_limit(con: duckdb.DuckDBPyConnection, job: Job, found: JobPreflight) -> InputLimit | None:
    """The context window to hold each row to, counted by the job's calibrated rule."""
    if not found.max_input_tokens:
        return None
    return InputLimit(found.max_input_tokens, input_tokens_sql(job, calibration(con, job).scale, "s.prompt_chars"))


def report_preflight(plans: list[JobPlan], progress: Progress) -> None:
    """Each job's preflight warnings and what it could not check, as progress lines (stderr)."""
    for p in plans:
        for w in (p.preflight or {}).get("warnings", []):
            progress.step(f"{p.job.name}: warning: {w}")
        for u in (p.preflight or {}).get("unchecked", []):
            progress.step(f"{p.job.name}: preflight could not check: {u}")


def _usd(amount: float) -> str:
    """A budget as given: cents when it has no more, else every digit (0.0001 is not $0.00)."""
    if round(amount, 2) == amount:
        return f"${amount:.2f}"
    digits = f"{amount:.10f}".rstrip("0")
    return "$" + (digits if not digits.endswith(".") else f"{amount:g}")


def check_budget(job: Job, estimate: Estimate, max_cost: float | None) -> None:
    limits = [(v, n) for v, n in ((job.budget_usd, f"meta.batch_bridge.budget_usd of job {job.name!r}"),
                                  (max_cost, "--max-cost")) if v is not None]
    for limit, name in limits:
        if estimate.lane_usd is None:
            raise BudgetExceeded(
                f"job {job.name!r}: the cost of model {job.model!r} is unknown, so it cannot be held to "
                f"{name} = {_usd(limit)}; nothing was sent",
                hint="add the model to a price file (BATCH_BRIDGE_PRICES) or remove the budget",
            )
        if estimate.lane_usd > limit:
            lane = "synchronous calls at standard prices" if estimate.lane == "sync" else "the batch lane, at half price"
            raise BudgetExceeded(
                f"job {job.name!r}: estimated cost ${estimate.lane_usd:.4f} for {estimate.requests:,} requests "
                f"({lane}) "
                f"exceeds {name} = {_usd(limit)}; nothing was sent",
                hint="raise the budget, pass a larger --max-cost, or send fewer rows",
            )


@dataclass
class Written:
    """A job's request files, written and not yet journalled (or journalled in a transaction still open)."""

    names: list[str]
    paths: list[Path]
    begun: bool = False  # their journal's transaction is open: `Preparer.journal` commits it


class Preparer:
    """Writes a job's request files, then journals them as `prepared` submissions (their names go to
    `out`). In steps, so that `plan_jobs` writes the files and journals them in a transaction while the
    preflight is still answering, and commits that transaction only once the preflight stands."""

    def __init__(self, settings: Settings, run_stamp: str, out: list[str],
                 fault: Callable[[str], None] | None = None) -> None:
        self.settings, self.run_stamp, self.out, self.fault = settings, run_stamp, out, fault

    def write(self, job: Job, plan: JobPlan, con: duckdb.DuckDBPyConnection) -> Written:
        names = [f"{self.run_stamp}_{job.name}_{c.index:03d}_{uuid.uuid4().hex[:6]}" for c in plan.chunks]
        # Room for the prompts was given from their width (`room_for_joining`); more while DuckDB runs out.
        paths = state.grown_until_it_fits(
            con, self.settings, lambda: write_requests(con, job, plan, self.settings.requests_dir, names)
        ) if plan.chunks else []
        return Written(names, paths)

    def begin(self, job: Job, plan: JobPlan, con: duckdb.DuckDBPyConnection, key_types: dict[str, str],
              written: Written) -> None:
        """BEGIN and the journal's rows, left uncommitted: `journal` commits them, `abandon` rolls them back.
        Rolled back and begun again, with more memory, if DuckDB runs out of the plan's."""
        state.grown_until_it_fits(con, self.settings, lambda: self._begin(job, plan, con, key_types, written))

    def _begin(self, job: Job, plan: JobPlan, con: duckdb.DuckDBPyConnection, key_types: dict[str, str],
               written: Written) -> None:
        names = written.names
        con.execute("BEGIN")
        try:
            snapshot_key_versions(con, job, key_types)
            now = state.utcnow()
            for chunk, name, path in zip(plan.chunks, names, written.paths):
                con.execute(
                    "INSERT INTO bb_state.submissions (submission_id, job, state, request_file, request_count, "
                    "body_bytes, prepared_at, lane) VALUES (?, ?, 'prepared', ?, ?, ?, ?, ?)",
                    [name, job.name, str(path), chunk.requests, chunk.body_bytes, now, plan.lane],
                )
            if names:
                # Every batch's requests in one pass over `bb_lines` (a pass per batch would grow with the
                # square), each line matched to its batch by an equi-join on a bucket of line numbers no wider
                # than a batch (so a bucket meets two batches at most) and then by its range: a join on the
                # range alone compares every line with every batch (measured on 10M lines in 100 batches:
                # 6.0 s, against 3.9 s; 0.39 s and 0.30 s for 1M in 10).
                width = max(1, min(c.requests for c in plan.chunks[:-1] or plan.chunks))
                con.execute(
                    "INSERT INTO bb_state.sent_requests "
                    "SELECT c.name, $job, l.request_custom_id, l.input_hash, l.attempt, l.key_count, l.prompt_chars "
                    "FROM bb_lines l JOIN (SELECT unnest(generate_series(first // $w, last // $w)) AS bucket, first, last, k "
                    "                      FROM bb_chunks) b ON l.rn // $w = b.bucket AND l.rn BETWEEN b.first AND b.last "
                    "JOIN (SELECT unnest($k) AS k, unnest($names) AS name) c ON c.k = b.k",
                    {"job": job.name, "k": [c.index for c in plan.chunks], "names": names, "w": width},
                )
        except BaseException:
            state.rollback(con)
            raise
        written.begun = True

    def journal(self, job: Job, plan: JobPlan, con: duckdb.DuckDBPyConnection, key_types: dict[str, str],
                written: Written) -> None:
        """Journal the files (or finish the journal `begin` left open): COMMIT."""
        if not written.begun:
            self.begin(job, plan, con, key_types, written)
        try:
            if self.fault:
                self.fault("before_prepare_commit")
            con.execute("COMMIT")
        except BaseException:
            state.rollback(con)
            raise
        finally:
            written.begun = False
        self.out.extend(written.names)

    @staticmethod
    def abandon(con: duckdb.DuckDBPyConnection, written: Written) -> None:
        """Roll back a journal left open and remove the files: refused, or written on a wrong guess."""
        if written.begun:
            state.rollback(con)
            written.begun = False
        for p in written.paths:
            p.unlink(missing_ok=True)


def record_estimates(con: duckdb.DuckDBPyConnection, plans: list[JobPlan], estimates: dict[str, Estimate],
                     names: list[str]) -> None:
    """Write each job's estimate onto the submissions just prepared for it, for `report`.

    The estimate is made per job; each batch gets the share of its requests (cache writes: an equal
    share per batch, one per batch is what the estimate assumes), so the batches of a job add up to it."""
    by_job = {p.job.name: p for p in plans}
    rows = []
    for name in names:
        job, index, _ = name.split("_", 1)[1].rsplit("_", 2)  # named by Preparer.write: stamp_job_index_random
        plan, e = by_job.get(job), estimates.get(job)
        if plan is None or e is None or not e.requests:
            continue
        chunk = plan.chunks[int(index)]
        share = chunk.requests / e.requests
        rows.append((name, None if e.lane_usd is None else e.lane_usd * share,
                     round(e.input_tokens * share), round(e.output_tokens * share),
                     round(e.cache_write_tokens / len(plan.chunks)), round(e.cache_read_tokens * share),
                     None if e.sync_usd is None else e.sync_usd * share))
    if not rows:
        return
    values = ", ".join("(" + ", ".join("NULL" if v is None else quote_literal(v) if isinstance(v, str) else repr(v)
                                       for v in r) + ")" for r in rows)
    # One statement for the few rows there are (one per batch): never a row-by-row executemany.
    con.execute(
        f"""
        UPDATE bb_state.submissions s SET estimated_cost_usd = v.usd, estimated_input_tokens = v.i,
               estimated_output_tokens = v.o, estimated_cache_write_tokens = v.w,
               estimated_cache_read_tokens = v.r, estimated_sync_usd = v.sync
        FROM (VALUES {values}) v(id, usd, i, o, w, r, sync) WHERE s.submission_id = v.id
        """
    )


def prepare_submissions(
    settings: Settings, jobs: list[Job], *, max_cost: float | None = None, progress: Progress = Silent(),
    fault: Callable[[str], None] | None = None, warehouse: WarehouseAccess | None = None,
    client: anthropic.Anthropic | None = None,
) -> SubmitReport:
    """Preflight every job, plan it, check budgets, and journal `prepared` submissions with their
    request files. A job the preflight refuses stops them all before any journal is committed (one
    begun meanwhile is rolled back, and its request files removed)."""
    report = SubmitReport()
    stamp = state.utcnow().strftime("%Y%m%dT%H%M%SZ")
    with state.connect(settings) as con, ThreadPoolExecutor(max_workers=1) as pool:
        # The preflight asks the Models API (after the SDK's import, see api.preload) while the rows are
        # staged and classified and their request files written and journalled in a transaction;
        # `plan_jobs` waits for it before anything is counted or committed, and a refusal rolls that
        # journal back and removes those files.
        own = con.cursor()  # made here: a connection busy in this thread refuses calls from another
        found = checking = pool.submit(_check_apart, own, settings, jobs, client)
        # Budgets are checked on a dry plan first, so that a refused job writes nothing at all (and
        # no job is sent when another is refused). Without any budget there is nothing to check.
        if max_cost is not None or any(j.budget_usd is not None for j in jobs):
            plans, estimates = plan_jobs(con, settings, jobs, progress=Silent(), warehouse=warehouse, preflights=found,
                                         client=client)
            for plan in plans:
                check_budget(plan.job, estimates[plan.job.name], max_cost)
        names: list[str] = []
        plans, estimates = plan_jobs(con, settings, jobs, progress=progress, prepare=Preparer(settings, stamp, names, fault),
                                     warehouse=warehouse, preflights=found, client=client)
        record_estimates(con, plans, estimates, names)
        checking.result()  # resolved by plan_jobs already; raises here if a job list left it unread
    report_preflight(plans, progress)
    report.plans, report.estimates = plans, estimates
    return report


def _check_apart(own: duckdb.DuckDBPyConnection, settings: Settings, jobs: list[Job],
                 client: anthropic.Anthropic | None) -> dict[str, JobPreflight]:
    """`check_jobs` on a connection of its own, in a thread beside the staging; closes it."""
    try:
        return check_jobs(own, settings, jobs, client)
    finally:
        own.close()


def _known_batch_ids(settings: Settings) -> set[str]:
    """Every batch id the bridge has recorded: its own, and those proven foreign."""
    with state.connect(settings) as con:
        return {r[0] for r in con.execute(
            "SELECT batch_id FROM bb_state.batches UNION SELECT batch_id FROM bb_state.foreign_batches").fetchall()}


def candidates(client: anthropic.Anthropic, settings: Settings, sub: dict, now: datetime) -> list[api.BatchInfo]:
    """Batches of the workspace that may be this submission's: created between its first create and the
    end of its grace, not recorded by us, with its request count. Most plausible first: created after our
    first create began (the server cannot create it before the request), then nearest to it."""
    started = sub["first_create_at"] or sub["create_started_at"] or now
    unknown = sub["outcome_unknown_at"] or now
    lo, hi = started - CLOCK_SKEW, unknown + timedelta(seconds=settings.reconcile_grace) + CLOCK_SKEW
    known = _known_batch_ids(settings)
    found = [b for b in api.list_since(client, lo)
             if b.id not in known and b.total == sub["request_count"]
             and b.created_at is not None and b.created_at <= hi]
    return sorted(found, key=lambda b: (b.created_at < started, abs((b.created_at - started).total_seconds())))


def _record_batch(settings: Settings, sub_id: str, job: str, info: api.BatchInfo, note: str | None,
                  adopted: bool = False) -> None:
    with state.connect(settings) as con:
        con.execute("BEGIN")
        state.record_created(con, sub_id, info.id, note, adopted=adopted)
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


def _adopt(client: anthropic.Anthropic, settings: Settings, sub: dict, now: datetime, note: str) -> str | None:
    """Adopt the most plausible batch of an interrupted create, if `list` shows one. Returns its id.

    Adoption is provisional: the batch's answers confirm it before anything is loaded (collect.py)."""
    with _adopt_lock:
        found = candidates(client, settings, sub, now)
        if not found:
            return None
        _record_batch(settings, sub["submission_id"], sub["job"], found[0], note, adopted=True)
        return found[0].id


def _refuse_inputs(settings: Settings, sub: dict, job: Job | None, message: str) -> None:
    """A create rejected for good: abandon the submission and record its inputs with the API's message,
    so that they are not sent again as they are and `status` and the rejected rows say why."""
    with state.connect(settings) as con:
        con.execute("BEGIN")
        try:
            state.abandon_submission(con, sub["submission_id"], f"create rejected: {message}")
            con.execute(
                "INSERT INTO bb_state.refused_inputs SELECT job, input_hash, ?, submission_id, ?, ? "
                "FROM bb_state.sent_requests WHERE submission_id = ?",
                [job.definition_hash if job else "", message, state.utcnow(), sub["submission_id"]],
            )
            # The snapshot's rejected rows gain these keys now, so that `status` tells at once.
            con.execute(
                """
                INSERT INTO bb_state.rejections
                SELECT k.job, v.key_json, 'create_rejected', ?, ? FROM bb_state.key_inputs k
                JOIN (SELECT job, custom_id, arg_max(key_json, seen_at) AS key_json FROM bb_state.key_versions
                      WHERE job = ? GROUP BY ALL) v USING (job, custom_id)
                WHERE k.job = ? AND k.input_hash IN (SELECT input_hash FROM bb_state.sent_requests WHERE submission_id = ?)
                """,
                [message, state.utcnow(), sub["job"], sub["job"], sub["submission_id"]],
            )
            con.execute("COMMIT")
        except Exception:
            state.rollback(con)
            raise


@dataclass
class CreateResult:
    outcome: Outcome
    batch_id: str | None = None
    message: str | None = None


def _look(client: anthropic.Anthropic, settings: Settings, sub: dict, unknown_at: datetime, note: str,
          sleep: Callable[[float], None], now: Callable[[], datetime]) -> str | None:
    """Look for the batch of a create of unknown outcome a few times, at most until its grace is over."""
    grace = timedelta(seconds=settings.reconcile_grace)
    for look in range(LOOKS_AFTER_UNKNOWN):
        found = _adopt(client, settings, sub, now(), note)
        if found is not None or now() - unknown_at >= grace or look == LOOKS_AFTER_UNKNOWN - 1:
            return found
        remaining = (unknown_at + grace - now()).total_seconds()
        sleep(max(0.0, min(api.backoff(look, None, cap=8.0), remaining)))
    return None


def _journal(settings: Settings, sub_id: str) -> dict:
    with state.connect(settings) as con:
        row = con.execute(f"SELECT {', '.join(SUB_COLUMNS)} FROM bb_state.submissions WHERE submission_id = ?",
                          [sub_id]).fetchone()
    return dict(zip(SUB_COLUMNS, row))


def create_one(
    client: anthropic.Anthropic, settings: Settings, sub: dict, *, job: Job | None = None,
    sleep: Callable[[float], None] = time.sleep, now: Callable[[], datetime] = state.utcnow,
    fault: Callable[[str], None] | None = None,
) -> CreateResult:
    """Create (or adopt) the batch of one journalled submission."""
    sub_id, path = sub["submission_id"], Path(sub["request_file"])
    grace = timedelta(seconds=settings.reconcile_grace)
    if sub["state"] == "creating":
        # An earlier create may exist: interrupted by a crash, of unknown outcome, or its adopted batch
        # proved foreign. A crash is only known from now on, so its grace counts from now.
        if sub["outcome_unknown_at"] is None:
            with state.connect(settings) as con:
                state.mark_outcome_unknown(con, sub_id, now(), "the create was interrupted; looking for its batch")
            sub = _journal(settings, sub_id)
        found = _adopt(client, settings, sub, now(), "adopted after an interrupted create")
        if found is not None:
            return CreateResult("adopted", found)
        if now() - sub["outcome_unknown_at"] < grace:
            return CreateResult("undecided")
    waited = 0.0
    for attempt in range(MAX_CREATE_TRIES):
        if fault:
            fault("before_journal")
        with state.connect(settings) as con:
            state.start_create(con, sub_id, now())
        if fault:
            fault("before_create")
        try:
            info = api.create_batch(client, path, timeout=settings.create_timeout)
        except api.CreateRefused as e:
            # 429/529: nothing was created. Wait a short retry-after out; leave a long one to a later run.
            with state.connect(settings) as con:
                state.refuse_create(con, sub_id, f"create refused: {e.message}")
            wait = api.backoff(attempt, e.retry_after)
            if attempt == MAX_CREATE_TRIES - 1 or waited + wait > MAX_WAIT_IN_RUN:
                return CreateResult("deferred", message=e.message)
            sleep(wait)
            waited += wait
            continue
        except ApiAccountError as e:
            # Nothing was created and nothing will be until the account is fixed: the rows stay sendable.
            with state.connect(settings) as con:
                state.refuse_create(con, sub_id, f"create refused: {e.message}")
            raise
        except ApiRequestRejected as e:
            # A definite 4xx for this body (400, 413): nothing was created, and the same file never will be.
            _refuse_inputs(settings, sub, job, e.message)
            return CreateResult("rejected", message=e.message)
        except api.CreateOutcomeUnknown as e:
            unknown_at = now()
            with state.connect(settings) as con:
                state.mark_outcome_unknown(con, sub_id, unknown_at, f"create outcome unknown: {e.message}")
            sub = _journal(settings, sub_id)
            found = _look(client, settings, sub, unknown_at, "adopted after an ambiguous create", sleep, now)
            if found is not None:
                return CreateResult("adopted", found)
            if now() - unknown_at < grace:
                return CreateResult("undecided")  # the next run looks again
            continue  # looked for over the whole grace: it was not created
        if fault:
            fault("after_create")
        _record_batch(settings, sub_id, sub["job"], info, None)
        return CreateResult("created", info.id)
    # Only an unknown outcome with the grace over loops: the last try's outcome is unknown too.
    return CreateResult("undecided", message=f"no batch after {MAX_CREATE_TRIES} creates; the next run looks again")


SUB_COLUMNS = ("submission_id", "job", "state", "request_file", "request_count", "create_started_at",
               "first_create_at", "outcome_unknown_at")


def pending_submissions(settings: Settings, jobs: list[str] | None = None) -> list[dict]:
    with state.connect(settings) as con:
        rows = con.execute(
            f"SELECT {', '.join(SUB_COLUMNS)} FROM bb_state.submissions "
            "WHERE state IN ('prepared', 'creating') AND lane = 'batch' ORDER BY prepared_at, submission_id"
        ).fetchall()
    subs = [dict(zip(SUB_COLUMNS, r)) for r in rows]
    return [s for s in subs if jobs is None or s["job"] in jobs]


def queued_requests(settings: Settings) -> int:
    """Requests of ours that may be in the workspace's processing queue: batches not seen ended, and
    creates whose outcome is unknown."""
    with state.connect(settings) as con:
        return int(con.execute(
            """
            SELECT (SELECT coalesce(sum(request_count), 0) FROM bb_state.batches
                    WHERE local_state = 'submitted' AND processing_status <> 'ended' AND lane = 'batch')
                 + (SELECT coalesce(sum(request_count), 0) FROM bb_state.submissions WHERE state = 'creating')
            """
        ).fetchone()[0])


def _fit_queue(settings: Settings, subs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(submissions to send now, those left for lack of queue room). Creates of unknown outcome are
    always looked after (they are counted in the queue already); prepared ones go first come, first
    served while they fit. A submission larger than the whole limit (cut before it was lowered) goes
    alone into an empty queue, so that nothing waits forever."""
    queued = queued_requests(settings)
    room = settings.max_queued_requests - queued
    now_, later = [s for s in subs if s["state"] == "creating"], []
    for s in (s for s in subs if s["state"] == "prepared"):
        alone = queued == 0 and not any(x["state"] == "prepared" for x in now_)
        if not later and (s["request_count"] <= room or alone):
            now_.append(s)
            room -= s["request_count"]
        else:
            later.append(s)
    return now_, later


def send_pending(
    client: anthropic.Anthropic, settings: Settings, *, jobs: list[str] | None = None,
    job_defs: dict[str, Job] | None = None, progress: Progress = Silent(),
    sleep: Callable[[float], None] = time.sleep, fault: Callable[[str], None] | None = None,
) -> SubmitReport:
    """Create a batch for every journalled submission that fits the processing queue (also those left
    by an interrupted run)."""
    report = SubmitReport()
    subs, later = _fit_queue(settings, pending_submissions(settings, jobs))
    if later and queued_requests(settings):
        # What the state says is queued may have ended since it was last polled (`submit` alone does
        # not collect): ask the API before leaving anything for a later run.
        collect.refresh(client, settings)
        subs, later = _fit_queue(settings, pending_submissions(settings, jobs))
    report.waiting_for_queue = [s["submission_id"] for s in later]
    if subs:
        _send(client, settings, subs, report, job_defs or {}, progress, sleep, fault)
    if report.waiting_for_queue:
        waiting = {s["submission_id"]: s for s in pending_submissions(settings, jobs)}
        n = sum(waiting[s]["request_count"] for s in report.waiting_for_queue if s in waiting)
        refused = len(report.waiting_for_queue) - len(later)  # deferred after the API's 429/529
        why = ", ".join(w for w in (
            f"the bridge keeps at most {settings.max_queued_requests:,} requests queued, "
            "BATCH_BRIDGE_MAX_QUEUED_REQUESTS" if later else "",
            f"the API refused {refused} create(s) with 429/529 (a full workspace queue, or a rate limit)"
            if refused else "") if w)
        progress.step(f"{n:,} request(s) in {len(report.waiting_for_queue)} batch(es) wait for room in the processing "
                      f"queue ({why}); a later run sends them")
    return report


def _send(client: anthropic.Anthropic, settings: Settings, subs: list[dict], report: SubmitReport,
          job_defs: dict[str, Job], progress: Progress, sleep: Callable[[float], None],
          fault: Callable[[str], None] | None) -> None:
    done = 0
    # Submissions with the same request count go one after the other (see the module docstring); once
    # the API answers 429 (the workspace's queue is full) no further create is tried in this run.
    groups: dict[int, list[dict]] = {}
    for s in subs:
        groups.setdefault(s["request_count"], []).append(s)
    queue_full = threading.Event()

    def one_group(group: list[dict]) -> list[tuple[dict, CreateResult] | Exception]:
        out: list[tuple[dict, CreateResult] | Exception] = []
        for sub in group:
            if queue_full.is_set() and sub["state"] == "prepared":
                out.append((sub, CreateResult("deferred")))
                continue
            try:
                res = create_one(client, settings, sub, job=job_defs.get(sub["job"]), sleep=sleep, fault=fault)
            except ApiAccountError as e:
                queue_full.set()  # nothing else can be created either
                out.append(e)
                break
            out.append((sub, res))
            if res.outcome == "deferred":
                queue_full.set()
            if res.outcome == "undecided":
                # A same-count create may still appear: the rest of this group waits for a later run.
                out += [(s, CreateResult("held")) for s in group[group.index(sub) + 1:]]
                break
        return out

    errors: list[Exception] = []
    # Creates (uploads, retries' waits) take a while: another process may use the state meanwhile.
    with state.let_go(settings), ThreadPoolExecutor(max_workers=min(settings.concurrency, len(groups))) as pool:
        futures = [pool.submit(one_group, g) for g in groups.values()]
        for fut in futures:
            for item in fut.result():
                if isinstance(item, Exception):
                    errors.append(item)
                    continue
                sub, res = item
                done += 1
                if res.outcome in ("created", "adopted"):
                    report.batches.append(res.batch_id)
                    if res.outcome == "adopted":
                        report.adopted.append(res.batch_id)
                elif res.outcome == "undecided":
                    report.pending_unknown.append(sub["submission_id"])
                elif res.outcome == "deferred":
                    report.waiting_for_queue.append(sub["submission_id"])
                elif res.outcome == "held":
                    report.held.append(sub["submission_id"])
                else:
                    report.rejected[sub["submission_id"]] = res.message or ""
                    progress.step(f"error: the API rejected the batch of submission {sub['submission_id']} "
                                  f"({sub['request_count']:,} requests) for good: {res.message}; its rows are "
                                  "recorded as not sent (create_rejected) and the other batches go on")
                progress.tick("batches submitted", done, len(subs))
    if errors:
        raise errors[0]
