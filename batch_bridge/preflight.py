"""Preflight: what the API would refuse, found before a batch is sent instead of hours after.

The Batches API validates each request only while processing it, so a typo in the model, a
`max_tokens` above the model's, a schema structured outputs reject, a retired model or one without
batch support come back as one `errored` result per row, the next morning. The Models API answers
all of it at once and for free; the schema rules are local (`schema_check`). A job the API would
refuse wholesale stops every submission (exit 2, nothing sent); a deprecated model, or a cache that
cannot work, is a warning; rows longer than the context window are rejected one by one in `classify`
(`too_long`), from the limit found here.

The network is never a reason to stop: without a key, or when the Models API does not answer
within `preflight_timeout` (one try), the preflight says what it could not check and goes on.
Answers are kept for an hour (`model_info`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb

from . import api, model_info, schema_check
from .config import Settings
from .errors import ApiAuthError, ApiError, PreflightRefused, UnknownModel
from .estimate import Estimate
from .jobs import Job
from .model_info import ModelFacts

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

_DATED = re.compile(r"-\d{8}$")


@dataclass
class JobPreflight:
    """What the preflight found for one job."""

    job: str
    model: str
    facts: ModelFacts | None = None
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # what could not be checked, and why
    unknown: bool = False  # the Models API does not know the model
    suggestion: str | None = None  # for an unknown model: the closest listed id

    @property
    def max_input_tokens(self) -> int | None:
        return self.facts.max_input_tokens if self.facts else None

    def to_json(self) -> dict[str, Any]:
        f = self.facts
        return {
            "model": self.model,
            "model_id": f.id if f else None,
            "lifecycle": f.lifecycle if f else None,
            "max_tokens": f.max_tokens if f else None,
            "max_input_tokens": f.max_input_tokens if f else None,
            "warnings": self.warnings,
            "unchecked": self.unchecked,
        }


@dataclass
class _Api:
    """The Models API as the preflight sees it: asked until it fails once, then left alone."""

    client: anthropic.Anthropic | None
    settings: Settings
    offline: str | None = None  # why it is not asked (no key, no answer)
    listed: list[str] | None = None

    def __post_init__(self) -> None:
        if self.client is None:
            self.offline = "no ANTHROPIC_API_KEY is set"

    def facts(self, con: duckdb.DuckDBPyConnection, model: str, notes: list[str]) -> ModelFacts | None:
        """ModelFacts (kept, or asked), None when offline with nothing kept; raises api.NotFound for an
        unknown model. Offline, an answer older than an hour is used, and `notes` says so."""
        kept = model_info.cached(con, self.settings.base_url, model)
        if kept is not None:
            return kept[0]
        if not self.offline:
            assert self.client is not None
            try:
                facts = api.retrieve_model(self.client, model, timeout=self.settings.preflight_timeout)
            except api.NotFound:
                raise
            except ApiAuthError as e:
                self.offline = f"the API refused the key ({e.message})"
            except ApiError as e:
                self.offline = f"the Models API did not answer ({e.message})"
            else:
                model_info.keep(con, self.settings.base_url, model, facts)
                return facts
        old = model_info.cached(con, self.settings.base_url, model, max_age=None)
        if old is None:
            return None
        notes.append(f"{self.offline}: used what the Models API said of {model!r} at {old[1]:%Y-%m-%d %H:%M} UTC")
        return old[0]

    def suggest(self, model: str) -> str | None:
        if self.listed is None and self.client is not None and not self.offline:
            try:
                self.listed = api.list_model_ids(self.client, timeout=self.settings.preflight_timeout)
            except ApiError:
                self.listed = []
        names = set(self.listed or ())
        names |= {_DATED.sub("", n) for n in names}  # aliases are what people type
        close = difflib.get_close_matches(model, sorted(names), n=1, cutoff=0.6)
        return close[0] if close else None


def check_jobs(
    con: duckdb.DuckDBPyConnection, settings: Settings, jobs: list[Job], client: anthropic.Anthropic | None, *,
    for_batch: bool = True,
) -> dict[str, JobPreflight]:
    """Check every job; raise PreflightRefused (UnknownModel for a model the API does not know) naming
    every refused job, else return what was found per job (warnings, what could not be checked)."""
    remote = _Api(client, settings)
    out: dict[str, JobPreflight] = {}
    for job in jobs:
        # A job whose lane is `sync` (its field or --lane) never sends a batch: batch support is not needed.
        out[job.name] = _check_job(con, job, remote, for_batch and job.lane != "sync")
    refused = [p for p in out.values() if p.refusals]
    if refused:
        lines = [f"job {p.job!r}: {r}" for p in refused for r in p.refusals]
        unknown = any(p.unknown for p in refused)
        hints = [f"job {p.job!r}: did you mean {p.suggestion!r}?" for p in refused if p.suggestion]
        hint = "; ".join(hints) if hints else "fix the job's meta.batch_bridge in its YAML; nothing was sent"
        cls = UnknownModel if unknown else PreflightRefused
        raise cls("preflight refused (nothing was sent):\n  " + "\n  ".join(lines), hint=hint)
    return out


def _check_job(con: duckdb.DuckDBPyConnection, job: Job, remote: _Api, for_batch: bool) -> JobPreflight:
    p = JobPreflight(job.name, job.model)
    if job.output_schema is not None:
        for problem in schema_check.check(job.output_schema):
            p.refusals.append(f"output_schema: structured outputs do not accept {problem}")
    try:
        p.facts = remote.facts(con, job.model, p.unchecked)
    except api.NotFound:
        p.unknown = True
        p.suggestion = remote.suggest(job.model)
        p.refusals.insert(0, f"model {job.model!r} is not a model the API knows"
                          + (f" (did you mean {p.suggestion!r}?)" if p.suggestion else ""))
        return p
    if p.facts is None:
        p.unchecked.append(f"model, lifecycle, limits and capabilities of {job.model!r} not checked: {remote.offline}")
        return p
    _check_facts(p, job, p.facts, for_batch)
    return p


def _check_facts(p: JobPreflight, job: Job, f: ModelFacts, for_batch: bool) -> None:
    if f.lifecycle == "retired":
        p.refusals.append(f"model {job.model!r} is retired (since {f.retires_at or f.deprecated_at or 'an unknown date'}); "
                          "requests naming it fail: move the job to a current model")
    elif f.lifecycle == "deprecated":
        when = f"retires on {f.retires_at}" if f.retires_at else "has no retirement date yet"
        p.warnings.append(f"model {job.model!r} is deprecated (since {f.deprecated_at or 'an unknown date'}) and {when}; "
                          "move the job to a current model before then")
    if for_batch and f.batch is False:
        p.refusals.append(f"model {job.model!r} does not support the Message Batches API (capabilities.batch is false); "
                          "choose a model with batch support")
    if job.output_schema is not None and f.structured_outputs is False:
        p.refusals.append(f"model {job.model!r} has no structured outputs (capabilities.structured_outputs is false), "
                          "so output_schema cannot be sent; use output_tool (a tool {name, description, input_schema} "
                          "the model is made to call) instead, or a model with structured outputs")
    if f.max_tokens is not None and job.max_tokens > f.max_tokens:
        p.refusals.append(f"max_tokens = {job.max_tokens:,} is above the {f.max_tokens:,} that model {job.model!r} "
                          f"allows; set max_tokens to at most {f.max_tokens}")
    if f.structured_outputs is None:
        p.unchecked.append("the API did not say whether the model has structured outputs")
    if f.max_input_tokens is None:
        p.unchecked.append("the API did not say the model's context window: no row was checked against it")


def cache_warning(job: Job, estimate: Estimate) -> str | None:
    """A warning when the job asks for caching (`cache_ttl` in its YAML) a shared prefix too short to be
    cached. The default marks every prefix, at no cost when it is too short: not worth a warning on
    every run."""
    if (job.cache_ttl == "none" or not job.cache_ttl_given or not (job.system or job.few_shot)
            or estimate.cache_min_tokens is None):
        return None
    if estimate.cache_prefix_tokens >= estimate.cache_min_tokens:
        return None
    return (f"cache_ttl is {job.cache_ttl} but the shared prefix (system prompt, few-shot turns, schema) is "
            f"~{estimate.cache_prefix_tokens:,} tokens, below the {estimate.cache_min_tokens:,} model {job.model!r} "
            "needs to cache it: nothing will be cached and the estimate has no cache savings "
            "(set cache_ttl: none to silence this)")
