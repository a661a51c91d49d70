"""Validation in the two places the real API does it.

* Envelope (synchronous, whole create rejected with 400): `check_item`, called by
  `intake.persist_requests` on each request while the uploaded body is parsed item by item,
  so a 256 MB body never becomes one Python object. Messages use the pydantic-style path
  the API uses: `requests.3.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'`.
* Params (asynchronous, per request): `params_error` returns the error type and message that
  make only that request `errored`: `not_found_error` for a model the API does not know (or has
  retired), `invalid_request_error` (from `check_params`) for anything else. `POST /v1/messages`
  answers the same problems at once, as 404 and 400.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from . import models

CUSTOM_ID_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"
_CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_ITEM_KEYS = {"custom_id", "params"}


class EnvelopeError(Exception):
    """The create call as a whole is invalid: HTTP `status` with `error_type` and a message."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


def check_item(i: int, item: Any, first_seen: dict[str, int]) -> None:
    """Raise EnvelopeError when request `i` of a create is invalid; records its custom_id in `first_seen`."""
    where = f"requests.{i}"
    if not isinstance(item, dict):
        raise EnvelopeError(f"{where}: Input should be a valid dictionary")
    for key in item:
        if key not in _ITEM_KEYS:
            raise EnvelopeError(f"{where}.{key}: Extra inputs are not permitted")
    if "custom_id" not in item:
        raise EnvelopeError(f"{where}.custom_id: Field required")
    cid = item["custom_id"]
    if not isinstance(cid, str):
        raise EnvelopeError(f"{where}.custom_id: Input should be a valid string")
    if len(cid) < 1:
        raise EnvelopeError(f"{where}.custom_id: String should have at least 1 character")
    if len(cid) > 64:
        raise EnvelopeError(f"{where}.custom_id: String should have at most 64 characters")
    if not _CUSTOM_ID_RE.fullmatch(cid):
        raise EnvelopeError(f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN}'")
    if cid in first_seen:
        raise EnvelopeError(
            f"{where}.custom_id: Duplicate custom_id {cid!r} (also used by requests.{first_seen[cid]}); "
            "custom_id must be unique within a batch"
        )
    first_seen[cid] = i
    if "params" not in item:
        raise EnvelopeError(f"{where}.params: Field required")
    params = item["params"]
    if not isinstance(params, dict):
        raise EnvelopeError(f"{where}.params: Input should be a valid dictionary")
    if params.get("stream") not in (None, False):
        raise EnvelopeError(
            f"{where}.params.stream: streaming is not supported in Message Batches "
            "(results come back as one file); remove `stream` or set it to false"
        )
    if "speed" in params:
        raise EnvelopeError(
            f"{where}.params.speed: Extra inputs are not permitted (fast mode does not apply to batch processing)"
        )
    max_tokens = params.get("max_tokens")
    if isinstance(max_tokens, (int, float)) and not isinstance(max_tokens, bool) and max_tokens < 1:
        raise EnvelopeError(f"{where}.params.max_tokens: Input should be greater than or equal to 1")


# --- per-request params (asynchronous in the real API) ------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_content(where: str, content: Any) -> str | None:
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{where}: Input should be a valid string or a list of content blocks"
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            return f"{where}.{j}: Input should be a valid dictionary"
        kind = block.get("type")
        if not isinstance(kind, str):
            return f"{where}.{j}.type: Field required"
        if kind == "text" and not isinstance(block.get("text"), str):
            return f"{where}.{j}.text: Field required"
        if kind in ("image", "document") and not isinstance(block.get("source"), dict):
            return f"{where}.{j}.source: Field required"
        if kind == "tool_use" and not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)):
            return f"{where}.{j}: tool_use blocks need `id` and `name`"
        if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
            return f"{where}.{j}.tool_use_id: Field required"
    return None


def params_error(params: Mapping[str, Any], *, batch: bool = True) -> tuple[str, str] | None:
    """(error type, message) of the error for these params, or None when they are valid."""
    model = params.get("model")
    if isinstance(model, str):
        info = models.lookup(model)
        if info is None or info.retired:
            return "not_found_error", f"model: {model}"
        if batch and not info.batch:
            return "invalid_request_error", f"model: {model} does not support the Message Batches API"
    problem = check_params(params)
    return ("invalid_request_error", problem) if problem is not None else None


def check_params(params: Mapping[str, Any]) -> str | None:
    """Message of the `invalid_request_error` for these params, or None when they are valid."""
    model = params.get("model")
    if model is None:
        return "model: Field required"
    if not isinstance(model, str):
        return "model: Input should be a valid string"
    info = models.lookup(model)
    if info is None:
        return f"model: {model} is not a known model (for example: claude-opus-4-5, claude-sonnet-4-5, claude-haiku-4-5)"
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if not _is_int(max_tokens):
        return "max_tokens: Input should be a valid integer"
    if max_tokens > info.max_output_tokens:
        return (
            f"max_tokens: {max_tokens} > {info.max_output_tokens}, which is the maximum allowed number "
            f"of output tokens for {model}"
        )
    messages = params.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in message:
            return f"messages.{i}.content: Field required"
        problem = _check_content(f"messages.{i}.content", message["content"])
        if problem:
            return problem
    system = params.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list) or any(
            not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str) for b in system
        ):
            return "system: Input should be a valid string or a list of text blocks"
    return _check_options(params, max_tokens)


def _check_options(params: Mapping[str, Any], max_tokens: int) -> str | None:
    tools = params.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                return f"tools.{i}: Input should be a valid dictionary"
            name = tool.get("name")
            if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
                return f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            if tool.get("type") in (None, "custom") and not isinstance(tool.get("input_schema"), dict):
                return f"tools.{i}.input_schema: Field required"
            names.add(name)
    choice = params.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice: Input should be an object with type 'auto', 'any', 'tool' or 'none'"
        if choice["type"] == "tool" and choice.get("name") not in names:
            return f"tool_choice.name: tool {choice.get('name')!r} is not one of the provided tools {sorted(names)}"
    output_config = params.get("output_config")
    if output_config is not None:
        if not isinstance(output_config, dict):
            return "output_config: Input should be a valid dictionary"
        fmt = output_config.get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                return "output_config.format.type: Input should be 'json_schema'"
            if not isinstance(fmt.get("schema"), dict):
                return "output_config.format.schema: Field required"
    thinking = params.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1024:
            return "thinking.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= max_tokens:
            return "max_tokens must be greater than thinking.budget_tokens"
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        value = params.get(name)
        if value is not None and (not _is_number(value) or not 0 <= value <= high):
            return f"{name}: Input should be a number between 0 and {high:g}"
    stops = params.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        return "stop_sequences: Input should be a list of non-empty strings"
    return None


# What `POST /v1/messages/count_tokens` takes: a Messages request without max_tokens and sampling.
COUNT_TOKENS_KEYS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control",
    "mcp_servers", "context_management", "speed",
})


def check_count_params(params: Any) -> tuple[int, str, str] | None:
    """(HTTP status, error type, message) of a count_tokens body the API refuses, or None when it is valid."""
    if not isinstance(params, dict):
        return 400, "invalid_request_error", "body: Input should be a valid dictionary"
    for key in params:
        if key not in COUNT_TOKENS_KEYS:
            return 400, "invalid_request_error", f"{key}: Extra inputs are not permitted"
    model = params.get("model")
    if isinstance(model, str) and models.lookup(model) is None:
        return 404, "not_found_error", f"model: {model}"
    info = models.lookup(model) if isinstance(model, str) else None
    # The same checks as a request, with the largest max_tokens the model allows (count_tokens takes none).
    problem = check_params({**params, "max_tokens": info.max_output_tokens if info else 1})
    return (400, "invalid_request_error", problem) if problem else None
