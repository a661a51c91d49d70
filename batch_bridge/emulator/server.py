"""The HTTP surface: six Message Batches routes, the Models API, synchronous Messages, admin routes,
auth, faults, streaming.

Starlette because it gives true streaming in both directions: a create body is written to
disk as it arrives (`request.stream()`), and results are sent from disk in large chunks,
so neither ever exists in memory as a whole. The body is parsed in a worker thread so the
event loop keeps answering polls while a 256 MB create is being validated.

Connection-level faults (reset, a results stream cut short) need the socket: the outermost
ASGI wrapper stores uvicorn's own `send` in the scope, and `abort_connection` reaches its
transport from there and closes it with SO_LINGER 0 (a real RST).
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import json
import logging
import shutil
import socket
import struct
import time
from typing import Any, Awaitable, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .clock import Clock
from .config import ConfigError, EmulatorConfig, Endpoint, config_as_dict, update_config
from .faults import FaultState, error_type_for, message_for
from .ids import new_batch_id, new_request_id
from .stats import Stats
from .store import InvalidStateTransition, Store, rfc3339
from .intake import persist_requests
from . import sync, tokens, usage
from .validate import EnvelopeError, check_count_params
from .worker import Worker

log = logging.getLogger("batch_bridge.emulator")
_RAW_SEND = "batch_bridge.emulator.raw_send"


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's error envelope, with the same id in the body and the `request-id` header."""
    rid = new_request_id()
    body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": rid}
    return JSONResponse(body, status_code=status, headers={"request-id": rid, **(headers or {})})


def ok(body: Any) -> JSONResponse:
    return JSONResponse(body, headers={"request-id": new_request_id()})


async def abort_connection(scope: Scope, reset: bool = True) -> None:
    """Drop the client's TCP connection: a reset (RST) as a crashed proxy would, or a plain
    close after the bytes already written (a stream that simply stops mid-body)."""
    cycle = getattr(scope.get(_RAW_SEND), "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise RuntimeError("cannot reach the connection to drop it (not running under uvicorn's h11 protocol?)")
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()  # flushes what was written, then FIN
    cycle.disconnected = True  # later sends on this cycle become no-ops
    await asyncio.sleep(0)


class _Nothing(Response):
    """Sends nothing: the connection is already gone."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class ResultsResponse(Response):
    """Streams a results file from disk; optionally resets the connection after `cut_after` bytes."""

    media_type = "application/x-jsonl"

    def __init__(self, path: Any, chunk: int, cut_after: int | None, stats: Stats) -> None:
        super().__init__(status_code=200, headers={"request-id": new_request_id()}, media_type=self.media_type)
        self.path = path
        self.chunk = chunk
        self.cut_after = cut_after
        self.stats = stats
        self.headers["content-length"] = str(path.stat().st_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        sent = 0
        with open(self.path, "rb") as f:
            while True:
                want = self.chunk
                if self.cut_after is not None:
                    if sent >= self.cut_after:
                        self.stats.fault("results_cut")
                        # A reset would make the kernel drop bytes the client has not read
                        # yet; a close delivers them and then ends the body early.
                        await abort_connection(scope, reset=False)
                        return
                    want = min(want, self.cut_after - sent)
                data = await anyio.to_thread.run_sync(f.read, want)
                if not data:
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
                sent += len(data)
                self.stats.incr("results_bytes_sent", len(data))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class EmulatorApp:
    """The ASGI app; owns nothing, gets its collaborators passed in."""

    def __init__(
        self, config: EmulatorConfig, store: Store, clock: Clock, worker: Worker, faults: FaultState, stats: Stats
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.worker = worker
        self.faults = faults
        self.stats = stats
        base = "/v1/messages/batches"
        routes = [
            Route(base, self._guard("create", self.create), methods=["POST"]),
            Route(base, self._guard("list", self.list), methods=["GET"]),
            Route(base + "/{batch_id}", self._guard("retrieve", self.retrieve), methods=["GET"]),
            Route(base + "/{batch_id}", self._guard("delete", self.delete), methods=["DELETE"]),
            Route(base + "/{batch_id}/cancel", self._guard("cancel", self.cancel), methods=["POST"]),
            Route(base + "/{batch_id}/results", self._guard("results", self.results), methods=["GET"]),
            Route("/v1/models", self._guard("models", self.models_list), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._guard("models", self.models_retrieve), methods=["GET"]),
            Route("/v1/messages", self._guard("messages", self.messages_create), methods=["POST"]),
            Route("/v1/messages/count_tokens", self._guard("count_tokens", self.count_tokens), methods=["POST"]),
            Route("/_emulator/stats", self.admin_stats, methods=["GET"]),
            Route("/_emulator/stats/reset", self.admin_reset, methods=["POST"]),
            Route("/_emulator/config", self.admin_get_config, methods=["GET"]),
            Route("/_emulator/config", self.admin_set_config, methods=["POST"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception, Exception: self._crash},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND] = send
        await self.app(scope, receive, send)

    # --- cross-cutting: auth and faults -----------------------------------------------------

    def _guard(
        self, endpoint: Endpoint, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            retry = request.headers.get("x-stainless-retry-count", "0")
            self.stats.endpoint(endpoint, int(retry) if retry.isdigit() else 0)
            problem = self._auth_problem(request)
            if problem is not None:
                self.stats.incr("auth_failures")
                return error_response(401, "authentication_error", problem)
            if self.faults.take_connection_reset(endpoint):
                self.stats.fault("connection_reset")
                await abort_connection(request.scope)
                return _Nothing()
            status = self.faults.take_http_error(endpoint)
            if status is not None:
                self.stats.fault(f"http_{status}")
                return error_response(status, error_type_for(status), message_for(status), self._retry_headers())
            return await handler(request)

        return guarded

    def _auth_problem(self, request: Request) -> str | None:
        # The key is compared, never logged or echoed.
        key = request.headers.get("x-api-key")
        if not key:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            return "x-api-key header is required (or Authorization: Bearer <key>)"
        expected = self.config.api_key
        if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
            return "invalid x-api-key"
        return None

    def _retry_headers(self) -> dict[str, str]:
        f = self.config.faults
        headers: dict[str, str] = {}
        if f.retry_after is not None and f.retry_after_format == "ms":
            headers["retry-after-ms"] = f"{f.retry_after * 1000:g}"
        elif f.retry_after is not None and f.retry_after_format == "http-date":
            headers["retry-after"] = email.utils.formatdate(time.time() + f.retry_after, usegmt=True)
        elif f.retry_after is not None:
            headers["retry-after"] = f"{f.retry_after:g}"
        if f.should_retry is not None:
            headers["x-should-retry"] = "true" if f.should_retry else "false"
        return headers

    def _base_url(self, request: Request) -> str:
        if self.config.public_base_url:
            return self.config.public_base_url.rstrip("/")
        host = request.headers.get("host") or f"{self.config.host}:{self.config.port}"
        return f"{request.url.scheme}://{host}"

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return error_response(405, "invalid_request_error", f"Method {request.method} not allowed for {request.url.path}")
        return error_response(status, "not_found_error", f"Not found: {request.method} {request.url.path}")

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("emulator handler failed")
        return error_response(500, "api_error", "Internal server error")

    # --- the six operations ---------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        cap = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        upload = self.store.new_upload_path()
        with self.stats.create_in_flight():
            try:
                return await self._create(request, cap, declared, upload)
            except ClientDisconnect:
                return _Nothing()  # the client gave up mid-upload: nothing was created
            finally:
                upload.unlink(missing_ok=True)

    async def _create(self, request: Request, cap: int, declared: str | None, upload: Any) -> Response:
        """Stream the body to `upload` (never all in memory), validate and persist it, register the batch."""
        size = 0
        with open(upload, "wb") as f:
            # Drain (and drop) an oversized body instead of closing early: a client still
            # writing would see a broken pipe and retry instead of reading the 413.
            too_large = declared is not None and declared.isdigit() and int(declared) > cap
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    too_large = True
                if not too_large:
                    f.write(chunk)
        if too_large:
            self.stats.incr("creates_rejected")
            return error_response(
                413, "request_too_large", f"Request exceeds the maximum allowed number of bytes ({cap})."
            )
        batch_id = new_batch_id()
        directory = self.store.batch_dir(batch_id)
        directory.mkdir()
        try:
            count = await anyio.to_thread.run_sync(self._persist, upload, self.store.requests_path(batch_id))
        except EnvelopeError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            self.stats.incr("creates_rejected")
            return error_response(exc.status, exc.error_type, exc.message)
        limit = self.config.queue_limit_requests
        if limit is not None and self.store.queued_requests() + count > limit:
            shutil.rmtree(directory, ignore_errors=True)
            self.stats.fault("queue_full")
            return error_response(
                429, "rate_limit_error",
                f"Your workspace's processing queue is full: adding {count} requests would exceed its limit of "
                f"{limit} requests in batches not yet ended. Please try again later.",
                {"retry-after": f"{self.config.queue_retry_after:g}"},
            )
        now = self.clock.now()
        neighbours = self.config.faults.neighbour_batches
        for k in range(neighbours):  # another client's batches of the same size, stored before ours
            await anyio.to_thread.run_sync(self._add_neighbour, batch_id, k, now, count)
        batch = self.store.add(batch_id, now, count, now + self.config.latency, time.time())
        self.stats.incr("batches_created")
        self.stats.incr("requests_created", count)
        self.worker.wake()
        delay = self.faults.take_slow_create()
        if delay > 0:
            # The batch exists already; a client that gives up now and retries makes a duplicate.
            self.stats.fault("slow_create")
            await asyncio.sleep(delay)
        status = self.faults.take_create_error_after_store()
        if status is not None:
            # The batch exists, but the client is told the create failed: its outcome is unknown to it.
            self.stats.fault(f"create_{status}_after_store")
            return error_response(status, error_type_for(status), message_for(status), self._retry_headers())
        return ok(batch.to_api(self.clock.now(), self._base_url(request), self.config.faults.results_url_delay_seconds))

    def _add_neighbour(self, ours: str, k: int, now: float, count: int) -> None:
        """Store a batch of another client in the workspace: our requests under its own custom_ids."""
        bid = new_batch_id()
        self.store.batch_dir(bid).mkdir()
        with open(self.store.requests_path(ours), "rb") as src, open(self.store.requests_path(bid), "w") as dst:
            for i, line in enumerate(src):
                item = json.loads(line)
                item["custom_id"] = f"neighbour{k}-{i}"
                dst.write(json.dumps(item) + "\n")
        offset = self.config.faults.neighbour_offset_seconds
        created = now + offset
        # Created earlier (offset < 0): it has been propagating for that long already.
        self.store.add(bid, created, count, created + self.config.latency, time.time() + min(0.0, offset))
        self.stats.incr("neighbour_batches_created")

    def _persist(self, upload: Any, requests_path: Any) -> int:
        with self.stats.cpu("create_parse"):
            return persist_requests(upload, requests_path, self.config.max_requests_per_batch)

    async def list(self, request: Request) -> Response:
        q = request.query_params
        limit, problem = sync.page_limit(q.get("limit", "20"))
        if problem is not None:
            return error_response(400, "invalid_request_error", problem)
        after_id, before_id = q.get("after_id"), q.get("before_id")
        if after_id and before_id:
            return error_response(400, "invalid_request_error", "Use after_id or before_id, not both.")
        delay = self.config.faults.propagation_seconds
        page, has_more = self.store.page(limit, after_id or None, before_id or None,
                                         time.time() - delay if delay > 0 else None)
        now, base = self.clock.now(), self._base_url(request)
        data = [b.to_api(now, base, self.config.faults.results_url_delay_seconds) for b in page]
        return ok(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def _find(self, batch_id: str) -> Any:
        batch = self.store.get(batch_id)
        if batch is None:
            return None, error_response(404, "not_found_error", f"No message batch with id {batch_id!r}.")
        return batch, None

    def _young_404(self, batch: Any) -> Response | None:
        if self.faults.transient_not_found(batch.id, batch.created_real):
            self.stats.fault("not_found")
            return error_response(404, "not_found_error", f"No message batch with id {batch.id!r}.")
        return None

    async def retrieve(self, request: Request) -> Response:
        batch, missing = self._find(request.path_params["batch_id"])
        if missing:
            return missing
        young = self._young_404(batch)
        if young:
            return young
        return ok(batch.to_api(self.clock.now(), self._base_url(request), self.config.faults.results_url_delay_seconds))

    async def cancel(self, request: Request) -> Response:
        batch, missing = self._find(request.path_params["batch_id"])
        if missing:
            return missing
        try:
            self.store.cancel(batch, self.clock.now())
        except InvalidStateTransition as exc:
            return error_response(400, "invalid_request_error", str(exc))
        self.worker.wake()
        return ok(batch.to_api(self.clock.now(), self._base_url(request), self.config.faults.results_url_delay_seconds))

    async def delete(self, request: Request) -> Response:
        batch, missing = self._find(request.path_params["batch_id"])
        if missing:
            return missing
        try:
            self.store.delete(batch)
        except InvalidStateTransition as exc:
            return error_response(400, "invalid_request_error", str(exc))
        return ok({"id": batch.id, "type": "message_batch_deleted"})

    async def results(self, request: Request) -> Response:
        batch, missing = self._find(request.path_params["batch_id"])
        if missing:
            return missing
        young = self._young_404(batch)
        if young:
            return young
        if batch.processing_status != "ended":
            return error_response(
                400,
                "invalid_request_error",
                f"Batch {batch.id} has processing_status {batch.processing_status!r}; "
                "results are available once it is 'ended'.",
            )
        now = self.clock.now()
        if batch.is_archived(now):
            return error_response(
                404,
                "not_found_error",
                f"The results of batch {batch.id} were archived at {rfc3339(batch.archive_at)}; "
                "results are kept for 29 days after created_at.",
            )
        cut = self.faults.take_results_cut()
        return ResultsResponse(self.store.results_path(batch.id), self.config.results_chunk_bytes, cut, self.stats)

    # --- Models API and synchronous Messages (sync.py) ---------------------------------------

    async def models_list(self, request: Request) -> Response:
        q = request.query_params
        lifecycle = q.getlist("lifecycle[]") + q.getlist("lifecycle")
        await self._models_latency()
        return self._answer(*sync.list_models(q, lifecycle))

    async def models_retrieve(self, request: Request) -> Response:
        await self._models_latency()
        return self._answer(*sync.retrieve_model(request.path_params["model_id"]))

    async def _models_latency(self) -> None:
        if self.config.models_latency > 0:
            await asyncio.sleep(self.config.models_latency)

    async def messages_create(self, request: Request) -> Response:
        body = await request.body()
        if self.config.messages_latency > 0:
            await asyncio.sleep(self.config.messages_latency)
        status, answer = await anyio.to_thread.run_sync(
            sync.create_message, body, self.worker.responder, self.worker.cache, self.config.cache_min_tokens
        )
        self.stats.incr("messages_answered" if status == 200 else "messages_refused")
        return self._answer(status, answer)

    def _answer(self, status: int, body: dict[str, Any]) -> Response:
        if status != 200:
            return error_response(status, body["error"]["type"], body["error"]["message"])
        return ok(body)

    async def count_tokens(self, request: Request) -> Response:
        """`POST /v1/messages/count_tokens`: the input tokens of a request, counted as its batch would be."""
        try:
            params = await request.json()
        except ValueError:
            return error_response(400, "invalid_request_error", "body: Input should be valid JSON")
        problem = check_count_params(params)
        if problem is not None:
            return error_response(*problem)
        self.stats.incr("tokens_counted")
        return ok({"input_tokens": usage.input_tokens(params)})

    # --- admin -------------------------------------------------------------------------------

    async def admin_stats(self, request: Request) -> Response:
        return JSONResponse({**self.stats.snapshot(), "batches": self.store.count(), "tokenizer": tokens.describe()})

    async def admin_reset(self, request: Request) -> Response:
        self.stats.reset()
        return JSONResponse(self.stats.snapshot())

    async def admin_get_config(self, request: Request) -> Response:
        return JSONResponse({**config_as_dict(self.config), "tokenizer": tokens.describe()})

    async def admin_set_config(self, request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ConfigError("body must be a JSON object like {\"faults\": {\"http_errors\": [529]}}")
            update_config(self.config, changes)
        except (ConfigError, ValueError, TypeError) as exc:
            return error_response(400, "invalid_request_error", str(exc))
        if "latency" in changes:
            self.store.reschedule(self.config.latency)
        self.worker.wake()
        return JSONResponse(config_as_dict(self.config))
