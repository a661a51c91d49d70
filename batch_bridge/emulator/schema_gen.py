"""JSON Schema -> a deterministic value that validates against it.

A schema is compiled once into a tree of small generator closures (a "plan") and cached by
its canonical JSON, so 100,000 requests sharing one schema pay for compilation once. Each
value depends only on the prompt (`Context`), so the same request always gets the same
answer. Enums pick a sentiment-looking value from keywords in the text when they can, so
demo output looks plausible; otherwise they pick by hash.

Supported: type (and type lists), properties/required, items, minItems/maxItems,
uniqueItems, enum, const, minimum/maximum (+exclusive), multipleOf, minLength/maxLength,
common string formats, anyOf/oneOf/allOf, local $ref ($defs/definitions). Not supported:
`pattern` (ignored), if/then/else, patternProperties.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .jsonl import dumps_sorted

Gen = Callable[["Context"], Any]

_POSITIVE_WORDS = frozenset(
    "great love loved loves excellent amazing good wonderful fantastic happy best perfect awesome recommend "
    "delighted pleased enjoy enjoyed nice superb outstanding brilliant glad favorite helpful fast".split()
)
_NEGATIVE_WORDS = frozenset(
    "bad terrible awful hate hated worst poor horrible disappointed disappointing broken refund angry slow "
    "useless waste rude late damaged never worse annoying unhappy problem fail failed".split()
)
_POSITIVE_LABELS = frozenset("positive pos good happy great yes satisfied favorable praise high excellent".split())
_NEGATIVE_LABELS = frozenset("negative neg bad unhappy no unsatisfied dissatisfied complaint low poor angry".split())
_NEUTRAL_LABELS = frozenset("neutral mixed none other unknown medium moderate".split())
_SENTENCE_NAMES = ("summary", "reason", "explanation", "rationale", "description", "comment", "justification", "text")
TYPICAL_MAX_ITEMS = 6  # the longest list an array without maxItems gets
_SCORE_NAMES = ("score", "rating", "stars", "sentiment", "satisfaction")
# Punctuation and digits become spaces, then str.split: 3x faster than a regex over 2 KB.
_NON_WORD_CHARS = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~0123456789\t\r\n"
_NON_WORD = str.maketrans({c: " " for c in _NON_WORD_CHARS})
# The same mapping as a byte table: ASCII text (the usual prompt) is translated as bytes, ~5x faster.
_NON_WORD_BYTES = bytes(32 if chr(b) in _NON_WORD_CHARS else b for b in range(256))
_STOPWORDS = frozenset(
    "the a an and or but of to in on at for with is are was were be been it this that as by from i you we they "
    "he she my our your their its not have has had do does did so if then than there here very just".split()
)


@dataclass(slots=True)
class Context:
    """What a generated value may depend on: the prompt text and things derived from it."""

    text: str
    seed: int
    polarity: int  # >0 positive keywords dominate, <0 negative, 0 neither
    counts: Counter[str]  # word -> occurrences, in order of first occurrence
    ranked: list[str] | None = None  # topic candidates, most frequent first (computed on first use)


def _words(text: str) -> list[str]:
    low = text.lower()
    if low.isascii():
        return low.encode("ascii").translate(_NON_WORD_BYTES).decode("ascii").split()
    return low.translate(_NON_WORD).split()


def make_context(text: str) -> Context:
    counts = Counter(_words(text))  # counted in C: this runs once per request
    pos = sum(counts[w] for w in _POSITIVE_WORDS.intersection(counts))
    neg = sum(counts[w] for w in _NEGATIVE_WORDS.intersection(counts))
    return Context(text=text, seed=zlib.crc32(text.encode()), polarity=(pos > neg) - (neg > pos), counts=counts)


def topic_words(ctx: Context, n: int = 3) -> list[str]:
    """The n most frequent non-stopwords of the text (ties: first occurrence), for summaries."""
    if ctx.ranked is None:
        # A stable sort in C: the same order as heapq.nlargest (which documents itself as this
        # sort), computed once per request although a schema may ask for topics many times.
        counts = ctx.counts
        candidates = [w for w in counts if len(w) > 2 and w not in _STOPWORDS]
        ctx.ranked = sorted(candidates, key=counts.__getitem__, reverse=True)
    return ctx.ranked[:n]


def sentence(ctx: Context) -> str:
    topics = topic_words(ctx)
    mood = {1: "positive", -1: "negative", 0: "neutral"}[ctx.polarity]
    if not topics:
        return f"A short {mood} text."
    return f"A {mood} text about {', '.join(topics)}."


_FILLER = (
    "the writer explains this in some detail", "with a few concrete examples", "and compares it with earlier experience",
    "although some points stay vague", "which matters for most readers", "over several weeks of use",
    "as the text makes clear", "while noting one or two reservations", "in plain and direct words",
    "and ends with a recommendation", "compared to similar products", "after trying it more than once",
)


def length_draw(ctx: Context, salt: int) -> float:
    """A number in [0, 1) for this prompt and salt; squared by callers so that short answers are common
    and long ones rare, as real answer lengths are skewed."""
    return _pick(ctx, salt, 1000) / 1000


def summary(ctx: Context, salt: int, max_words: int = 60) -> str:
    """A free-text summary of the prompt whose length varies from a few words to `max_words` + 4."""
    words = 4 + int(max_words * length_draw(ctx, salt) ** 2)
    head = sentence(ctx)
    parts = [head.rstrip(".")]
    n = len(head.split())
    k = _pick(ctx, salt ^ 0x51, len(_FILLER))
    topics = topic_words(ctx, 8)
    while n < words:
        phrase = _FILLER[k % len(_FILLER)]
        if topics and k % 3 == 0:
            phrase += f", especially {topics[k % len(topics)]}"
        parts.append(phrase)
        n += len(phrase.split())
        k += 1
    text = ", ".join(parts)
    return " ".join(text.split()[:max(words, 3)]).rstrip(",") + "."


def _pick(ctx: Context, salt: int, n: int) -> int:
    return ((ctx.seed ^ salt) * 2654435761 & 0xFFFFFFFF) % n


def _label_kind(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    tokens = set(re.split(r"[^a-z]+", value.lower()))
    if tokens & _NEGATIVE_LABELS:
        return -1
    if tokens & _POSITIVE_LABELS:
        return 1
    if tokens & _NEUTRAL_LABELS:
        return 0
    return None


def _enum(values: list[Any], salt: int) -> Gen:
    kinds = [_label_kind(v) for v in values]
    sentiment_like = any(k is not None and k != 0 for k in kinds)

    def gen(ctx: Context) -> Any:
        if sentiment_like:
            for v, k in zip(values, kinds):
                if k == ctx.polarity:
                    return v
        return values[_pick(ctx, salt, len(values))]

    return gen


def _number(schema: dict[str, Any], name: str, salt: int, integer: bool) -> Gen:
    lo = schema.get("minimum")
    hi = schema.get("maximum")
    step = 1 if integer else 0.01
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        lo = schema["exclusiveMinimum"] + step
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        hi = schema["exclusiveMaximum"] - step
    if lo is None and hi is None:
        lo, hi = (1, 5) if any(s in name for s in _SCORE_NAMES) else (0, 100)
    elif lo is None:
        lo = hi - 100
    elif hi is None:
        hi = lo + 100
    multiple = schema.get("multipleOf")
    scored = any(s in name for s in _SCORE_NAMES)

    def gen(ctx: Context) -> Any:
        if scored and ctx.polarity:
            raw = hi if ctx.polarity > 0 else lo
        else:
            raw = lo + (hi - lo) * (_pick(ctx, salt, 1000) / 999)
        if multiple:
            raw = math.ceil(lo / multiple) * multiple + math.floor((raw - lo) / multiple) * multiple
            if raw > hi:
                raw = math.ceil(lo / multiple) * multiple
        if integer:
            value = int(round(raw))
            return min(max(value, int(-(-lo // 1))), int(hi // 1))
        return min(max(round(raw, 2), lo), hi)

    return gen


_FORMATS: dict[str, str] = {
    "date": "2024-01-15",
    "date-time": "2024-01-15T12:00:00Z",
    "time": "12:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


def _string(schema: dict[str, Any], name: str, salt: int) -> Gen:
    fmt = _FORMATS.get(str(schema.get("format")))
    min_len = int(schema.get("minLength", 0))
    max_len = schema.get("maxLength")
    wants_sentence = any(s in name.lower() for s in _SENTENCE_NAMES)

    def fit(s: str) -> str:
        if len(s) < min_len:
            s = s + "x" * (min_len - len(s))
        if max_len is not None:
            s = s[: int(max_len)]
        return s

    def gen(ctx: Context) -> str:
        if fmt is not None:
            return fit(fmt)
        if wants_sentence:
            return fit(summary(ctx, salt))
        topics = topic_words(ctx, 5)
        if topics:
            return fit(topics[_pick(ctx, salt, len(topics))])
        return fit(name or "value")

    return gen


def _array(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int, salt: int) -> Gen:
    lo = int(schema.get("minItems", 0))
    hi = schema.get("maxItems")
    # Lists vary in length like real answers: mostly a few items, sometimes none, now and then many.
    top = max(lo, TYPICAL_MAX_ITEMS if hi is None else min(TYPICAL_MAX_ITEMS, int(hi)))
    if depth > 6:
        top = lo  # recursive schemas: stop growing
    n = top
    items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
    resolved = _resolve(items, root)
    unique = bool(schema.get("uniqueItems"))
    enum = resolved.get("enum") if isinstance(resolved.get("enum"), list) else None
    item_gens = [_compile(items, root, name, depth + 1, salt + 7919 * (k + 1)) for k in range(n)]

    def count(ctx: Context) -> int:
        return lo + int((top - lo + 1) * length_draw(ctx, salt ^ 0xA11) ** 1.5) if top > lo else lo

    def gen(ctx: Context) -> list[Any]:
        m = count(ctx)
        if unique and enum:
            start = _pick(ctx, salt, len(enum))
            return [enum[(start + k) % len(enum)] for k in range(min(m, len(enum)))]
        values = [g(ctx) for g in item_gens[:m]]
        if unique:
            seen: list[Any] = []
            for k, v in enumerate(values):
                while v in seen and isinstance(v, (int, float)) and not isinstance(v, bool):
                    v = v + 1
                if v in seen and isinstance(v, str):
                    v = f"{v}-{k}"
                seen.append(v)
            values = seen
        return values

    return gen


def _object(schema: dict[str, Any], root: dict[str, Any], depth: int, salt: int) -> Gen:
    props = schema.get("properties") or {}
    required = [r for r in schema.get("required") or [] if r not in props]
    fields = [(k, _compile(v, root, k, depth + 1, salt ^ zlib.crc32(k.encode()))) for k, v in props.items()]
    # required names without a property schema still need a value
    fields += [(k, _compile({"type": "string"}, root, k, depth + 1, zlib.crc32(k.encode()))) for k in required]

    def gen(ctx: Context) -> dict[str, Any]:
        return {k: g(ctx) for k, g in fields}

    return gen


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    for _ in range(32):
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
        schema = node if isinstance(node, dict) else {}
        ref = schema.get("$ref")
    return schema


def _compile(schema: Any, root: dict[str, Any], name: str, depth: int, salt: int) -> Gen:
    if not isinstance(schema, dict):
        return lambda ctx: None if schema is False else "value"
    schema = _resolve(schema, root)
    if "const" in schema:
        const = schema["const"]
        return lambda ctx: const
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return _enum(schema["enum"], salt)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _compile((non_null or options)[0], root, name, depth, salt)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part, root) if isinstance(part, dict) else {}
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required":
                    merged["required"] = list(merged.get("required", [])) + list(v)
                else:
                    merged.setdefault(k, v)
        return _compile(merged, root, name, depth, salt)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        return _object(schema, root, depth, salt)
    if kind == "array":
        return _array(schema, root, name, depth, salt)
    if kind == "integer":
        return _number(schema, name.lower(), salt, integer=True)
    if kind == "number":
        return _number(schema, name.lower(), salt, integer=False)
    if kind == "boolean":
        positive = any(s in name.lower() for s in ("positive", "recommend", "satisf", "happy"))
        return lambda ctx: ctx.polarity > 0 if positive else bool(_pick(ctx, salt, 2))
    if kind == "null":
        return lambda ctx: None
    return _string(schema, name, salt)


class PlanCache:
    """Compiled plans keyed by the schema's canonical JSON (bounded, least recently used out)."""

    def __init__(self, size: int = 512) -> None:
        self._plans: OrderedDict[str, Gen] = OrderedDict()
        self._size = size

    def plan(self, schema: dict[str, Any]) -> Gen:
        key = dumps_sorted(schema)
        plan = self._plans.get(key)
        if plan is None:
            plan = _compile(schema, schema, "", 0, 0x5EED)
            self._plans[key] = plan
            if len(self._plans) > self._size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan


def generate(schema: dict[str, Any], text: str) -> Any:
    """One-off convenience: a value for `schema` derived from `text`."""
    return _compile(schema, schema, "", 0, 0x5EED)(make_context(text))
