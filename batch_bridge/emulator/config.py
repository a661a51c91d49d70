"""Typed settings for the emulator: one `EmulatorConfig` with a nested `Faults`.

Both are plain mutable dataclasses on purpose: the server and the worker read them on every
request / every batch, so a test (or `POST /_emulator/config`) can change faults while the
emulator runs and the next request sees the change. `update_from_dict` is the one place
that turns untrusted JSON into field assignments, refusing unknown names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

Endpoint = Literal["create", "list", "retrieve", "cancel", "delete", "results", "models", "messages", "count_tokens"]
# What an empty endpoint tuple means: the six Message Batches routes. The Models API, the synchronous
# Messages API and token counting get faults only when named (e.g. ("count_tokens",) for its rate
# limit), so batch fault tests are not changed by a client that looks a model up or counts first.
BATCH_ENDPOINTS: tuple[Endpoint, ...] = ("create", "list", "retrieve", "cancel", "delete", "results")
ENDPOINTS: tuple[Endpoint, ...] = BATCH_ENDPOINTS + ("models", "messages", "count_tokens")
ErroredType = Literal["overloaded_error", "api_error"]

# Real limits of the Message Batches API (contract §3).
MAX_REQUESTS_PER_BATCH = 100_000
MAX_BODY_BYTES = 256 * 1024 * 1024


@dataclass
class Faults:
    """Fault injection knobs; all off by default. Counts: 0 = off, N = the next N times, -1 = always."""

    # Seed for every deterministic per-request decision (hash of seed + custom_id).
    seed: int = 0
    # Fraction of processed requests that end `errored` with one of `errored_types`.
    errored_fraction: float = 0.0
    errored_types: tuple[ErroredType, ...] = ("overloaded_error",)
    # Fraction of requests that end `expired` although the batch finished in time.
    expired_fraction: float = 0.0
    # HTTP errors: a queue of statuses served to the next matching requests, in order
    # (e.g. [529, 529] = two overloaded answers, then normal service) ...
    http_errors: list[int] = field(default_factory=list)
    # ... and/or a random fraction of matching requests answered with `http_error_status`.
    http_error_fraction: float = 0.0
    http_error_status: int = 529
    # Endpoints the HTTP-error and connection-reset faults apply to; empty = the six batch endpoints
    # (models, messages and count_tokens only when named).
    http_error_endpoints: tuple[Endpoint, ...] = ()
    # `retry-after` seconds sent with injected 429/5xx answers; None = header left out.
    retry_after: float | None = 0.01
    # How it is written: "seconds" (`retry-after: 7`), "ms" (`retry-after-ms: 7000`, the SDK reads it
    # first) or "http-date" (`retry-after: Sun, 29 Nov 2026 16:00:07 GMT`).
    retry_after_format: Literal["seconds", "ms", "http-date"] = "seconds"
    # `x-should-retry` header on injected errors: None = left out, True/False = "true"/"false".
    should_retry: bool | None = None
    # Connection resets (RST, no response) for the next N matching requests.
    connection_resets: int = 0
    connection_reset_endpoints: tuple[Endpoint, ...] = ()
    # The double-submit hazard: persist the batch, then wait this many real seconds before
    # answering the create POST; applies to the next `slow_create_times` creates.
    slow_create_seconds: float = 0.0
    slow_create_times: int = -1
    # Close the results stream after this many bytes, `results_cut_times` times.
    results_cut_after_bytes: int | None = None
    results_cut_times: int = 1
    # Transient 404 after create: retrieve/results of a new batch answer 404 for its first
    # K calls and/or during its first X real seconds (anthropic-sdk-python#1432).
    not_found_first_calls: int = 0
    not_found_first_seconds: float = 0.0
    # Propagation delay: a new batch is missing from `list` (and answers 404 to retrieve/results) for
    # its first X real seconds, so a client that lost the create's answer cannot find it at once.
    propagation_seconds: float = 0.0
    # A create answered with an error *after* its batch was stored (a 5xx after the body was sent):
    # a queue of statuses served to the next creates, in order.
    create_errors_after_store: list[int] = field(default_factory=list)
    # A shared workspace: every create also stores this many batches of "another client" with the same
    # request count (other custom_ids), created `neighbour_offset_seconds` (emulated) from ours.
    neighbour_batches: int = 0
    neighbour_offset_seconds: float = -1.0
    # An ended batch whose `results_url` is still null for X (emulated) seconds after `ended_at`.
    results_url_delay_seconds: float = 0.0


@dataclass
class EmulatorConfig:
    """Everything the emulator needs; CLI flags map one to one onto these fields."""

    host: str = "127.0.0.1"
    # 0 = pick a free port (in-process use); the CLI defaults to 8765.
    port: int = 0
    # Only this key is accepted when set; otherwise any non-empty key is.
    api_key: str | None = None
    # Batches live here and survive a restart; None = a temp dir removed on shutdown.
    state_dir: Path | None = None
    # Emulated seconds a batch stays `in_progress` before it is processed and `ended`.
    latency: float = 0.0
    # Real seconds `POST /v1/messages` takes before it answers (the synchronous API's latency).
    messages_latency: float = 0.0
    # Real seconds the Models API (`GET /v1/models`, `/v1/models/{id}`) takes before it answers.
    models_latency: float = 0.0
    # Emulated seconds a batch stays `canceling` after a cancel.
    cancel_latency: float = 0.0
    # Fraction of requests that still complete when a batch is canceled before processing.
    cancel_complete_fraction: float = 0.0
    # Emulated seconds per real second (3600 = one real second is one emulated hour).
    time_scale: float = 1.0
    # Minimum prefix size (tokens) for a cache breakpoint; None = the real per-model minimum.
    cache_min_tokens: int | None = None
    # Caching in batches is best-effort: the share of lookups of a cached prefix that hit (drawn per
    # request from faults.seed); a miss writes the prefix again. 1.0 = every lookup after the first hits.
    cache_hit_rate: float = 0.7
    # `module:function` of a custom responder, or the callable itself (see responder.py).
    responder: str | Callable[..., Any] | None = None
    # Create bodies above this many bytes are refused with 413 request_too_large.
    max_body_bytes: int = MAX_BODY_BYTES
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH
    # The workspace's processing-queue limit: requests in batches not yet ended, all clients together
    # (100,000 at Tier 1). A create that would pass it answers 429 rate_limit_error with
    # `retry-after: queue_retry_after`. None = no limit.
    queue_limit_requests: int | None = None
    queue_retry_after: float = 60.0
    # Base URL put into `results_url`; None = built from each request's Host header.
    public_base_url: str | None = None
    # Results are streamed in chunks of this many bytes.
    results_chunk_bytes: int = 1024 * 1024
    log_level: str = "warning"
    # Child processes that process batches, off the server's GIL (the CLI default is 2);
    # 0 = the worker thread does it (in-process default: starts instantly, and a responder
    # may be any callable). See worker.py for how results stay reproducible.
    worker_processes: int = 0
    # A batch of at least this many requests, due while other lanes are idle, is processed in parts
    # across them (worker.py); below it, one process is quicker than starting parts.
    split_min_requests: int = 2000
    faults: Faults = field(default_factory=Faults)


class ConfigError(ValueError):
    """An unknown or ill-typed config field; the message names the field and the valid ones."""


_TUPLE_FIELDS = {"errored_types", "http_error_endpoints", "connection_reset_endpoints"}
_RUNTIME_CONFIG_FIELDS = {
    "latency",
    "messages_latency",
    "models_latency",
    "cancel_latency",
    "cancel_complete_fraction",
    "time_scale",
    "cache_min_tokens",
    "cache_hit_rate",
    "max_body_bytes",
    "max_requests_per_batch",
    "queue_limit_requests",
    "queue_retry_after",
    "public_base_url",
    "results_chunk_bytes",
    "api_key",
}


def update_faults(faults: Faults, changes: Mapping[str, Any]) -> None:
    """Assign `changes` onto `faults`, refusing unknown names and bad endpoint names."""
    names = {f.name for f in dataclasses.fields(Faults)}
    for key, value in changes.items():
        if key not in names:
            raise ConfigError(f"unknown fault {key!r}; valid faults: {', '.join(sorted(names))}")
        if key in _TUPLE_FIELDS:
            value = tuple(value)
            if key.endswith("endpoints"):
                bad = [v for v in value if v not in ENDPOINTS]
                if bad:
                    raise ConfigError(f"{key}: unknown endpoint(s) {bad}; valid: {', '.join(ENDPOINTS)}")
        if key in ("http_errors", "create_errors_after_store"):
            value = [int(v) for v in value]
        if key == "retry_after_format" and value not in ("seconds", "ms", "http-date"):
            raise ConfigError(f"retry_after_format: {value!r} is not one of seconds, ms, http-date")
        setattr(faults, key, value)


def update_config(config: EmulatorConfig, changes: Mapping[str, Any]) -> None:
    """Apply a runtime change: `{"faults": {...}, "latency": 1.0, ...}` (only runtime-safe fields)."""
    for key, value in changes.items():
        if key == "faults":
            update_faults(config.faults, value)
        elif key == "cache_hit_rate" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ConfigError(f"cache_hit_rate: {value!r} is not a share between 0 and 1 (e.g. 0.7)")
        elif key in _RUNTIME_CONFIG_FIELDS:
            setattr(config, key, value)
        else:
            valid = ", ".join(sorted(_RUNTIME_CONFIG_FIELDS | {"faults"}))
            raise ConfigError(f"config field {key!r} cannot be changed at runtime; valid: {valid}")


def config_as_dict(config: EmulatorConfig) -> dict[str, Any]:
    """JSON-friendly view of the config (never includes the API key itself)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(EmulatorConfig):
        value = getattr(config, f.name)
        if f.name == "faults":
            value = dataclasses.asdict(value)
        elif f.name == "api_key":
            value = value is not None  # whether a key is required, never the key
        elif f.name == "state_dir":
            value = str(value) if value is not None else None
        elif callable(value):
            value = f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', '?')}"
        out[f.name] = value
    return out
