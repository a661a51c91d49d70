"""Click commands only: parse, call the core, print, map errors to exit codes.

Data goes to stdout (a table, or JSON with --json); progress goes to stderr.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from typing import Any, Callable

import click

from . import __version__
from .errors import BatchBridgeError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES = """\b
Exit codes (for schedulers):
  0  done, or progress was made (batches submitted, results loaded)
  1  error (API, results, state); see the message
  2  usage or configuration error (flags, profile, job YAML)
  3  `wait`/`run` timed out while batches are still in progress (nothing lost)
  4  locked: another batch-bridge process, or dbt, holds the files; retry later
  5  budget exceeded: the estimate is above budget_usd or --max-cost; nothing sent"""


class StderrProgress:
    """Steps as lines; counters as a live line on a terminal, or a line every few seconds in logs."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last: dict[str, float] = {}
        self._live = False

    def _end_live(self) -> None:
        if self._live:
            sys.stderr.write("\n")
            self._live = False

    def step(self, message: str) -> None:
        if self.quiet:
            return
        self._end_live()
        click.echo(message, err=True)

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        if self.quiet:
            return
        text = f"{what}: {done:,}" + (f"/{total:,}" if total is not None else "")
        if self.tty:
            sys.stderr.write("\r" + text.ljust(60))
            sys.stderr.flush()
            self._live = True
            if total is not None and done >= total:
                self._end_live()
            return
        now = time.monotonic()
        final = total is not None and done >= total
        if final or now - self._last.get(what, 0.0) >= 5.0:
            self._last[what] = now
            click.echo(text, err=True)


def _emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text(data))


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BatchBridgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:
            from .state import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            oom = _out_of_memory(e)
            click.echo(f"error: {oom}", err=True)
            sys.exit(oom.exit_code)

    return wrapper


def _out_of_memory(e: Exception) -> BatchBridgeError:
    from .config import DEFAULT_MEMORY_LIMIT, ENV_MEMORY_LIMIT
    from .errors import OutOfMemory

    limit = os.environ.get(ENV_MEMORY_LIMIT) or f"{DEFAULT_MEMORY_LIMIT} (the default, with room for wide rows)"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OutOfMemory(
        f"DuckDB ran out of the bridge's memory limit, {ENV_MEMORY_LIMIT}={limit}: {first}",
        hint=f"raise {ENV_MEMORY_LIMIT} (e.g. 512MB or 1GB) and run the command again; each step is one "
        "transaction, so nothing half-done was kept",
    )


def project_options(fn: Callable) -> Callable:
    """--project-dir, --profiles-dir, --target: where the dbt project and its profile are."""
    for opt in reversed([
        click.option("--project-dir", type=click.Path(file_okay=False), help="dbt project directory [DBT_PROJECT_DIR]"),
        click.option("--profiles-dir", type=click.Path(file_okay=False), help="directory of profiles.yml [DBT_PROFILES_DIR]"),
        click.option("--target", help="dbt target [DBT_TARGET; default: the profile's]"),
    ]):
        fn = opt(fn)
    return fn


def common(fn: Callable) -> Callable:
    """The project options plus --job: shared by every command that works on jobs."""
    fn = click.option("--job", "jobs", multiple=True, help="only this job (repeatable); default: every job")(fn)
    return project_options(fn)


def lane_option(fn: Callable) -> Callable:
    """--lane: where this run's requests go, over each job's `lane` field."""
    return click.option("--lane", type=click.Choice(["batch", "sync", "auto"]),
                        help="batch, sync (synchronous Messages calls) or auto, for this run [job's lane; batch]")(fn)


def _settings(project_dir: str | None, profiles_dir: str | None, target: str | None, **kw: Any):
    from .config import resolve

    return resolve(project_dir=project_dir, profiles_dir=profiles_dir, target=target, **kw)


def _setup(project_dir, profiles_dir, target, jobs, lane=None, **kw):
    from .bridge import load_jobs
    from .jobs import with_lane

    settings = _settings(project_dir, profiles_dir, target, **kw)
    return settings, with_lane(load_jobs(settings, jobs), lane)


# Commands that talk to the API (plan counts tokens with it when a key is set).
API_COMMANDS = frozenset({"plan", "preview", "submit", "collect", "sync", "wait", "run", "cancel", "pipeline"})


def _client(settings):
    from .api import client_on_first_use

    return client_on_first_use(settings)


@click.group(context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES)
@click.version_option(__version__, "-V", "--version")
def cli() -> None:
    """batch-bridge: send dbt rows to the Message Batches API and load the answers back.

    \b
    A schedule runs, in order:  dbt build (staging) -> batch-bridge sync -> dbt build (downstream)
    or simply:                  batch-bridge pipeline [--wait]
    """
    if click.get_current_context().invoked_subcommand in API_COMMANDS:
        from .api import preload

        preload()  # the SDK's import runs beside the project's manifest and the staged rows' DuckDB work


# --- plan ---------------------------------------------------------------------------------------


def _plan_text(data: dict) -> str:
    lines = []
    for j in data["jobs"]:
        e = j["estimate"] or {}
        lines.append(f"job {j['job']} ({j['model']})")
        lines.append(f"  staged rows        {j['staged_rows']:>12,}")
        lines.append(f"  up to date         {j['up_to_date_rows']:>12,}")
        lines.append(f"  in flight          {j['in_flight_rows']:>12,}")
        lines.append(f"  to send            {j['rows_to_send']:>12,} rows as {j['requests_to_send']:,} requests "
                     f"({j['deduplicated_rows']:,} deduplicated)")
        lines.append(f"  batches            {len(j['batches']):>12,}  ({j['bytes'] / 1e6:,.1f} MB)")
        money_ = (lambda x: "unknown" if x is None else f"${x:,.4f}")
        for lane, v in j.get("lanes", {}).items():
            if v["requests"]:
                lines.append(f"  {lane + ' lane':<19}{v['requests']:>12,} requests, {money_(v['cost_usd'])} "
                             f"({'batch' if lane == 'batch' else 'standard'} prices): {j['lane_why']}")
        for reason, v in j["skipped"].items():
            lines.append(f"  skipped: {reason:<18}{v['rows']:>8,}  {v['why']}")
        if e:
            b, s = e.get("batch_usd"), e.get("sync_usd")
            money = (lambda x: "unknown" if x is None else f"${x:,.4f}")
            lines.append(f"  estimated cost     {money(b)} at batch prices (max {money(e.get('batch_usd_max'))}); "
                         f"{money(s)} synchronously")
            lines.append(f"  tokens             in {e['input_tokens']:,} + cache write {e['cache_write_tokens']:,} "
                         f"+ cache read {e['cache_read_tokens']:,}; out ~{e['output_tokens']:,}")
            lines.append(f"  how                {e['method']}")
            for w in e.get("warnings") or ():
                lines.append(f"  warning            {w}")
        pf = j.get("preflight") or {}
        for w in pf.get("warnings", []):
            lines.append(f"  warning: {w}")
        for u in pf.get("unchecked", []):
            lines.append(f"  not checked: {u}")
    return "\n".join(lines) or "no jobs"


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def plan(project_dir, profiles_dir, target, jobs, as_json):
    """Show what `submit` would send now (rows, batches, bytes, skipped rows and why, cost); sends nothing.

    Runs the preflight first (the model, its limits and capabilities, the output schema): a job the API
    would refuse exits 2. With ANTHROPIC_API_KEY set, input tokens are counted by the API's free token
    counting endpoint; without it, estimated offline by a rule (the JSON says which method made each figure).

    Example: batch-bridge plan --job review_enrichment --json
    """
    from .bridge import plan as do_plan, plan_to_json

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
    # With a key, input tokens are counted by the API (free); without, plan works offline with its rule,
    # and the preflight says what it could not check.
    client = _client(settings) if settings.api_key else None
    plans, estimates = do_plan(settings, job_list, progress=StderrProgress(quiet=as_json), client=client)
    data = {"jobs": [plan_to_json(p, estimates.get(p.job.name)) for p in plans]}
    _emit(data, as_json, _plan_text)


# --- preview ------------------------------------------------------------------------------------


def _money(x: float | None) -> str:
    return "unknown" if x is None else f"${x:,.4f}"


def _preview_text(d: dict) -> str:
    out = [f"job {d['job']} ({d['model']}): {len(d['rows'])} row(s) at {d['prices']} prices; "
           f"cost {_money(d['cost_usd'])}"]
    for w in d["warnings"]:
        out.append(f"warning: {w}")
    for r in d["rows"]:
        q = r["request"]
        out.append(f"\n--- {r['why']} prompt ({q['prompt_chars']:,} characters), key {json.dumps(r['key'])}")
        if q["system"]:
            out.append(f"system:  {q['system']}")
        if q["few_shot_turns"]:
            out.append(f"few-shot turns: {q['few_shot_turns']}")
        out.append(f"prompt:  {q['prompt']}")
        if r["error"]:
            out.append(f"error:   {r['error']}")
            continue
        out.append(f"answer ({r['stop_reason']}):\n{r['answer']}")
        if r["parsed"] is not None:
            out.append("columns: " + json.dumps(r["parsed"], ensure_ascii=False, default=str))
        if r["parse_error"]:
            out.append(f"parse failure: {r['parse_error']}")
        u = r["usage"]
        out.append(f"tokens:  in {u['input_tokens']:,} (cache write {u['cache_creation_input_tokens']:,}, read "
                   f"{u['cache_read_input_tokens']:,}), out {u['output_tokens']:,}; cost {_money(r['cost_usd'])}")
    return "\n".join(out)


@cli.command(context_settings=CONTEXT_SETTINGS)
@project_options
@click.option("--job", "job_name", help="the job to preview (needed when the project has several)")
@click.option("--rows", type=int, default=3, show_default=True,
              help="how many rows: the longest, the shortest and a typical prompt, then others spread by length")
@click.option("--key", "keys", multiple=True, help="preview the row with this key (repeatable; a JSON array for "
              "a key of several columns) instead of choosing by length")
@click.option("--yes", is_flag=True, help="do not ask before spending more than $0.50")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def preview(project_dir, profiles_dir, target, job_name, rows, keys, yes, as_json):
    """Send a few rows through the synchronous Messages API and show request, answer, parsed columns, cost.

    Uses the exact request body of each row's batch line, at standard (not batch) prices; records
    nothing that changes what `sync` sends. Example: batch-bridge preview --job review_enrichment --rows 3
    """
    from . import preview as pv
    from .errors import ConfigError

    settings, job_list = _setup(project_dir, profiles_dir, target, (job_name,) if job_name else ())
    if len(job_list) != 1:
        raise ConfigError(f"--job is needed: the project declares {len(job_list)} jobs: "
                          f"{', '.join(j.name for j in job_list) or '(none)'}")
    client = _client(settings)
    plan = pv.prepare(settings, job_list[0], client, rows=rows, keys=tuple(keys))
    progress = StderrProgress()
    progress.step(f"previewing {len(plan.rows)} row(s) of {plan.job.name}: at most {_money(plan.max_usd)} "
                  "at standard prices (if every answer used max_tokens)")
    over = plan.max_usd is None or plan.max_usd > pv.ASK_ABOVE_USD
    if over and not yes and sys.stdin.isatty() and sys.stderr.isatty():
        if not click.confirm(f"spend up to {_money(plan.max_usd)}?", err=True):
            click.echo("nothing sent", err=True)
            sys.exit(0)
    data = pv.send(settings, plan, client).to_json()
    _emit(data, as_json, _preview_text)


# --- submit / collect / sync --------------------------------------------------------------------


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--max-cost", type=float, help="refuse (and send nothing) if the estimate exceeds this many USD")
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def submit(project_dir, profiles_dir, target, jobs, max_cost, lane, as_json):
    """Export the rows that need an answer and submit them; returns once batches are created.

    Example: batch-bridge submit --max-cost 5
    """
    from .bridge import plan_to_json, submit as do_submit
    from .state import exclusive

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs, lane)
    progress = StderrProgress()
    with exclusive(settings):
        report = do_submit(settings, job_list, _client(settings), max_cost=max_cost, progress=progress)
    data = {
        "batches": report.batches, "adopted": report.adopted, **_create_outcomes(report), **_sync_lane(report),
        "jobs": [plan_to_json(p, report.estimates.get(p.job.name)) for p in report.plans],
    }
    _emit(data, as_json, lambda d: f"submitted {len(d['batches'])} batch(es)" + "".join(f"\n  {b}" for b in d["batches"])
          + _undone_text(d) + _sync_text(d))
    _exit_if_rejected(report.rejected)


def _create_outcomes(report) -> dict:
    """What a submit left undone, for --json: creates still being reconciled, batches waiting for queue
    room, creates the API rejected for good."""
    return {"pending_reconciliation": report.pending_unknown, "waiting_for_queue": report.waiting_for_queue,
            "held_for_same_count": report.held,
            "rejected": report.rejected}


def _sync_lane(report) -> dict:
    """What the sync lane did, for --json: calls answered per job, runs ended, answers loaded."""
    return {"sync_lane": {"answered": report.sync.answered, "runs": report.sync.runs, "calls": report.sync.calls,
                          "loaded": report.sync_loaded}}


def _undone_text(d: dict) -> str:
    """The creates a submit left undone, in the text output (the JSON has them in `_create_outcomes`)."""
    parts = [
        (d["pending_reconciliation"], "create(s) of unknown outcome, looked for in `list` by the next runs "
                                      "(adopted when found, sent again only after the reconcile grace)"),
        (d["waiting_for_queue"], "batch(es) waiting for room in the processing queue (a later run creates them)"),
        (d["held_for_same_count"], "batch(es) held back while a create of the same size is unresolved"),
    ]
    return "".join(f"\n{len(ids)} {what}" for ids, what in parts if ids)


def _sync_text(d: dict) -> str:
    answered = d["sync_lane"]["answered"]
    return ("\nanswered synchronously: " + ", ".join(f"{k}: {v:,}" for k, v in answered.items())) if answered else ""


def _exit_if_rejected(rejected: dict[str, str]) -> None:
    """Exit 1 after a command whose other work went on, when the API rejected a create for good."""
    if rejected:
        from .bridge import create_rejected_error

        e = create_rejected_error(rejected)
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


def _collect_text(d: dict) -> str:
    loaded = ", ".join(f"{k}: {v:,}" for k, v in d["loaded"].items()) or "nothing new"
    return (f"batches ended {d['ended']}/{d['checked']}, downloaded {len(d['downloaded'])}, "
            f"still running {d['still_running']}; loaded {loaded}"
            + (f"; lost {len(d['lost'])} (rows will be resent)" if d["lost"] else ""))


def _collect_json(r) -> dict:
    return {"checked": r.refreshed, "ended": r.ended, "still_running": r.still_running,
            "downloaded": r.downloaded, "loaded": r.loaded, "lost": r.lost, "foreign": r.foreign}


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def collect(project_dir, profiles_dir, target, jobs, as_json):
    """Fetch every ended, uncollected batch and load its results; never waits.

    Example: batch-bridge collect --json
    """
    from .bridge import collect as do_collect
    from .state import exclusive

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
    with exclusive(settings):
        r = do_collect(settings, job_list, _client(settings), progress=StderrProgress(quiet=False))
    _emit(_collect_json(r), as_json, _collect_text)


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--max-cost", type=float, help="refuse (and send nothing) if the estimate exceeds this many USD")
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def sync(project_dir, profiles_dir, target, jobs, max_cost, lane, as_json):
    """Collect what has ended, then submit what is new; never waits. The command an hourly schedule runs.

    Example: batch-bridge sync --project-dir dbt_project
    """
    from .bridge import sync as do_sync

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs, lane)
    c, s = do_sync(settings, job_list, _client(settings), max_cost=max_cost, progress=StderrProgress())
    data = {"collect": _collect_json(c), "submitted": s.batches, "adopted": s.adopted, **_create_outcomes(s),
            **_sync_lane(s)}
    _emit(data, as_json, lambda d: _collect_text(d["collect"]) + f"\nsubmitted {len(d['submitted'])} batch(es)"
          + _undone_text(d) + _sync_text(d))
    _exit_if_rejected(s.rejected)


# --- wait / run / cancel ------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--timeout", type=float, help="give up after this many seconds (exit 3)")
@click.option("--poll-interval", type=float, help="seconds between polls, growing to 60 [BATCH_BRIDGE_POLL_INTERVAL, 30]")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def wait(project_dir, profiles_dir, target, jobs, timeout, poll_interval, as_json):
    """Poll with backoff until every submitted batch has ended, or --timeout (exit 3).

    Example: batch-bridge wait --timeout 3600 && batch-bridge collect
    """
    from .bridge import wait as do_wait

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs, poll_interval=poll_interval)
    r = do_wait(settings, job_list, _client(settings), timeout=timeout, progress=StderrProgress())
    _emit({"polls": r.polls, "ended": r.ended, "in_progress": r.open}, as_json,
          lambda d: f"all {d['ended']} batch(es) ended after {d['polls']} poll(s)")


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--max-cost", type=float, help="refuse (and send nothing) if the estimate exceeds this many USD")
@click.option("--timeout", type=float, help="stop waiting after this many seconds (exit 3; run again to resume)")
@click.option("--poll-interval", type=float, help="seconds between polls [BATCH_BRIDGE_POLL_INTERVAL, 30]")
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def run(project_dir, profiles_dir, target, jobs, max_cost, timeout, poll_interval, lane, as_json):
    """Submit, wait, and collect each batch as it ends: for pipelines that can wait.

    Example: batch-bridge run --poll-interval 5 --timeout 7200
    """
    from .bridge import run as do_run

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs, lane, poll_interval=poll_interval)
    s, w = do_run(settings, job_list, _client(settings), max_cost=max_cost, timeout=timeout, progress=StderrProgress())
    data = {"submitted": s.batches, "adopted": s.adopted, "polls": w.polls, "loaded": w.collected,
            **_create_outcomes(s), **_sync_lane(s)}
    _emit(data, as_json, lambda d: f"submitted {len(d['submitted'])} batch(es); loaded "
          + (", ".join(f"{k}: {v:,}" for k, v in d["loaded"].items()) or "nothing new") + _undone_text(d)
          + _sync_text(d))
    _exit_if_rejected(s.rejected)


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def cancel(project_dir, profiles_dir, target, jobs, as_json):
    """Cancel the in-flight batches of the given jobs (all jobs by default).

    Unprocessed requests come back `canceled` and are resent by the next submit (up to max_attempts).
    Example: batch-bridge cancel --job review_enrichment
    """
    from .bridge import cancel as do_cancel
    from .state import exclusive

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
    with exclusive(settings):
        ids = do_cancel(settings, job_list, _client(settings), progress=StderrProgress())
    _emit({"canceled": ids}, as_json, lambda d: f"cancel requested for {len(d['canceled'])} batch(es)")


# --- status -------------------------------------------------------------------------------------


def _status_text(d: dict) -> str:
    out = []
    for j in d["jobs"]:
        r = j["rows"]
        cost = "unknown" if j["cost_usd"] is None else f"${j['cost_usd']:,.4f}"
        out.append(f"job {j['job']}: succeeded {r['succeeded']:,}, in flight {r['in_flight']:,}, "
                   f"failed {r['failed']:,}, never sent {r['never_sent']:,}; cost {cost}")
        lanes = j.get("lanes", {})
        if lanes.get("sync", {}).get("billed_requests"):
            out.append("  " + "; ".join(
                f"{lane} lane: {v['rows_answered']:,} rows answered, "
                + ("cost unknown" if v["cost_usd"] is None else f"${v['cost_usd']:,.4f}")
                for lane, v in lanes.items()))
        if r.get("waiting_for_queue"):
            out.append(f"  in flight, waiting for room in the processing queue: {r['waiting_for_queue']:,} rows "
                       "(sent by a later run)")
        if r.get("create_unconfirmed"):
            out.append(f"  in flight, create of unknown outcome being looked for: {r['create_unconfirmed']:,} rows")
        for k, v in j["not_sent"].items():
            out.append(f"  not sent: {k:<20} {v['rows']:>6,}  {v['why']}")
            out += [f"            {d}" for d in v.get("details", [])]
        for k, v in j["failures_by_type"].items():
            out.append(f"  failed:   {k:<20} {v:>6,}")
    if d["batches"]:
        out.append("batches:")
        for b in d["batches"]:
            c = b["request_counts"]
            age = b["age_seconds"]
            out.append(f"  {b['batch_id']}  {b['job']:<20} {b['state']:<22} "
                       f"{b['requests']:>7,} req  ok {c['succeeded']:,} err {c['errored']:,} "
                       f"exp {c['expired']:,} can {c['canceled']:,}  age {age if age is not None else '?'}s")
    return "\n".join(out) or "no jobs"


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def status(project_dir, profiles_dir, target, jobs, as_json):
    """Every batch with its processing_status, counts, age and expiry; per job, rows by outcome.

    Reads only the bridge's own state (no network). Example: batch-bridge status --json
    """
    from . import state, status as st

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
    names = [j.name for j in job_list]
    with state.connect(settings) as con:
        data = {"jobs": st.jobs_summary(con, names), "batches": st.batches(con, names)}
    _emit(data, as_json, _status_text)


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--out", "out", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="the HTML file to write")
@click.option("--since", default="30d", show_default=True,
              help="window for costs per day, batches and errors: e.g. 30d, 12h, 2w, or all")
@handle_errors
def report(project_dir, profiles_dir, target, jobs, out, since):
    """Write one self-contained HTML page (rows, cost, time, cache, errors) and print its path.

    Reads only the bridge's own state (no network). Example: batch-bridge report --job reviews --since 7d
    """
    from .report import write_report
    from .report_data import parse_since

    window = parse_since(since)
    settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
    click.echo(str(write_report(settings, [j.name for j in job_list], out, window)))


# --- pipeline / dbt -------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--wait", "wait_", is_flag=True, help="submit, wait and collect (run) instead of sync")
@click.option("--max-cost", type=float, help="refuse (and send nothing) if the estimate exceeds this many USD")
@click.option("--timeout", type=float, help="with --wait: stop waiting after this many seconds (exit 3)")
@click.option("--poll-interval", type=float, help="with --wait: seconds between polls")
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def pipeline(project_dir, profiles_dir, target, jobs, wait_, max_cost, timeout, poll_interval, lane, as_json):
    """A whole scheduled run: dbt build (upstream of the jobs), sync (or --wait: run), dbt build (downstream).

    Upstream/downstream are the project's selectors bb_upstream/bb_downstream when defined, otherwise
    the jobs' staging models with their parents, and every model reading a results source.
    Example (cron, hourly): batch-bridge pipeline --project-dir /srv/analytics/dbt_project
    """
    from .pipeline import run_pipeline

    settings, job_list = _setup(project_dir, profiles_dir, target, jobs, lane, poll_interval=poll_interval)
    r = run_pipeline(settings, job_list, _client(settings), wait=wait_, max_cost=max_cost, timeout=timeout,
                     progress=StderrProgress())
    data = {"upstream": r.upstream, "downstream": r.downstream, "submitted": r.submitted, "loaded": r.loaded,
            "answered_sync": r.answered_sync, "rejected": r.rejected}
    _emit(data, as_json, lambda d: f"submitted {len(d['submitted'])} batch(es); loaded "
          + (", ".join(f"{k}: {v:,}" for k, v in d["loaded"].items()) or "nothing new"))
    _exit_if_rejected(r.rejected)


@cli.command(context_settings={**CONTEXT_SETTINGS, "ignore_unknown_options": True})
@project_options
@click.argument("dbt_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def dbt(project_dir, profiles_dir, target, dbt_args):
    """Run dbt with the paths the bridge resolved (from any directory), then release the warehouse.

    Example: batch-bridge dbt build --select review_insights
    """
    from .dbt_runner import invoke

    settings = _settings(project_dir, profiles_dir, target)
    invoke(settings, list(dbt_args))


@cli.command(context_settings=CONTEXT_SETTINGS)
@common
@click.option("--write", "write_path", type=click.Path(dir_okay=False),
              help="write into this YAML file (e.g. models/sources/batch_bridge.yml); later runs replace only their own block")
@click.option("--source-name", default="batch_bridge", show_default=True, help="the dbt source's name")
@handle_errors
def sources(project_dir, profiles_dir, target, jobs, write_path, source_name):
    """Print the dbt source YAML for every job's results (columns, types, tests, freshness), or --write it.

    Example: batch-bridge sources --write models/sources/batch_bridge.yml
    """
    from pathlib import Path

    from . import sources as src

    if not write_path:
        settings, job_list = _setup(project_dir, profiles_dir, target, jobs)
        click.echo(src.render(settings, job_list, source_name), nl=False)
        return
    from .bridge import load_jobs

    settings = _settings(project_dir, profiles_dir, target)
    path = Path(write_path).resolve()
    if not path.is_relative_to(settings.project_dir):
        click.echo(f"warning: {path} is outside the dbt project {settings.project_dir}; dbt will not read it", err=True)
    job_list, declared = src.jobs_parsed_for_writing(settings, path, source_name, lambda: load_jobs(settings, jobs))
    for table in sorted(set(declared) - {j.name for j in job_list}):
        click.echo(f"warning: a model reads source('{source_name}', '{table}'), and no job is named {table!r}; "
                   "dbt will not parse the project until one is, or the model reads another table", err=True)
    changed = src.write(settings, job_list, path, source_name)
    click.echo(f"{'wrote' if changed else 'unchanged:'} source {source_name!r} with {len(job_list)} table(s) in {path}",
               err=True)


@cli.command("dbt-package-path", context_settings=CONTEXT_SETTINGS)
def dbt_package_path():
    """Print the path of the shipped dbt package (for packages.yml `local:` or macro-paths)."""
    from importlib import resources

    click.echo(str(resources.files("batch_bridge") / "dbt_package"))


@cli.command(context_settings=CONTEXT_SETTINGS)
@project_options
@click.option("--older-than-days", type=float, help="retention in days [BATCH_BRIDGE_RETENTION_DAYS]")
@click.option("--dry-run", is_flag=True, help="list what would be removed; remove nothing")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def purge(project_dir, profiles_dir, target, older_than_days, dry_run, as_json):
    """Remove request and result archives (user data) of finished batches older than the retention.

    Files of batches still in flight are never removed. Example: batch-bridge purge --older-than-days 30
    """
    from .purge import purge as do_purge
    from .state import exclusive

    settings = _settings(project_dir, profiles_dir, target)
    with exclusive(settings):
        r = do_purge(settings, older_than_days, dry_run)
    _emit(r.to_json(), as_json, lambda d: f"{'would remove' if d['dry_run'] else 'removed'} {len(d['removed'])} "
          f"archive file(s), {d['bytes'] / 1e6:,.1f} MB; kept {d['kept_in_flight']} in flight, "
          f"{d['kept_recent']} younger than {d['older_than_days']:g} days")


from .emulator.cli import emulator  # noqa: E402 - registered last so its import cost is paid once

cli.add_command(emulator)


def main() -> None:
    """The console script."""
    try:
        cli()
    finally:
        # The interpreter's last garbage collection at exit walks every object the SDK's ~3,000 modules
        # made: 0.3-0.6 s of a command's wall (measured). The process is ending; its objects are left to
        # the OS. Exit handlers, thread joins and stream flushes still run as usual.
        gc.freeze()


if __name__ == "__main__":
    main()
