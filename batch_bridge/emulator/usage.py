"""Token counts of a request, and prompt-cache accounting.

Tokens are counted by `tokens.counter()`: a real BPE tokenizer (the Claude tokenizer file), or, only
when that file is absent, characters / 4 (see tokens.py and docs/emulator.md). Segments: every tool
(its JSON, plus the tool-use system prompt once per request), a json_schema output format, system
blocks, and message blocks (the first block of a message carries its turn marker); the request adds
the primer of the answer. Images and PDFs cost fixed amounts.

Cache rule: the prompt is a sequence of segments in the API's order (tools, output schema,
system blocks, message blocks). A block carrying `cache_control` (or the last block, for
top-level `cache_control`) is a breakpoint whose prefix is everything up to and including it.
Breakpoints shorter than the model's minimum are ignored. Caching in batches is best-effort: a
prefix seen before in this emulator's lifetime is read from cache with probability `hit_rate`
(drawn per request from the fault seed), else written again; longer ones are written (per ttl, 5m
default); `input_tokens` is what is left.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from .jsonl import dumps_sorted as _compact
from .tokens import IMAGE_TOKENS, PDF_TOKENS, counter


def text_tokens(text: str) -> int:
    """Tokens of a text, by the emulator's tokenizer."""
    return counter().text(text)


def _without_cache_control(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "cache_control"}


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return text_tokens(block)
    kind = block.get("type")
    if kind == "text":
        return text_tokens(block.get("text", ""))
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text":
            return text_tokens(str(source.get("data", "")))
        return PDF_TOKENS
    if kind == "tool_use":
        return text_tokens(_compact(block.get("input", {})))
    if kind == "tool_result":
        content = block.get("content", "")
        inner = sum(_block_tokens(b) for b in content) if isinstance(content, list) else text_tokens(str(content))
        return inner
    if kind == "thinking":
        return text_tokens(block.get("thinking", ""))
    return text_tokens(_compact(_without_cache_control(block)))


def _ttl(obj: Any) -> str | None:
    if isinstance(obj, dict):
        cc = obj.get("cache_control")
        if isinstance(cc, dict):
            return "1h" if cc.get("ttl") == "1h" else "5m"
    return None


@dataclass(slots=True)
class Segment:
    tokens: int
    source: Any  # the block (or string) the tokens came from; hashed only when caching applies
    ttl: str | None


def prompt_segments(params: Mapping[str, Any]) -> list[Segment]:
    """The prompt as ordered, countable segments: tools, output schema, system, messages."""
    c = counter()
    segs: list[Segment] = []
    for k, tool in enumerate(params.get("tools") or ()):
        framing = c.tools(params.get("tool_choice")) if k == 0 else 0
        segs.append(Segment(text_tokens(_compact(_without_cache_control(tool))) + framing, tool, _ttl(tool)))
    fmt = (params.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        segs.append(Segment(text_tokens(_compact(fmt["schema"])) + c.schema(), fmt, None))
    system = params.get("system")
    if isinstance(system, str):
        segs.append(Segment(text_tokens(system), system, None))
    elif isinstance(system, list):
        segs.extend(Segment(_block_tokens(b), b, _ttl(b)) for b in system)
    for message in params.get("messages") or ():
        content = message.get("content", "")
        role = message.get("role", "")
        if isinstance(content, str):
            segs.append(Segment(text_tokens(content) + c.turn(role), (role, content), None))
        else:
            for j, block in enumerate(content):
                extra = c.turn(role) if j == 0 else 0
                segs.append(Segment(_block_tokens(block) + extra, (role, block), _ttl(block)))
    return segs


def input_tokens(params: Mapping[str, Any]) -> int:
    """All input tokens of a request, as `count_tokens` reports them (caching changes billing, not the count)."""
    return counter().request() + sum(s.tokens for s in prompt_segments(params))


def too_long(params: Mapping[str, Any], body_bytes: int, max_input_tokens: int) -> str | None:
    """The API's message for a prompt above the model's context window, or None.

    Counted only for bodies longer than the window in bytes: text is at most one token per
    character, so a shorter body can only exceed it with images or PDFs, which are not looked at."""
    if body_bytes <= max_input_tokens:
        return None
    total = input_tokens(params)
    return f"prompt is too long: {total} tokens > {max_input_tokens} maximum" if total > max_input_tokens else None


def _segment_key(source: Any) -> bytes:
    if isinstance(source, str):
        return source.encode()
    if isinstance(source, tuple):
        role, inner = source
        return role.encode() + b"\x00" + (inner.encode() if isinstance(inner, str) else _segment_key(inner))
    return _compact(_without_cache_control(source)).encode()


@dataclass(slots=True)
class InputUsage:
    input_tokens: int
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read: int = 0

    def as_usage(self, output_tokens: int) -> dict[str, Any]:
        """The Message `usage` object."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m + self.cache_creation_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_5m,
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
            "output_tokens": output_tokens,
            "service_tier": "batch",
        }


class PromptCache:
    """Prefix hashes seen during this emulator's lifetime (in memory; a restart starts cold)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def account(self, params: Mapping[str, Any], min_tokens: int, hit_rate: float = 1.0, draw: float = 0.0) -> InputUsage:
        """Split this prompt's input tokens into uncached / cache write / cache read.

        A cached prefix is read only when `draw` (this request's number in [0, 1)) is below `hit_rate`;
        otherwise it is written again, as a best-effort cache that missed does."""
        segs = prompt_segments(params)
        total = counter().request() + sum(s.tokens for s in segs)
        breakpoints = [i for i, s in enumerate(segs) if s.ttl is not None]
        top = _ttl(params)
        if top is not None and segs and (not breakpoints or breakpoints[-1] != len(segs) - 1):
            breakpoints.append(len(segs) - 1)
        if not breakpoints:
            return InputUsage(input_tokens=total)
        if sum(s.tokens for s in segs[: breakpoints[-1] + 1]) < min_tokens:
            # Even the longest prefix is below the minimum: nothing can be cached, so skip the
            # hashing (the common case of a short shared system prompt).
            return InputUsage(input_tokens=total)
        return self._cached(params, segs, breakpoints, top, total, min_tokens, draw < hit_rate)

    def _cached(
        self, params: Mapping[str, Any], segs: list[Segment], breakpoints: list[int], top: str | None, total: int,
        min_tokens: int, may_hit: bool,
    ) -> InputUsage:
        h = hashlib.blake2b(str(params.get("model", "")).encode(), digest_size=16)
        prefixes: list[tuple[int, bytes, str]] = []  # (prefix tokens, digest, ttl)
        running = 0
        wanted = iter(breakpoints)
        target = next(wanted)
        for i, seg in enumerate(segs):
            h.update(_segment_key(seg.source))
            h.update(b"\x01")
            running += seg.tokens
            if i == target:
                ttl = seg.ttl or top or "5m"
                if running >= min_tokens:
                    prefixes.append((running, h.copy().digest(), ttl))
                target = next(wanted, -1)
                if target < 0:
                    break
        if not prefixes:
            return InputUsage(input_tokens=total)

        usage = InputUsage(input_tokens=0)
        with self._lock:
            hit = max((k for k, p in enumerate(prefixes) if p[1] in self._seen), default=-1) if may_hit else -1
            done = prefixes[hit][0] if hit >= 0 else 0
            usage.cache_read = done
            for tokens, digest, ttl in prefixes[hit + 1 :]:
                if ttl == "1h":
                    usage.cache_creation_1h += tokens - done
                else:
                    usage.cache_creation_5m += tokens - done
                done = tokens
                self._seen.add(digest)
        usage.input_tokens = total - usage.cache_read - usage.cache_creation_5m - usage.cache_creation_1h
        return usage


class CacheNeeded(Exception):
    """A prompt whose usage depends on the prompt cache, met by a `NoPromptCache`."""


class NoPromptCache(PromptCache):
    """For a batch processed apart from the cache (in parallel with others): prompts no cache
    can apply to are counted as usual, and the first one it could apply to raises CacheNeeded."""

    def _cached(self, *args: Any) -> InputUsage:
        raise CacheNeeded()
