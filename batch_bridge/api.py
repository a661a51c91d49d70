"""The only module that builds the `anthropic` client and talks to the Message Batches API.

Two deliberate departures from `client.messages.batches.create(requests=[...])`:
- the create body is streamed from the request file (`{"requests":[` + lines joined by commas + `]}`)
  through the SDK's own `post`, so a 256 MB batch costs no Python object per request;
- the create runs with `max_retries=0`: the API has no idempotency key, so a retried POST can pay twice.
  Ambiguous failures are reconciled with `list` by the caller instead (`submit.py`).
Results are streamed to disk as raw bytes (the SDK's JSONL decoder would build a pydantic object per line).
SDK exceptions are translated to our hierarchy here and nowhere else; messages never carry the key.
"""

from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx2

from . import imports
from .config import Settings
from .errors import ApiAccountError, ApiAuthError, ApiError, ApiRequestRejected, ConfigError, ResultsError
from .model_info import REAL_API, ModelFacts, facts_of

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import Message
    from anthropic.types.messages import MessageBatch

CHUNK = 1 << 20
BODY_HEAD = b'{"requests":['
BODY_TAIL = b"]}"


@dataclass(frozen=True)
class BatchInfo:
    """The fields of a MessageBatch the bridge keeps, in the API's words."""

    id: str
    processing_status: str
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int
    created_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: datetime | None
    results_url: str | None

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired

    @classmethod
    def of(cls, b: MessageBatch) -> "BatchInfo":
        rc = b.request_counts

        def naive(d: datetime | None) -> datetime | None:
            return d.replace(tzinfo=None) if d is not None and d.tzinfo else d

        return cls(
            id=b.id, processing_status=b.processing_status,
            processing=rc.processing, succeeded=rc.succeeded, errored=rc.errored,
            canceled=rc.canceled, expired=rc.expired,
            created_at=naive(b.created_at), expires_at=naive(b.expires_at), ended_at=naive(b.ended_at),
            cancel_initiated_at=naive(b.cancel_initiated_at), archived_at=naive(b.archived_at),
            results_url=b.results_url,
        )


class CreateOutcomeUnknown(ApiError):
    """The create call failed in a way that does not tell whether the batch exists (timeout, 5xx)."""


class CreateRefused(ApiError):
    """The API answered that it did not create the batch (429/529): safe to send again after a pause."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(ApiError):
    transient = False


_preload_lock = threading.Lock()
_preloading: threading.Thread | None = None


def preload() -> None:
    """Start importing the SDK in a thread, for a command that will talk to the API.

    `import anthropic` costs ~1.2 s of CPU (its pydantic types), the largest single cost of a small
    run. Nothing in the bridge imports it at module level, so a command starts this first and does its
    DuckDB work (which releases the GIL) meanwhile; the first `build_client` or error translation then
    finds it imported, or waits for the import to finish (Python's import lock). The import keeps the
    garbage collector off the SDK's objects (`imports.py`). Not a daemon thread: an interpreter must
    not exit while a thread is half way through an import."""
    global _preloading
    with _preload_lock:
        if _preloading is None:
            _preloading = threading.Thread(target=imports.import_module, args=("anthropic",), name="import-anthropic")
            _preloading.start()


def _require_key(settings: Settings) -> None:
    if not settings.api_key:
        raise ConfigError(
            "ANTHROPIC_API_KEY is not set",
            hint="export ANTHROPIC_API_KEY=... (for the local emulator any value works, with "
            "ANTHROPIC_BASE_URL pointing at it)",
        )


def build_client(settings: Settings, *, max_retries: int = 4, timeout: float = 600.0) -> anthropic.Anthropic:
    """The SDK client. Without ANTHROPIC_BASE_URL it talks to the real API."""
    _require_key(settings)
    import anthropic  # here, not at the top: see preload()

    return anthropic.Anthropic(
        api_key=settings.api_key,
        base_url=settings.base_url,  # None: the SDK's default, the real API
        max_retries=max_retries,
        timeout=httpx2.Timeout(timeout, connect=10.0),
    )


class _OnFirstUse:
    """Stands for the SDK client: a thread builds it as soon as the SDK is imported, and the first
    attribute asked for waits for that build (thread-safe: the sync lane's workers share one client).

    Building the client costs 0.05-0.09 s (its HTTP client and TLS context) after the ~1.2 s import;
    built by the caller at its first API call, that sat between the import's end and the create's
    POST. A build that fails in the thread is tried again, and raises, at the first use."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._client: Any = None
        self._lock = threading.Lock()
        # Not a daemon: an interpreter must not exit while the thread is inside the SDK's import.
        threading.Thread(target=self._build_ahead, name="build-anthropic-client").start()

    def _build_ahead(self) -> None:
        # The SDK is imported by `preload`'s thread, with the collector paused (`imports.py`); this
        # thread's `import anthropic` must not win the race to the import lock and import it plainly.
        if _preloading is not None:
            _preloading.join()
        try:
            self._built()
        except Exception:  # noqa: BLE001 - the first use builds it again and raises there
            pass

    def _built(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build()
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._built(), name)


def client_on_first_use(settings: Settings, **kw: Any) -> anthropic.Anthropic:
    """`build_client`'s checks now; the SDK's import started, and the client built right after it,
    beside the caller's work.

    A command's first API call often comes after its DuckDB work (staging, hashing, the request
    file), so the ~1.2 s import of the SDK runs beside that work instead of before it."""
    _require_key(settings)
    preload()
    return _OnFirstUse(lambda: build_client(settings, **kw))  # type: ignore[return-value]


def retry_after(headers: httpx2.Headers | dict[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds the API asks us to wait: `retry-after-ms`, else `retry-after` in seconds or as an HTTP
    date (the forms the SDK honours too); None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def _retry_after(e: anthropic.APIStatusError) -> float | None:
    return retry_after(e.response.headers) if e.response is not None else None


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Map SDK exceptions to ours. The SDK's messages carry the API's words, never the key."""
    import anthropic
    try:
        yield
    except anthropic.AuthenticationError as e:
        raise ApiAuthError(
            f"{what}: the API rejected the key (401 authentication_error)",
            hint="check ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL if you use the emulator)",
        ) from e
    except anthropic.PermissionDeniedError as e:
        raise ApiAccountError(
            f"{what}: permission denied (403 permission_error): {_api_message(e)}",
            hint="the key's workspace may not use this resource or model: use a key with access, or change the "
            "job's model; nothing was lost, the rows are sent once it works",
        ) from e
    except anthropic.NotFoundError as e:
        raise NotFound(f"{what}: not found (404): {_api_message(e)}") from e
    except anthropic.APIStatusError as e:
        if e.status_code == 402:
            raise ApiAccountError(
                f"{what}: billing problem (402 billing_error): {_api_message(e)}",
                hint="fix billing (credit balance or spend limit) in the Anthropic console; nothing was lost, "
                "the rows are sent by the next run once it is fixed",
            ) from e
        if e.status_code in (408, 409, 429) or e.status_code >= 500:
            raise ApiError(f"{what}: HTTP {e.status_code}: {_api_message(e)}") from e
        raise ApiRequestRejected(f"{what}: HTTP {e.status_code}: {_api_message(e)}") from e
    except anthropic.APITimeoutError as e:
        raise ApiError(f"{what}: timed out") from e
    except anthropic.APIConnectionError as e:
        raise ApiError(f"{what}: connection failed: {e.__cause__ or e}") from e


def _api_message(e: anthropic.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    return f"{err.get('type', 'error')}: {err.get('message', e.message)}"


# The fields of a request `params` the token counting endpoint takes (not max_tokens, sampling or metadata).
COUNT_TOKENS_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
                       "cache_control")


def count_tokens(client: anthropic.Anthropic, params: dict[str, Any]) -> int:
    """Input tokens of a batch request's `params`, from the free token counting endpoint.

    One retry (the SDK honours retry-after): the endpoint has its own rate limit, and a plan that hits it
    falls back to its rule instead of waiting (the counts it got are kept for the next plan)."""
    body = {k: params[k] for k in COUNT_TOKENS_FIELDS if k in params}
    with translated("count_tokens"):
        return int(client.with_options(max_retries=1).messages.count_tokens(**body).input_tokens)


def endpoint_for(settings: Settings) -> str:
    """Which API `build_client(settings)` talks to (its base URL, without credentials), without building
    the client or importing the SDK: token counts of one API are not another's."""
    url = httpx2.URL(settings.base_url or REAL_API)
    return f"{url.scheme}://{url.host}{':' + str(url.port) if url.port else ''}{url.path}".rstrip("/")


def body_size(request_file: Path) -> int:
    """Exact byte size of the create body streamed from a request JSONL file."""
    size = request_file.stat().st_size  # ends with one newline; each newline becomes a comma but the last
    return len(BODY_HEAD) + size - 1 + len(BODY_TAIL)


def _body_chunks(request_file: Path) -> Iterator[bytes]:
    yield BODY_HEAD
    size = request_file.stat().st_size
    sent = 0
    with open(request_file, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            sent += len(chunk)
            if sent == size:  # drop the final newline
                chunk = chunk[:-1]
            yield chunk.replace(b"\n", b",")
    yield BODY_TAIL


def create_batch(client: anthropic.Anthropic, request_file: Path, *, timeout: float = 600.0) -> BatchInfo:
    """One create POST, never retried by the SDK. Raises CreateRefused or CreateOutcomeUnknown."""
    import anthropic
    from anthropic.types.messages import MessageBatch
    try:
        batch = client.with_options(max_retries=0).post(
            "/v1/messages/batches",
            cast_to=MessageBatch,
            content=_body_chunks(request_file),
            options={
                "headers": {"Content-Type": "application/json", "Content-Length": str(body_size(request_file))},
                "timeout": timeout,
            },
        )
    except anthropic.APIStatusError as e:
        if e.status_code in (429, 529):  # refused before processing: nothing was created
            raise CreateRefused(f"create: HTTP {e.status_code}: {_api_message(e)}", _retry_after(e)) from e
        if e.status_code >= 500 or e.status_code in (408, 409):
            raise CreateOutcomeUnknown(f"create: HTTP {e.status_code}: {_api_message(e)}") from e
        if e.status_code == 404:  # the endpoint, not a batch: a base URL or workspace that has no batches
            raise ApiAccountError(
                f"create: not found (404 not_found_error): {_api_message(e)}",
                hint="check ANTHROPIC_BASE_URL (unset for the real API) and that the key's workspace may use the "
                "Message Batches API; nothing was sent",
            ) from e
        with translated("create"):  # other 4xx: refused (bad key, billing, permission, bad body)
            raise
        raise  # unreachable: translated() always raises
    except (anthropic.APITimeoutError, anthropic.APIConnectionError) as e:
        raise CreateOutcomeUnknown(f"create: {type(e).__name__}: {e}") from e
    return BatchInfo.of(batch)


def retrieve(client: anthropic.Anthropic, batch_id: str) -> BatchInfo:
    with translated(f"retrieve {batch_id}"):
        return BatchInfo.of(client.messages.batches.retrieve(batch_id))


def cancel(client: anthropic.Anthropic, batch_id: str) -> BatchInfo:
    with translated(f"cancel {batch_id}"):
        return BatchInfo.of(client.messages.batches.cancel(batch_id))


def list_since(client: anthropic.Anthropic, since: datetime) -> list[BatchInfo]:
    """Batches created at or after `since` (naive UTC), newest first; pages until older ones appear."""
    out: list[BatchInfo] = []
    with translated("list batches"):
        for b in client.messages.batches.list(limit=100):
            info = BatchInfo.of(b)
            if info.created_at is not None and info.created_at < since:
                break
            out.append(info)
    return out


def download_results(
    client: anthropic.Anthropic, batch: BatchInfo, dest: Path, *, on_bytes: Callable[[int], None] | None = None
) -> int:
    """Stream a batch's results into `dest` (atomically, via a .part file). Returns the line count."""
    import anthropic
    if not batch.results_url:
        raise ResultsError(f"batch {batch.id} has no results_url yet (processing_status={batch.processing_status})")
    tmp = dest.with_name(dest.name + ".part")
    lines = 0
    last = b"\n"
    tail = bytearray()  # the bytes after the last newline so far
    with translated(f"results of {batch.id}"):
        resp = client.get(
            batch.results_url,
            cast_to=httpx2.Response,
            stream=True,
            options={"headers": {"Accept": "application/binary"}},
        )
    try:
        # Results hold user data: the file is the owner's only from its first byte.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a .part left by a killed run
        with open(fd, "wb") as f:
            for chunk in resp.iter_bytes(CHUNK):
                f.write(chunk)
                n = chunk.count(b"\n")
                lines += n
                if n:
                    tail[:] = chunk[chunk.rfind(b"\n") + 1:]
                else:
                    tail += chunk
                last = chunk[-1:] or last
                if on_bytes:
                    on_bytes(len(chunk))
            if last != b"\n":
                # A final line without a newline counts if it is whole: a stream closed without a
                # length, cut inside its last line, would otherwise pass the line count.
                try:
                    json.loads(tail)
                except ValueError:
                    raise ResultsError(f"results of {batch.id}: the download ended inside a line "
                                       f"({len(tail):,} bytes after the last newline are not JSON)") from None
                f.write(b"\n")
                lines += 1
            f.flush()
            os.fsync(f.fileno())
    except (httpx2.HTTPError, anthropic.APIError) as e:
        raise ResultsError(f"results of {batch.id}: the download broke off: {e}") from e
    finally:
        resp.close()
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
    return lines


MAX_RETRY_AFTER = 600.0


def backoff(attempt: int, retry_after: float | None, cap: float = 30.0) -> float:
    """Seconds to wait: the API's retry-after when it gave one (up to 10 minutes), else exponential
    backoff up to `cap`."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, MAX_RETRY_AFTER)
    return min(0.5 * 2**attempt, cap)


def sleep_backoff(attempt: int, retry_after: float | None, sleep: Callable[[float], None] = time.sleep,
                  cap: float = 30.0) -> None:
    """Sleep `backoff(attempt, retry_after, cap)`."""
    sleep(backoff(attempt, retry_after, cap))


# --- the Models API and synchronous Messages (preflight and preview) ---------------------------


def retrieve_model(client: anthropic.Anthropic, model: str, *, timeout: float) -> ModelFacts:
    """What the Models API says of `model` (an alias or an id). One try with a short timeout: a
    preflight must never hold a submission up; NotFound when the API does not know the model."""
    with translated(f"model {model}"):
        return facts_of(client.with_options(max_retries=0, timeout=timeout).models.retrieve(model))


def list_model_ids(client: anthropic.Anthropic, *, timeout: float) -> list[str]:
    """Ids of every model the API lists (active and deprecated), for did-you-mean suggestions."""
    with translated("list models"):
        return [m.id for m in client.with_options(max_retries=0, timeout=timeout).models.list(limit=1000)]


def create_message(client: anthropic.Anthropic, params: dict, *, timeout: float = 120.0) -> Message:
    """One synchronous Messages call with exactly `params` as the body (the body a batch line carries:
    posted as is, because the SDK's typed `messages.create` does not take every field, e.g. `top_k`)."""
    from anthropic.types import Message
    with translated("messages"):
        return client.with_options(timeout=timeout).post("/v1/messages", body=params, cast_to=Message)


# --- synchronous Messages calls (the sync lane) -----------------------------------------------

# HTTP statuses of a Messages call and the API's error type for each, for a failure that carries none.
_ERROR_TYPE_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}


@dataclass(frozen=True)
class CallFailure:
    """What a failed synchronous call says, in the API's words: the error type a batch result would
    carry for the same failure, its message, the HTTP status (None: no answer), and the wait asked."""

    error_type: str
    message: str
    status: int | None
    retry_after: float | None


def call_failure(e: ApiError) -> CallFailure:
    """Read a translated error of a Messages call back into the API's words (see `translated`)."""
    import anthropic
    cause = e.__cause__
    if isinstance(cause, anthropic.APIStatusError):
        body = cause.body if isinstance(cause.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        kind = err.get("type") or _ERROR_TYPE_OF_STATUS.get(cause.status_code, "api_error")
        return CallFailure(kind, str(err.get("message", cause.message)), cause.status_code, _retry_after(cause))
    if isinstance(cause, anthropic.APITimeoutError):
        return CallFailure("timeout_error", e.message, None, None)
    return CallFailure("api_error", e.message, None, None)
