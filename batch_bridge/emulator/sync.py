"""The two synchronous APIs beside the batches: the Models API and the Messages API.

Both are plain functions of their input that return (HTTP status, JSON body), so the server's
handlers stay thin and the answers are the ones the batch side gives: `POST /v1/messages` runs the
same validation (`validate.params_error`), the same responder, the same token and prompt-cache
accounting and the same output limits as a request inside a batch, and differs only where the real
API does: problems are HTTP errors at once (404 for an unknown or retired model, 400 otherwise),
and usage says `service_tier: standard`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import ids, models
from .responder import Responder, ResponderError, finish_message
from .usage import PromptCache, too_long
from .validate import params_error

LIFECYCLES = ("active", "deprecated", "retired")
# Error types a responder may raise, as the HTTP status the synchronous API would answer with.
_STATUS_OF = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "request_too_large": 413, "rate_limit_error": 429, "api_error": 500, "timeout_error": 504,
    "overloaded_error": 529,
}


def _error(status: int, error_type: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "error", "error": {"type": error_type, "message": message}}


def page_limit(raw: str) -> tuple[int, str | None]:
    """A list endpoint's `limit` (1-1000, default 20), or the API's message for a bad one."""
    try:
        limit = int(raw)
    except ValueError:
        return 0, f"limit: Input should be a valid integer, got {raw!r}"
    if not 1 <= limit <= 1000:
        return 0, f"limit: must be between 1 and 1000, got {limit}"
    return limit, None


def list_models(query: Mapping[str, Any], lifecycle: list[str]) -> tuple[int, dict[str, Any]]:
    """`GET /v1/models`: active and deprecated models (retired only when asked), newest first, paged."""
    limit, problem = page_limit(query.get("limit", "20"))
    if problem is not None:
        return _error(400, "invalid_request_error", problem)
    bad = [x for x in lifecycle if x not in LIFECYCLES]
    if bad:
        return _error(400, "invalid_request_error", f"lifecycle: {bad[0]!r} is not one of {', '.join(LIFECYCLES)}")
    data = models.catalog(tuple(lifecycle) or ("active", "deprecated"))
    after, before = query.get("after_id"), query.get("before_id")
    ids_ = [m["id"] for m in data]
    if after and before:
        return _error(400, "invalid_request_error", "Use after_id or before_id, not both.")
    if after:
        start = ids_.index(after) + 1 if after in ids_ else len(ids_)
        page = data[start : start + limit]
        has_more = start + limit < len(data)
    elif before:
        end = ids_.index(before) if before in ids_ else 0
        page = data[max(0, end - limit) : end]
        has_more = end - limit > 0
    else:
        page, has_more = data[:limit], len(data) > limit
    return 200, {
        "data": page, "has_more": has_more,
        "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
    }


def retrieve_model(model_id: str) -> tuple[int, dict[str, Any]]:
    """`GET /v1/models/{model_id}`: any alias or dated id of a known model, retired ones included."""
    info = models.model_info(model_id)
    if info is None:
        return _error(404, "not_found_error", f"model: {model_id}")
    return 200, info


def create_message(
    body: bytes, responder: Responder, cache: PromptCache, cache_min_tokens: int | None
) -> tuple[int, dict[str, Any]]:
    """`POST /v1/messages`: one answer, as the same request inside a batch would get it."""
    try:
        params = json.loads(body)
    except ValueError as exc:
        return _error(400, "invalid_request_error", f"The request body is not valid JSON: {exc}")
    if not isinstance(params, dict):
        return _error(400, "invalid_request_error", "The request body must be a JSON object")
    if params.get("stream") not in (None, False):
        return _error(400, "invalid_request_error", "stream: the emulator answers only non-streaming requests")
    problem = params_error(params, batch=False)
    if problem is not None:
        error_type, message = problem
        return _error(_STATUS_OF.get(error_type, 400), error_type, message)
    info = models.lookup(params["model"])
    long = too_long(params, len(body), info.max_input_tokens) if info else None
    if long is not None:
        return _error(400, "invalid_request_error", long)
    message_id = ids.stable_id("msg", body)
    try:
        answer = responder(params, message_id)
    except ResponderError as exc:
        return _error(_STATUS_OF.get(exc.error_type, 500), exc.error_type, exc.message)
    except Exception as exc:  # a plug-in bug is an api_error, as inside a batch
        return _error(500, "api_error", f"responder raised {type(exc).__name__}: {exc}")
    if answer.get("type") == "error":
        err = answer.get("error") or {}
        error_type = err.get("type", "api_error")
        return _error(_STATUS_OF.get(error_type, 500), error_type, err.get("message", ""))
    min_tokens = cache_min_tokens if cache_min_tokens is not None else (info.cache_min_tokens if info else 1024)
    message = finish_message(answer, params, cache.account(params, min_tokens), message_id)
    message["usage"] = {**message["usage"], "service_tier": "standard"}
    try:
        json.dumps(message)
    except (TypeError, ValueError) as exc:
        return _error(500, "api_error", f"responder answer is not JSON: {exc}")
    return 200, message
