"""The bridge's commands as functions: plan, submit, status, wait, collect, sync, run, cancel.

Each takes settings, the jobs, and (for network steps) an API client built by `api.build_client`,
plus a progress reporter and injectable sleep/clock, so the CLI stays thin and tests stay fast.
Commands that change what is sent or loaded hold the project's process lock (`state.exclusive`).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator


from . import api, collect as collect_mod, preflight, state, submit as submit_mod, sync_lane
from .config import Settings
from .dbt_runner import load_manifest
from .errors import CreateRejected, WaitTimeout
from .estimate import Estimate
from .export import REJECTED_REASONS, JobPlan, WarehouseAccess
from .jobs import Job, jobs_from_manifest, select_jobs
from .progress import Progress, Silent
from .results import publish

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

ENV_FAULT = "BATCH_BRIDGE_FAULT"  # test-only: name of a crash point at which the process kills itself
# Every crash point, in the order a `run` reaches them (submit, then collect).
CRASH_POINTS = (
    "before_prepare_commit",  # request files written, the `prepared` journal rows not yet committed
    "after_prepare",          # journal committed, no create call made
    "before_journal",         # about to journal `creating`
    "before_create",          # `creating` journalled, the create POST not sent
    "after_create",           # the batch exists on the API, its id not yet recorded
    "during_sync",            # sync lane: an answer appended to the run's answers file, others in flight
    "during_download",        # part of a results file written to its .part file
    "after_download",         # results file complete and renamed, not yet marked downloaded
    "between_slices",         # a slice of a batch's results committed, the next not yet read
    "during_load",            # a batch's last slice inserted and the batch marked collected, before COMMIT
    "after_load",             # committed, results source not yet republished
)


def load_jobs(settings: Settings, names: tuple[str, ...] | list[str] | None = None, *, force_parse: bool = False) -> list[Job]:
    return select_jobs(jobs_from_manifest(load_manifest(settings, force_parse=force_parse)), names)


def crash_point(point: str) -> None:
    """Die at a named point when BATCH_BRIDGE_FAULT names it (crash-safety tests kill us here)."""
    if os.environ.get(ENV_FAULT) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# --- plan ---------------------------------------------------------------------------------------


def plan(
    settings: Settings, jobs: list[Job], *, progress: Progress = Silent(), client: anthropic.Anthropic | None = None,
) -> tuple[list[JobPlan], dict[str, Estimate]]:
    """What `submit` would send now, after the same preflight (without a client: what it could not
    check is said); sends nothing, and records only what the Models API answered and the input token
    counts (kept, so that the next plan asks nothing again), besides folding answers already loaded
    into the per-input summaries it reads (`state.fold_outcomes`)."""
    with state.connect(settings) as con:
        found = preflight.check_jobs(con, settings, jobs, client)
        return submit_mod.plan_jobs(con, settings, jobs, progress=progress, preflights=found, client=client)


def plan_to_json(p: JobPlan, e: Estimate | None) -> dict[str, Any]:
    return {
        "job": p.job.name,
        "model": p.job.model,
        "staged_rows": p.staged,
        "rows_to_send": p.send_keys,
        "requests_to_send": p.send_requests,
        "deduplicated_rows": p.deduplicated,
        "up_to_date_rows": p.dispositions.get("up_to_date", 0),
        "in_flight_rows": p.dispositions.get("in_flight", 0),
        "skipped": {k: {"rows": v, "why": REJECTED_REASONS[k]} for k, v in sorted(p.rejected.items())},
        "lane": p.lane,
        "lane_why": p.lane_why,
        "lanes": {
            lane: {"requests": p.send_requests if lane == p.lane else 0,
                   "cost_usd": (e.lane_usd if lane == p.lane else 0.0) if e else None}
            for lane in ("batch", "sync")
        },
        "batches": [{"requests": c.requests, "bytes": c.body_bytes} for c in p.chunks] if p.lane == "batch" else [],
        "bytes": p.body_bytes,
        "estimate": e.to_json() if e else None,
        "preflight": p.preflight,
    }


# --- submit / collect -----------------------------------------------------------------------------


# Set while `sync` or `run` is inside its steps: the steps' own publishes wait for the single one at the end.
_PUBLISH_DEFERRED: ContextVar[bool] = ContextVar("batch_bridge_publish_deferred", default=False)


def _publish_all(settings: Settings, jobs: list[Job]) -> None:
    """Fold what the command loaded into the per-input summaries, then rewrite each job's results
    source (and owed history parts); once per command."""
    if _PUBLISH_DEFERRED.get():
        return
    with state.connect(settings) as con:
        with state.room_for_joining(con, settings):
            state.fold_outcomes(con)
        for j in jobs:
            publish(con, settings, j, fault=crash_point)


def submit(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, max_cost: float | None = None,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep, warehouse: WarehouseAccess | None = None,
) -> submit_mod.SubmitReport:
    """Export and submit what is needed; returns as soon as batches are created. `warehouse` replaces
    the read-only ATTACH of the warehouse (the dbt plugin reads through dbt's connection)."""
    with state.kept_open(settings):
        return _submit(settings, jobs, client, max_cost=max_cost, progress=progress, sleep=sleep, warehouse=warehouse)


def _submit(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, max_cost: float | None,
    progress: Progress, sleep: Callable[[float], None], warehouse: WarehouseAccess | None,
) -> submit_mod.SubmitReport:
    names = [j.name for j in jobs]
    defs = {j.name: j for j in jobs}
    # Submissions journalled by an interrupted run go first: their rows are in flight already.
    leftover = submit_mod.send_pending(client, settings, jobs=names, job_defs=defs, progress=Silent(), sleep=sleep,
                                       fault=crash_point)
    report = submit_mod.prepare_submissions(settings, jobs, max_cost=max_cost, progress=progress, fault=crash_point,
                                            warehouse=warehouse, client=client)
    crash_point("after_prepare")
    sent = submit_mod.send_pending(client, settings, jobs=names, job_defs=defs, progress=progress, sleep=sleep,
                                   fault=crash_point)
    report.absorb(leftover)
    report.absorb(sent)
    if report.batches:
        progress.step(f"submitted {len(report.batches)} batch(es): {', '.join(report.batches)}")
    _answer_sync_lane(settings, defs, client, report, progress=progress, sleep=sleep)
    return report


def _answer_sync_lane(settings: Settings, defs: dict[str, Job], client: anthropic.Anthropic,
                      report: submit_mod.SubmitReport, *, progress: Progress, sleep: Callable[[float], None]) -> None:
    """Send the sync lane's requests (runs left by an interrupted command first), load their answers
    with the batch loader, and publish: the rows are answered within this command."""
    try:
        with state.let_go(settings):  # calls go out for as long as the lane has rows
            report.sync = sync_lane.send(client, settings, defs, progress=progress, sleep=sleep, fault=crash_point)
    finally:  # answers written before a failure are loaded now, not on the next run
        loads = collect_mod.load_downloaded(settings, defs, progress=progress, fault=crash_point)
        for job, n in loads.loaded.items():
            report.sync_loaded[job] = report.sync_loaded.get(job, 0) + n
            progress.step(f"{job}: loaded {n:,} results")
        _publish_all(settings, list(defs.values()))
    loads.raise_account_errors()


def collect(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, progress: Progress = Silent(),
    sleep: Callable[[float], None] = time.sleep,
) -> collect_mod.CollectReport:
    """Fetch and load every ended batch, then publish the results source once."""
    with state.kept_open(settings):
        try:
            report = collect_mod.collect(client, settings, {j.name: j for j in jobs}, progress=progress, sleep=sleep,
                                         fault=crash_point)
        finally:  # also after a failed load: what earlier loads committed must reach the results source
            _publish_all(settings, jobs)
    for job, n in report.loaded.items():
        progress.step(f"{job}: loaded {n:,} results")
    report.loads.raise_account_errors()  # after publishing: what was loaded is kept
    return report


def create_rejected_error(rejected: dict[str, str]) -> CreateRejected:
    """The error after a command whose other work went on, when the API rejected creates for good."""
    return CreateRejected(
        f"the API rejected {len(rejected)} batch(es) for good: "
        + "; ".join(f"{sub}: {msg}" for sub, msg in sorted(rejected.items())),
        hint="their rows are recorded as not sent (reason create_rejected, with the API's message: "
        "`batch-bridge status`); change the rows or the job and the next run sends them",
    )


@dataclass
class WaitReport:
    polls: int = 0
    ended: int = 0
    open: int = 0
    collected: dict[str, int] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)  # batches created while waiting (`run`)
    adopted: list[str] = field(default_factory=list)  # of those, found in `list` after a create of unknown outcome
    rejected: dict[str, str] = field(default_factory=dict)


def wait(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, timeout: float | None = None,
    collect_as_ended: bool = False, progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic, submit_pending: bool = False,
) -> WaitReport:
    """Poll until every open batch has ended (collecting each as it ends if asked), or time out.

    With `submit_pending` (for `run`), journalled submissions are sent as the queue makes room and
    creates of unknown outcome are reconciled on every poll, and waiting goes on until none is left.
    Results loaded on the way are published once, when waiting ends (by `run`, when run calls it)."""
    report = WaitReport()
    try:
        return _wait(settings, jobs, client, report, timeout=timeout, collect_as_ended=collect_as_ended,
                     progress=progress, sleep=sleep, clock=clock, submit_pending=submit_pending)
    finally:
        if report.collected:
            _publish_all(settings, jobs)


def _wait(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, report: WaitReport, *,
    timeout: float | None, collect_as_ended: bool, progress: Progress, sleep: Callable[[float], None],
    clock: Callable[[], float], submit_pending: bool = False,
) -> WaitReport:
    names = [j.name for j in jobs]
    by_name = {j.name: j for j in jobs}
    start = clock()
    interval = settings.poll_interval
    while True:
        polled_at = clock()
        # Each poll holds the state open for its steps; the sleep between polls does not.
        with state.kept_open(settings):
            unconfirmed: list[str] = []  # young batches answering 404 (propagation delay): still in flight
            infos = collect_mod.refresh(client, settings, names, unconfirmed=unconfirmed)
            report.polls += 1
            ended = [i for i in infos if collect_mod.results_ready(i)]
            running = [i.id for i in infos if not collect_mod.results_ready(i)] + unconfirmed
            requests = sum(i.total for i in infos)
            progress.tick("batches ended", len(ended), len(infos) + len(unconfirmed))
            # Batches that ended made room in the queue: the next ones are created before these are
            # downloaded and loaded, so that the API works on them meanwhile.
            pending = submit_mod.pending_submissions(settings, names) if submit_pending else []
            if pending:
                sent = submit_mod.send_pending(client, settings, jobs=names, job_defs=by_name, progress=progress,
                                               sleep=sleep, fault=crash_point)
                report.submitted += sent.batches
                report.adopted += sent.adopted
                report.rejected.update(sent.rejected)
                pending = submit_mod.pending_submissions(settings, names)
                running += [b for b in sent.batches if b not in running]
            if collect_as_ended and ended:
                collect_mod.download_ended(client, settings, ended, progress=progress, sleep=sleep, fault=crash_point)
                loads = collect_mod.load_downloaded(settings, by_name, progress=progress, fault=crash_point)
                for job, n in loads.loaded.items():
                    report.collected[job] = report.collected.get(job, 0) + n
                    progress.step(f"{job}: loaded {n:,} results")
                loads.raise_account_errors()
            report.ended, report.open = len(ended), len(running)
            if not running and not pending:
                return report
            elapsed = clock() - start
            if timeout is not None and elapsed >= timeout:
                waiting = f"; {len(pending)} more batch(es) not yet created" if pending else ""
                raise WaitTimeout(
                    f"{len(running)} of {len(infos) + len(unconfirmed)} batch(es) still in progress after {elapsed:.0f}s "
                    f"({requests:,} requests in them){waiting}",
                    hint="nothing is lost: run `batch-bridge collect` or `wait` again later",
                )
            young = young_batch_pause([i for i in infos if not collect_mod.results_ready(i)], unconfirmed)
            # The interval counts from this poll's start: its own work (a status write, a download and
            # load) does not stretch the time between polls.
            pause = max(0.0, min(interval - (clock() - polled_at), young))
            pause = pause if timeout is None else min(pause, max(0.0, timeout - elapsed))
        with state.let_go(settings):  # another process may use the state between polls
            sleep(pause)
        if young >= interval:  # the interval, not a young batch, set this pause: back off
            interval = min(interval * 1.5, max(settings.max_poll_interval, settings.poll_interval))


FIRST_POLL = 1.0  # seconds: the age at which a new batch is first looked at again


def young_batch_pause(running: list[api.BatchInfo], unconfirmed: list[str]) -> float:
    """Seconds until the next poll as far as young batches go: their age, at least FIRST_POLL.

    A batch is polled at ages of about 1, 2, 4, 8... s until the poll interval takes over, because a
    small batch often ends within a minute; an old batch is not polled more often for it."""
    if unconfirmed:
        return FIRST_POLL
    ages = [(state.utcnow() - i.created_at).total_seconds() for i in running if i.created_at is not None]
    return max(FIRST_POLL, min(ages)) if ages else float("inf")


@contextmanager
def _publish_once(settings: Settings, jobs: list[Job]) -> Iterator[None]:
    """Inside a composite command, defer every step's publish to one at the end (also on errors and
    timeouts, so that what was loaded reaches the results source)."""
    deferred = _PUBLISH_DEFERRED.set(True)
    try:
        yield
    finally:
        _PUBLISH_DEFERRED.reset(deferred)
        _publish_all(settings, jobs)


def sync(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, max_cost: float | None = None,
    progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
) -> tuple[collect_mod.CollectReport, submit_mod.SubmitReport]:
    """`collect` then `submit`, never waiting: the one command an hourly schedule runs."""
    with state.exclusive(settings), state.kept_open(settings), _publish_once(settings, jobs):
        c = collect(settings, jobs, client, progress=progress, sleep=sleep)
        s = submit(settings, jobs, client, max_cost=max_cost, progress=progress, sleep=sleep)
    return c, s


def run(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, max_cost: float | None = None,
    timeout: float | None = None, progress: Progress = Silent(), sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[submit_mod.SubmitReport, WaitReport]:
    """`submit`, then wait and collect each batch as it ends: for pipelines that can wait."""
    # One hold of the state for the whole command, let go while it waits (see state.kept_open).
    with state.exclusive(settings), state.kept_open(settings), _publish_once(settings, jobs):
        collect(settings, jobs, client, progress=progress, sleep=sleep)  # anything ended since last time
        s = submit(settings, jobs, client, max_cost=max_cost, progress=progress, sleep=sleep)
        w = wait(settings, jobs, client, timeout=timeout, collect_as_ended=True, progress=progress,
                 sleep=sleep, clock=clock, submit_pending=True)
        s.batches += w.submitted
        s.adopted += w.adopted
        s.rejected.update(w.rejected)
        # What is still undecided once the wait is over: a create the first pass left undecided may
        # have been adopted (or sent) while waiting.
        left = submit_mod.pending_submissions(settings, [j.name for j in jobs])
        s.pending_unknown = [p["submission_id"] for p in left if p["state"] == "creating"]
        s.waiting_for_queue = [p["submission_id"] for p in left if p["state"] == "prepared"]
    return s, w


def cancel(settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, progress: Progress = Silent()) -> list[str]:
    """Cancel every in-flight batch of the jobs; their unprocessed requests come back `canceled`."""
    names = [j.name for j in jobs]
    out = []
    with state.connect(settings) as con:
        unconfirmed = {r[0] for r in con.execute(
            "SELECT batch_id FROM bb_state.submissions WHERE state = 'created' AND adopted").fetchall()}
    for b in collect_mod.open_batches(settings, names):
        if b["local_state"] != "submitted" or b["processing_status"] != "in_progress":
            continue
        if b["batch_id"] in unconfirmed:
            # Adopted on its request count after an ambiguous create: it may be another client's batch
            # in a shared workspace, which must never be cancelled. Its answers confirm it once it ends.
            progress.step(f"not cancelled: {b['batch_id']} was adopted after an ambiguous create and is not yet "
                          "confirmed as ours; cancel it in the console if you know it is")
            continue
        info = api.cancel(client, b["batch_id"])
        with state.connect(settings) as con:
            collect_mod.record_status(con, info)
        out.append(info.id)
        progress.step(f"cancel requested for {info.id} ({info.processing_status})")
    return out
