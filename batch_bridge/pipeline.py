"""A scheduled run in one command: dbt build (upstream) -> batch-bridge sync|run -> dbt build (downstream).

dbt runs in-process through `dbtRunner`, one invocation at a time, and its DuckDB handle is released
after each (`dbt_runner.invoke`), so the bridge can read the warehouse in between.

What each dbt step selects: the project's selectors `bb_upstream` / `bb_downstream` when it defines
them; otherwise `+<staging model>` for every job, then `source:<results source>+` for every dbt
source that reads the bridge's results files (found in the manifest by their `results/` location).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable


from . import bridge
from .config import Settings
from .dbt_runner import invoke, load_manifest
from .jobs import Job
from .progress import Progress, Silent

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

UPSTREAM_SELECTOR = "bb_upstream"
DOWNSTREAM_SELECTOR = "bb_downstream"


@dataclass
class PipelineReport:
    upstream: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    loaded: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # submission id -> the API's message (400/413)
    answered_sync: dict[str, int] = field(default_factory=dict)  # job -> synchronous calls answered
    waited: bool = False


def _selectors(manifest: dict[str, Any]) -> set[str]:
    return set((manifest.get("selectors") or {}).keys())


def upstream_args(manifest: dict[str, Any], jobs: list[Job]) -> list[str]:
    if UPSTREAM_SELECTOR in _selectors(manifest):
        return ["--selector", UPSTREAM_SELECTOR]
    models = [manifest["nodes"][j.node]["name"] for j in jobs if j.node in manifest.get("nodes", {})]
    return ["--select", *[f"+{m}" for m in models]]


def results_sources(manifest: dict[str, Any]) -> list[str]:
    """dbt sources that read the bridge's results files."""
    out = []
    for src in (manifest.get("sources") or {}).values():
        meta = {**(src.get("source_meta") or {}), **(src.get("meta") or {}), **((src.get("config") or {}).get("meta") or {})}
        loc = str(meta.get("external_location") or src.get("external", {}) or "")
        if "results/" in loc and "current.parquet" in loc:
            out.append(f"source:{src['source_name']}.{src['name']}")
    return sorted(out)


def downstream_args(manifest: dict[str, Any]) -> list[str] | None:
    if DOWNSTREAM_SELECTOR in _selectors(manifest):
        return ["--selector", DOWNSTREAM_SELECTOR]
    sources = results_sources(manifest)
    return ["--select", *[f"{s}+" for s in sources]] if sources else None


def run_pipeline(
    settings: Settings, jobs: list[Job], client: anthropic.Anthropic, *, wait: bool = False,
    max_cost: float | None = None, timeout: float | None = None, progress: Progress = Silent(),
    sleep: Callable[[float], None] = time.sleep, quiet_dbt: bool = False,
) -> PipelineReport:
    """dbt build upstream, then the bridge (sync, or run with `wait`), then dbt build downstream."""
    report = PipelineReport(waited=wait)
    manifest = load_manifest(settings)
    report.upstream = upstream_args(manifest, jobs)
    progress.step(f"dbt build {' '.join(report.upstream)}")
    quiet = ["--quiet"] if quiet_dbt else []
    invoke(settings, ["build", *quiet, *report.upstream])
    if wait:
        s, w = bridge.run(settings, jobs, client, max_cost=max_cost, timeout=timeout, progress=progress, sleep=sleep)
        report.submitted, report.loaded = s.batches, dict(w.collected)
    else:
        c, s = bridge.sync(settings, jobs, client, max_cost=max_cost, progress=progress, sleep=sleep)
        report.submitted, report.loaded = s.batches, dict(c.loaded)
    for job, n in s.sync_loaded.items():  # answers of the sync lane, loaded within the same command
        report.loaded[job] = report.loaded.get(job, 0) + n
    report.answered_sync = s.sync.answered
    report.rejected = s.rejected
    down = downstream_args(manifest)
    if down is None:
        progress.step("no dbt source reads the bridge's results yet; skipping the downstream build")
        return report
    report.downstream = down
    progress.step(f"dbt build {' '.join(down)}")
    invoke(settings, ["build", *quiet, *down])
    return report
