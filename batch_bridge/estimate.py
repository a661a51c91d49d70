"""What a submission will cost, before it is sent.

Input tokens are counted offline from the text the model reads, not the JSON envelope: characters / 4
for each text (Claude's tokenizer gives about 3.5-4.5 characters per token on English prose), plus a
small framing cost per message, and the compact JSON of an output schema or tool (which the API turns
into instructions) / 4 plus a fixed overhead. Once a job has answers, that guess is scaled by the
job's observed ratio of billed input tokens to estimated ones. Output tokens are the job's observed mean once
history exists; before that, a size derived from the output schema (or half of `max_tokens` for free
text), never above `max_tokens`. The upper bound always assumes `max_tokens`. A shared prefix marked
for caching is priced as one cache write per batch and reads for the rest, when it is long enough
for the model to cache at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

from .export import JobPlan
from .jobs import Job
from .pricing import PriceBook

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4
REQUEST_OVERHEAD_TOKENS = 3
SCHEMA_OVERHEAD_TOKENS = 20
TOOL_OVERHEAD_TOKENS = 10
# A typical answer, in characters: a free string is a short sentence, a string in a list a short
# phrase, a list has two items. Only a first guess: after the first answers, observed sizes are used.
STRING_CHARS = 40
ITEM_STRING_CHARS = 12
TYPICAL_ITEMS = 2
RECENT_ANSWERS = 20000  # how many of the job's latest answers calibrate its estimates


@dataclass
class Estimate:
    requests: int
    input_tokens: int  # uncached input
    cache_write_tokens: int
    cache_read_tokens: int
    output_tokens: int
    output_tokens_max: int
    batch_usd: float | None  # expected cost at batch prices (None: unknown model)
    batch_usd_max: float | None  # if every answer used max_tokens
    sync_usd: float | None  # the same work through synchronous calls, without caching
    method: str  # how the numbers were obtained, for people reading `plan`
    cache_prefix_tokens: int = 0  # the prefix marked for caching (0: none is marked)
    cache_min_tokens: int | None = None  # the shortest prefix the model caches (None: model not priced)
    sync_lane_usd: float | None = None  # the sync lane: standard prices, the prefix cached once then read
    lane: str = "batch"  # the lane the requests take (lanes.route)

    @property
    def lane_usd(self) -> float | None:
        """Expected cost in the lane the requests take: what budgets are held to."""
        return self.sync_lane_usd if self.lane == "sync" else self.batch_usd

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lane_usd": self.lane_usd}



def tokens(nchars: float) -> int:
    return int(math.ceil(nchars / CHARS_PER_TOKEN))


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def prefix_tokens(job: Job) -> int:
    """Tokens of what every request of the job shares: tools or schema, system prompt, few-shot turns."""
    n = REQUEST_OVERHEAD_TOKENS
    if job.output_schema is not None:
        n += tokens(len(_compact(job.output_schema))) + SCHEMA_OVERHEAD_TOKENS
    if job.output_tool is not None:
        n += tokens(len(_compact(job.output_tool))) + TOOL_OVERHEAD_TOKENS
    if job.system:
        n += tokens(len(job.system))
    for user, assistant in job.few_shot:
        n += tokens(len(user)) + tokens(len(assistant)) + 2 * MESSAGE_OVERHEAD_TOKENS
    return n


def _answer_chars(schema: dict[str, Any], in_array: bool = False) -> float:
    """Typical length, in characters of compact JSON, of an answer that fits `schema`."""
    if "enum" in schema:
        vals = [json.dumps(v) for v in schema["enum"]]
        return sum(len(v) for v in vals) / len(vals)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    if t == "object":
        props = schema.get("properties", {})
        return 2 + max(0, len(props) - 1) + sum(len(k) + 3 + _answer_chars(v) for k, v in props.items())
    if t == "array":
        n = max(schema.get("minItems", 0), min(schema.get("maxItems", TYPICAL_ITEMS), TYPICAL_ITEMS))
        return 2 + n * (_answer_chars(schema.get("items", {"type": "string"}), in_array=True) + 1)
    if t == "string":
        typical = ITEM_STRING_CHARS if in_array else STRING_CHARS
        return 2 + min(schema.get("maxLength", typical), typical)
    if t == "boolean":
        return 5
    return 3


def _schema_tokens(schema: dict[str, Any]) -> float:
    return _answer_chars(schema) / CHARS_PER_TOKEN + 1


@dataclass(frozen=True)
class Calibration:
    """What the job's latest answers say of its sizes: billed input tokens per estimated one, mean output."""

    seen: int  # answers looked at
    scale: float  # billed input tokens / estimated ones (1.0 without history)
    output_mean: float | None


def fixed_tokens(job: Job) -> int:
    """Input tokens every request of the job has besides its prompt text: the shared prefix and framing."""
    return prefix_tokens(job) + MESSAGE_OVERHEAD_TOKENS


def calibration(con: duckdb.DuckDBPyConnection, job: Job) -> Calibration:
    """Calibrate on the job's most recent answers only: enough to learn its sizes, and a plan over
    millions of answered rows stays fast. They are looked for in the latest collected batches that
    hold that many answers, not sorted out of the whole history."""
    hist = con.execute(
        """
        WITH latest AS (
            SELECT batch_id, sum(coalesce(succeeded, result_lines, 0)) OVER (
                       ORDER BY collected_at DESC, batch_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
            FROM bb_state.batches WHERE job = $job AND local_state = 'collected'
        ),
        recent AS (
            SELECT request_custom_id, input_hash, attempt, input_tokens, cache_creation_input_tokens,
                   cache_read_input_tokens, output_tokens
            FROM bb_state.responses
            WHERE job = $job AND status IN ('succeeded', 'parse_failed')
              AND batch_id IN (SELECT batch_id FROM latest WHERE coalesce(before, 0) < $recent)
            ORDER BY collected_at DESC LIMIT $recent
        )
        SELECT count(*), sum(r.input_tokens + coalesce(r.cache_creation_input_tokens, 0)
                             + coalesce(r.cache_read_input_tokens, 0)),
               sum(s.prompt_chars), avg(r.output_tokens)
        FROM recent r
        JOIN bb_state.sent_requests s ON s.job = $job AND s.request_custom_id = r.request_custom_id
             AND s.input_hash = r.input_hash AND s.attempt = r.attempt
        """,
        {"job": job.name, "recent": RECENT_ANSWERS},
    ).fetchone()
    seen, hist_tokens, hist_chars, hist_out = hist
    scale = 1.0
    if seen and hist_tokens and hist_chars is not None:
        guessed = tokens(hist_chars) + fixed_tokens(job) * seen
        if guessed:
            scale = hist_tokens / guessed
    return Calibration(int(seen or 0), scale, float(hist_out) if seen and hist_out is not None else None)


def input_tokens_sql(job: Job, scale: float, chars: str) -> str:
    """SQL of one request's input tokens by the same rule as `estimate_job`, from the SQL `chars` of
    its prompt: for checking rows against the context window set-wise."""
    return f"((ceil({chars} / {CHARS_PER_TOKEN!r}) + {fixed_tokens(job)}) * {scale!r})"


def estimate_job(con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, book: PriceBook) -> Estimate:
    n = plan.send_requests
    price = book.lookup(job.model)
    cal = calibration(con, job)
    seen, scale = cal.seen, cal.scale
    shared = prefix_tokens(job)
    fixed = fixed_tokens(job)  # the shared prefix and the row's own user message framing
    per_row_estimate = tokens(plan.prompt_chars) + fixed * n
    method = "input: characters / 4 of every text, plus framing and schema"
    if scale != 1.0:
        method += f", scaled x{scale:.2f} by {seen:,} earlier answers"
    total_input = int(per_row_estimate * scale)
    # The cacheable prefix: system prompt and few-shot turns (the schema and tools are in it too).
    cached_prefix = int(shared * scale) if job.cache_ttl != "none" and (job.system or job.few_shot) else 0
    cache_write = cache_read = 0
    if price and cached_prefix >= price.min_cache_tokens and n:
        batches = max(1, len(plan.chunks))
        cache_write = cached_prefix * min(batches, n)
        cache_read = cached_prefix * (n - min(batches, n))
        method += f"; shared prefix of ~{cached_prefix:,} tokens cached ({job.cache_ttl})"
    uncached = max(0, total_input - cache_write - cache_read)
    if cal.output_mean is not None:
        out_each = min(cal.output_mean, job.max_tokens)
        method += f"; output: mean of {seen:,} earlier answers"
    elif job.answer_schema is not None:
        out_each = min(_schema_tokens(job.answer_schema), job.max_tokens)
        method += "; output: typical size of the schema"
    else:
        out_each = job.max_tokens / 2
        method += "; output: half of max_tokens"
    out_total = int(out_each * n)
    out_max = job.max_tokens * n

    def cost(out: int, batch: bool, cached: bool) -> float | None:
        if cached:
            w5 = cache_write if job.cache_ttl == "5m" else 0
            w1 = cache_write if job.cache_ttl == "1h" else 0
            return book.cost(job.model, input_tokens=uncached, output_tokens=out, cache_5m=w5, cache_1h=w1,
                             cache_read=cache_read, batch=batch)
        return book.cost(job.model, input_tokens=total_input, output_tokens=out, batch=batch)

    if price is None:
        method += f"; model {job.model!r} has no price: cost unknown"
    return Estimate(
        requests=n,
        input_tokens=uncached,
        cache_write_tokens=cache_write,
        cache_read_tokens=cache_read,
        output_tokens=out_total,
        output_tokens_max=out_max,
        batch_usd=cost(out_total, True, True),
        batch_usd_max=cost(out_max, True, True),
        sync_usd=book.cost(job.model, input_tokens=total_input, output_tokens=out_total, batch=False) if price else None,
        method=method,
        cache_prefix_tokens=cached_prefix,
        cache_min_tokens=price.min_cache_tokens if price else None,
        sync_lane_usd=_sync_lane_cost(book, job, total_input, out_total, cached_prefix if cache_write else 0, n),
        lane=plan.lane,
    )


def _sync_lane_cost(book: PriceBook, job: Job, total_input: int, out_total: int, prefix: int, n: int) -> float | None:
    """Standard prices; a cacheable prefix is written by the first call and read by the others."""
    if not n:
        return 0.0 if book.lookup(job.model) else None
    write, read = (prefix, prefix * (n - 1)) if prefix else (0, 0)
    return book.cost(job.model, input_tokens=max(0, total_input - write - read), output_tokens=out_total,
                     cache_5m=write if job.cache_ttl == "5m" else 0, cache_1h=write if job.cache_ttl == "1h" else 0,
                     cache_read=read, batch=False)
