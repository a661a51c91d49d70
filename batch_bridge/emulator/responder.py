"""Who answers each request: the default deterministic responder, or a plug-in.

Plug-in signature (`--responder package.module:function`)::

    def respond(params: dict, custom_id: str) -> dict: ...

It gets the request's `params` exactly as submitted and returns either
* a Message-shaped dict: `content` is required; `id`, `model`, `stop_reason`,
  `stop_sequence` and `usage` are filled in by the emulator when missing (when
  `stop_reason` is missing the emulator also applies `max_tokens` and `stop_sequences`
  to the text blocks), or
* an error envelope `{"type": "error", "error": {"type": ..., "message": ...}}`, or it
  raises `ResponderError(error_type, message)`: the request ends `errored` with that error.
Any other exception makes the request `errored` with `api_error`.

The default responder is a pure function of `params`: a forced tool (`tool_choice`
`{"type":"tool"}`) gets a `tool_use` block whose input fits the tool's `input_schema`; a
`json_schema` output format gets JSON text that fits the schema; anything else gets one to six
summary-like sentences built from the prompt. Lengths vary from request to request (seeded by the
prompt), as real answers do: free-text fields from a few words to sixty, lists from none to six items.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from . import ids, usage
from .jsonl import dumps as _dumps
from .schema_gen import Context, PlanCache, length_draw, make_context, summary
from .tokens import counter

Responder = Callable[[Mapping[str, Any], str], dict[str, Any]]

_plans = PlanCache()


class ResponderError(Exception):
    """Raised by a responder to make one request `errored` with this error type and message."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def prompt_text(params: Mapping[str, Any]) -> str:
    """Text of the last user message (falls back to the system prompt)."""
    for message in reversed(params.get("messages") or ()):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        parts = [b.get("text", "") for b in content or () if isinstance(b, dict) and b.get("type") == "text"]
        if parts:
            return "\n".join(parts)
    system = params.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    return ""


def _reply_text(ctx: Context) -> str:
    """One to six sentences (seeded by the prompt): free-text answers vary in length like real ones."""
    words = ctx.text.split(maxsplit=12)
    head = " ".join(words[:12]) + ("..." if len(words) > 12 else "")
    sentences = [summary(ctx, 0x7E47 + k, 30) for k in range(1 + int(6 * length_draw(ctx, 0x5E7) ** 2))]
    return f"It has {sum(ctx.counts.values())} words and begins: \"{head}\" {' '.join(sentences)}"


def default_responder(params: Mapping[str, Any], custom_id: str) -> dict[str, Any]:
    """Deterministic answer: a function of `params` only (custom_id is not used)."""
    ctx = make_context(prompt_text(params))
    choice = params.get("tool_choice") or {}
    if choice.get("type") == "tool":
        tool = next(t for t in params.get("tools") or () if t.get("name") == choice.get("name"))
        value = _plans.plan(tool.get("input_schema") or {"type": "object"})(ctx)
        tool_id = ids.stable_id("toolu", tool["name"], ctx.text)
        return {"content": [{"type": "tool_use", "id": tool_id, "name": tool["name"], "input": value}]}
    fmt = (params.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        value = _plans.plan(fmt["schema"])(ctx)
        return {"content": [{"type": "text", "text": _dumps(value)}]}
    return {"content": [{"type": "text", "text": _reply_text(ctx)}]}


def load_responder(spec: str | Responder | None) -> Responder:
    """`None` -> default; a callable as is; `module:function` imported."""
    if spec is None:
        return default_responder
    if callable(spec):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--responder must look like 'package.module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"--responder {spec!r}: {attr!r} is not a callable in module {module_name!r}")
    return fn  # type: ignore[no-any-return]


def _apply_limits(content: list[dict[str, Any]], max_tokens: int, stops: list[str]) -> tuple[list, str, str | None, int]:
    """Cut content at the first stop sequence or at max_tokens; return (content, stop_reason, stop_sequence, tokens)."""
    out: list[dict[str, Any]] = []
    used = 0
    stop_reason = "end_turn"
    for block in content:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text", "")
            hit: tuple[int, str] | None = None
            for s in stops:
                k = text.find(s)
                if k >= 0 and (hit is None or k < hit[0]):
                    hit = (k, s)
            if hit is not None:
                text = text[: hit[0]]
            tokens = usage.text_tokens(text)
            if used + tokens > max_tokens:
                text = counter().cut(text, max_tokens - used)
                out.append({**block, "text": text})
                return out, "max_tokens", None, max_tokens
            out.append({**block, "text": text} if hit is not None else block)
            used += tokens
            if hit is not None:
                return out, "stop_sequence", hit[1], used
        elif kind == "tool_use":
            tokens = usage.text_tokens(_dumps(block.get("input", {}))) + usage.text_tokens(str(block.get("name", "")))
            if used + tokens > max_tokens:
                # A tool call that does not fit is not emitted at all (a cut call is useless).
                return out, "max_tokens", None, max_tokens
            out.append(block)
            used += tokens
            stop_reason = "tool_use"
        else:
            out.append(block)
            used += usage.text_tokens(_dumps(block))
    return out, stop_reason, None, min(used, max_tokens)


def finish_message(
    answer: Mapping[str, Any], params: Mapping[str, Any], input_usage: usage.InputUsage, message_id: str
) -> dict[str, Any]:
    """A complete Message from a responder answer: ids, limits, stop reason, usage."""
    content = list(answer.get("content") or [])
    if answer.get("stop_reason") is None:
        max_tokens = int(params["max_tokens"])
        content, stop_reason, stop_sequence, out_tokens = _apply_limits(
            content, max_tokens, list(params.get("stop_sequences") or ())
        )
    else:
        stop_reason = answer["stop_reason"]
        stop_sequence = answer.get("stop_sequence")
        # A responder's own usage stands: its text is not tokenized (17 MiB takes the tokenizer ~10 s).
        out_tokens = 0 if answer.get("usage") else sum(
            usage.text_tokens(b.get("text", "")) if b.get("type") == "text" else usage.text_tokens(_dumps(b))
            for b in content
        )
    return {
        "id": answer.get("id") or message_id,
        "type": "message",
        "role": "assistant",
        "model": answer.get("model") or params["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": answer.get("usage") or input_usage.as_usage(max(out_tokens, 1) if content else out_tokens),
    }
