"""`batch-bridge emulator`: the click command (registered in the main CLI with add_command)."""

from __future__ import annotations

from pathlib import Path

import click

from .config import ENDPOINTS, EmulatorConfig, Faults

_endpoint = click.Choice(ENDPOINTS)


def _statuses(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated HTTP statuses like 529,529 or 500,529; got {value!r}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8765, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--api-key", default=None, envvar="BATCH_BRIDGE_EMULATOR_API_KEY", help="Accept only this key (default: any non-empty key).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep batches here across restarts (default: a temp dir removed on exit).")
@click.option("--latency", default=0.0, show_default=True, type=float, help="Emulated seconds a batch stays in_progress.")
@click.option("--messages-latency", default=0.0, show_default=True, type=float, help="Real seconds POST /v1/messages takes to answer.")
@click.option("--models-latency", default=0.0, show_default=True, type=float, help="Real seconds the Models API takes to answer.")
@click.option("--cancel-latency", default=0.0, show_default=True, type=float, help="Emulated seconds a batch stays canceling.")
@click.option("--cancel-complete-fraction", default=0.0, show_default=True, type=float, help="Fraction of requests still completed when a batch is canceled.")
@click.option("--time-scale", default=1.0, show_default=True, type=float, help="Emulated seconds per real second (3600: 1 s is 1 h).")
@click.option("--cache-min-tokens", default=None, type=int, help="Minimum cacheable prefix (default: the real per-model minimum, e.g. 4096 for Haiku 4.5).")
@click.option("--cache-hit-rate", default=EmulatorConfig.cache_hit_rate, show_default=True, type=click.FloatRange(0, 1), help="Share of lookups of a cached prefix that hit (caching in batches is best-effort).")
@click.option("--responder", default=None, help="Custom responder as package.module:function.")
@click.option("--max-body-bytes", default=EmulatorConfig.max_body_bytes, show_default=True, type=int, help="Create bodies above this get 413.")
@click.option("--public-base-url", default=None, help="Base URL for results_url (default: from the request's Host header).")
@click.option("--worker-processes", default=2, show_default=True, type=click.IntRange(min=0), help="Child processes that process batches, off the HTTP server's GIL (0: a thread of the server).")
@click.option("--split-min-requests", default=EmulatorConfig.split_min_requests, show_default=True, type=click.IntRange(min=1), help="A batch this large, due while processing processes are idle, is processed in parts across them.")
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of all deterministic fault choices.")
@click.option("--errored-fraction", default=0.0, show_default=True, type=float, help="Fraction of requests errored.")
@click.option("--errored-type", "errored_types", multiple=True, type=click.Choice(["overloaded_error", "api_error"]), help="Error type(s) of injected errored results (repeatable).")
@click.option("--expired-fraction", default=0.0, show_default=True, type=float, help="Fraction of requests expired.")
@click.option("--http-errors", default=None, callback=_statuses, help="Statuses for the next requests, e.g. 529,529.")
@click.option("--http-error-fraction", default=0.0, show_default=True, type=float, help="Fraction of requests answered with --http-error-status.")
@click.option("--http-error-status", default=529, show_default=True, type=int)
@click.option("--http-error-endpoint", "http_error_endpoints", multiple=True, type=_endpoint, help="Limit HTTP errors to these endpoints (repeatable).")
@click.option("--retry-after", default=0.01, show_default=True, type=float, help="retry-after seconds on injected errors; negative: no header.")
@click.option("--should-retry", type=click.Choice(["true", "false"]), default=None, help="x-should-retry header on injected errors.")
@click.option("--connection-resets", default=0, show_default=True, type=int, help="Reset the next N connections (-1: all).")
@click.option("--connection-reset-endpoint", "connection_reset_endpoints", multiple=True, type=_endpoint)
@click.option("--slow-create-seconds", default=0.0, show_default=True, type=float, help="Answer create this late, after persisting the batch.")
@click.option("--slow-create-times", default=-1, show_default=True, type=int, help="How many creates are slow (-1: all).")
@click.option("--results-cut-after-bytes", default=None, type=int, help="Reset the results stream after this many bytes.")
@click.option("--results-cut-times", default=1, show_default=True, type=int, help="How many results downloads are cut (-1: all).")
@click.option("--not-found-first-calls", default=0, show_default=True, type=int, help="404 on the first K retrieve/results calls of a new batch.")
@click.option("--not-found-first-seconds", default=0.0, show_default=True, type=float, help="404 on retrieve/results during a batch's first X seconds.")
def emulator(**opts: object) -> None:
    """Serve a local Message Batches API emulator until stopped (Ctrl-C).

    The first line on stdout is the base URL. Point the SDK at it:

    \b
        batch-bridge emulator --port 8765 --latency 5
        ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=sk-test python my_script.py

    \b
    Faults for a test run, e.g. two 529s on create then service:
        batch-bridge emulator --http-errors 529,529 --http-error-endpoint create

    Runtime control: POST /_emulator/config {"faults": {...}}; counters: GET /_emulator/stats.
    Exit codes: 0 stopped by a signal, 1 bad configuration, 2 usage error.
    """
    retry_after = float(opts.pop("retry_after"))  # type: ignore[arg-type]
    should_retry = opts.pop("should_retry")
    faults = Faults(
        seed=opts.pop("seed"),  # type: ignore[arg-type]
        errored_fraction=opts.pop("errored_fraction"),  # type: ignore[arg-type]
        errored_types=tuple(opts.pop("errored_types")) or ("overloaded_error",),  # type: ignore[arg-type]
        expired_fraction=opts.pop("expired_fraction"),  # type: ignore[arg-type]
        http_errors=list(opts.pop("http_errors")),  # type: ignore[call-overload]
        http_error_fraction=opts.pop("http_error_fraction"),  # type: ignore[arg-type]
        http_error_status=opts.pop("http_error_status"),  # type: ignore[arg-type]
        http_error_endpoints=tuple(opts.pop("http_error_endpoints")),  # type: ignore[arg-type]
        retry_after=retry_after if retry_after >= 0 else None,
        should_retry=None if should_retry is None else should_retry == "true",
        connection_resets=opts.pop("connection_resets"),  # type: ignore[arg-type]
        connection_reset_endpoints=tuple(opts.pop("connection_reset_endpoints")),  # type: ignore[arg-type]
        slow_create_seconds=opts.pop("slow_create_seconds"),  # type: ignore[arg-type]
        slow_create_times=opts.pop("slow_create_times"),  # type: ignore[arg-type]
        results_cut_after_bytes=opts.pop("results_cut_after_bytes"),  # type: ignore[arg-type]
        results_cut_times=opts.pop("results_cut_times"),  # type: ignore[arg-type]
        not_found_first_calls=opts.pop("not_found_first_calls"),  # type: ignore[arg-type]
        not_found_first_seconds=opts.pop("not_found_first_seconds"),  # type: ignore[arg-type]
    )
    config = EmulatorConfig(faults=faults, **opts)  # type: ignore[arg-type]
    try:
        from .runner import serve  # uvicorn and the server: only when serving, not for every batch-bridge command

        serve(config)
    except (OSError, ValueError, ImportError) as exc:
        raise click.ClickException(f"emulator could not start: {exc}") from exc
    except KeyboardInterrupt:
        pass
