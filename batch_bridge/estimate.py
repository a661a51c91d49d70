"""What a submission will cost, before it is sent.

Input tokens come from the API's own token counting endpoint whenever a client is given (`Counting`):
the exact request lines a batch will carry are counted, all of them when there are at most
`count_sample`, else a sample stratified by prompt length, scaled up by a ratio estimator per stratum
with its standard error reported. The shared prefix (tools, schema, system, few-shot turns) is
counted once, with a one-character prompt. Counts are kept in `token_counts` by input hash and API,
so a second plan of the same rows counts nothing. When counting fails (no key, rate limit, network),
or `plan` runs offline, a rule stands in and is reported as such: characters / 4 of every text plus
framing, scaled by the job's observed ratio of billed input tokens to that rule once it has answers.

Output tokens are the job's observed mean once it has answers (with the standard error of the total);
before that, a size derived from the output schema (or half of `max_tokens` for free text), never above
`max_tokens`. The upper bound always assumes `max_tokens`. A shared prefix marked for caching, long
enough for the model to cache, is written once per batch and then read on a hit or written again on a
miss: caching in batches is best-effort, so the hit rate is the job's observed one, or before that
`Settings.cache_hit_rate` (the middle of the 30-98% the API documents); the upper bound assumes 30%.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import duckdb

from .errors import ApiError
from .export import JobPlan, Sample, sample_lines
from .jobs import Job
from .pricing import PriceBook

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4
REQUEST_OVERHEAD_TOKENS = 3
SCHEMA_OVERHEAD_TOKENS = 20
TOOL_OVERHEAD_TOKENS = 10
# A typical answer, in characters: a free string is a sentence of some fifteen words, a string in a list
# a phrase of two words, a list has three items. Only a first guess: after the first answers, observed
# sizes are used.
STRING_CHARS = 100
ITEM_STRING_CHARS = 15
TYPICAL_ITEMS = 3
RECENT_ANSWERS = 20000  # how many of the job's latest answers calibrate its estimates
CACHE_HIT_RATE_LOW = 0.30  # the low end of the hit rates the API documents for batches: the upper bound's


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
    # Per figure: the method that produced it and its relative standard error (None: a guess, not measured).
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. counting failed and the rule stood in
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


@dataclass
class Counting:
    """The token counting endpoint, passed in: `count(params)` returns the input tokens of a request's
    params (raising ApiError when it cannot), `endpoint` names the API whose counts these are."""

    count: Callable[[dict[str, Any]], int]
    endpoint: str
    sample: int = 100  # requests counted per job at most (the rest scaled from them)
    workers: int = 4


@dataclass
class InputCount:
    total: int  # input tokens of every request to send
    prefix: int  # tokens every request shares (tools, schema, system, few-shot), for the cache
    relative_error: float  # standard error of `total` / `total`; 0 when every request was counted
    sampled: int  # requests whose count was used
    counted_now: int  # of those, counted by this plan (the rest were kept from earlier plans)


def _prefix_params(job: Job) -> dict[str, Any]:
    """The job's request with a one-character prompt: what every request shares, plus one turn."""
    prefix, suffix = job.params_split()
    return json.loads(prefix + json.dumps(".") + suffix)


class Asking:
    """Token counts being asked for, in threads (the counting endpoint is an HTTP call per request), while
    the caller goes on with its DuckDB work; `gather` waits for them. Close it when done (it stops the
    threads; counts not gathered are dropped)."""

    def __init__(self, counting: Counting, todo: dict[int, dict[str, Any]]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=counting.workers) if todo else None
        self._futures = {k: self._pool.submit(counting.count, p) for k, p in todo.items()} if self._pool else {}

    def gather(self) -> tuple[dict[int, int], ApiError | None]:
        """Counts got (key -> tokens); on the first failure, the counts obtained so far and the error."""
        done: dict[int, int] = {}
        error: ApiError | None = None
        for k, f in self._futures.items():
            if f.cancelled():
                continue
            try:
                done[k] = f.result()
            except ApiError as e:
                if error is None:  # stop asking: a rate limit will not lift for the rest of this plan
                    error = e
                    self.close(wait=False)
        return done, error

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)


def _keep_counts(con: duckdb.DuckDBPyConnection, endpoint: str, counts: dict[int, int]) -> None:
    if not counts:
        return
    # Two lists unnested side by side (at most a sample's worth of counts): no Arrow, which would
    # import pyarrow (~26 MB of resident memory for the rest of the command) for a few hundred rows.
    con.execute(
        "INSERT OR REPLACE INTO bb_state.token_counts "
        "SELECT $endpoint, CAST(h AS UHUGEINT), n, now()::TIMESTAMP FROM (SELECT unnest($h) AS h, unnest($n) AS n)",
        {"endpoint": endpoint, "h": [str(h) for h in counts], "n": list(counts.values())},
    )


@dataclass
class StartedCount:
    """The sample of `bb_lines` whose tokens are being counted (`start_count`), for `count_input`."""

    sample: Sample
    prefix_key: int
    have: dict[int, int]  # counts known from earlier plans
    asking: Asking

    def close(self, wait: bool = True) -> None:
        self.asking.close(wait)


def start_count(con: duckdb.DuckDBPyConnection, job: Job, counting: Counting) -> StartedCount:
    """Pick the sample of the requests in `bb_lines` and start asking for the counts not known yet."""
    sample = sample_lines(con, job, counting.sample)
    (prefix_key,) = con.execute("SELECT md5_number('prefix:' || $s)", {"s": job.static_hash}).fetchone()
    keys = [h for _, h, _, _ in sample.lines] + [prefix_key]
    known = dict(con.execute(
        "SELECT CAST(input_hash AS VARCHAR), input_tokens FROM bb_state.token_counts "
        "WHERE endpoint = $endpoint AND CAST(input_hash AS VARCHAR) IN (SELECT unnest($keys))",
        {"endpoint": counting.endpoint, "keys": [str(k) for k in keys]},
    ).fetchall())
    have = {int(h): int(n) for h, n in known.items()}
    todo = {h: json.loads(line)["params"] for _, h, _, line in sample.lines if h not in have}
    if prefix_key not in have:
        todo[prefix_key] = _prefix_params(job)
    return StartedCount(sample, prefix_key, have, Asking(counting, todo))


def count_input(con: duckdb.DuckDBPyConnection, job: Job, counting: Counting,
                started: StartedCount | None = None) -> InputCount:
    """Input tokens of the requests in `bb_lines`, from the token counting endpoint (see the module doc),
    with the counts `started` earlier or asked for now. Raises ApiError when counting fails; the counts
    obtained before are kept for the next plan."""
    mine = started is None
    started = started or start_count(con, job, counting)
    try:
        got, error = started.asking.gather()
    finally:
        if mine:
            started.close()
    sample, prefix_key, have = started.sample, started.prefix_key, started.have
    _keep_counts(con, counting.endpoint, got)
    if error is not None:
        raise error
    have.update(got)
    prefix = have[prefix_key]
    total, variance = 0.0, 0.0
    by_stratum: dict[int, list[tuple[int, int]]] = {}
    for k, h, chars, _ in sample.lines:
        by_stratum.setdefault(k, []).append((have[h], chars))
    for k, (requests, chars_total) in sample.strata.items():
        rows = by_stratum.get(k, [])
        if len(rows) >= requests:  # every request of the stratum counted: exact
            total += sum(y for y, _ in rows)
            continue
        # Ratio estimator of the prompt's own tokens (count minus the shared prefix) to its characters.
        z = [y - prefix for y, _ in rows]
        x = [c for _, c in rows]
        ratio = sum(z) / max(sum(x), 1)
        total += requests * prefix + ratio * chars_total
        m = len(rows)
        if m > 1:
            s2 = sum((zi - ratio * xi) ** 2 for zi, xi in zip(z, x)) / (m - 1)
            variance += requests**2 * (1 - m / requests) * s2 / m
    return InputCount(
        total=int(round(total)), prefix=prefix, relative_error=math.sqrt(variance) / total if total else 0.0,
        sampled=len(sample.lines), counted_now=len(got),
    )


def _hit_rate(seen_read: float | None, seen_write: float | None, prior: float) -> tuple[float, dict[str, Any]]:
    """The share of cache lookups expected to hit: the job's observed one once its answers show caching."""
    if seen_read is not None and seen_write is not None and seen_read + seen_write > 0:
        rate = seen_read / (seen_read + seen_write)
        return rate, {"method": "observed", "value": round(rate, 4)}
    return prior, {"method": "expected", "value": prior, "range": [CACHE_HIT_RATE_LOW, 0.98]}


def _history(con: duckdb.DuckDBPyConnection, job: Job) -> tuple:
    """What the job's most recent answers say: (answers, billed input tokens, their prompts' characters,
    mean and standard deviation of output tokens, cache read and written tokens). Only the recent ones:
    enough to learn its sizes, and a plan over millions of answered rows stays fast. They are looked for
    in the latest collected batches that hold that many answers, not sorted out of the whole history."""
    return con.execute(
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
               sum(s.prompt_chars), avg(r.output_tokens), stddev_samp(r.output_tokens),
               sum(r.cache_read_input_tokens), sum(r.cache_creation_input_tokens)
        FROM recent r
        JOIN bb_state.sent_requests s ON s.job = $job AND s.request_custom_id = r.request_custom_id
             AND s.input_hash = r.input_hash AND s.attempt = r.attempt
        """,
        {"job": job.name, "recent": RECENT_ANSWERS},
    ).fetchone()


@dataclass(frozen=True)
class Calibration:
    """What the job's latest answers say of its sizes: billed input tokens per estimated one, mean output."""

    seen: int  # answers looked at
    scale: float  # billed input tokens / estimated ones by the rule (1.0 without history)
    output_mean: float | None


def fixed_tokens(job: Job) -> int:
    """Input tokens every request of the job has besides its prompt text: the shared prefix and framing."""
    return prefix_tokens(job) + MESSAGE_OVERHEAD_TOKENS


def _scale(job: Job, seen: int | None, hist_tokens: int | None, hist_chars: int | None) -> float:
    """Billed input tokens per token the rule estimates, over the job's recent answers."""
    if seen and hist_tokens and hist_chars is not None:
        guessed = tokens(hist_chars) + fixed_tokens(job) * seen
        if guessed:
            return hist_tokens / guessed
    return 1.0


def calibration(con: duckdb.DuckDBPyConnection, job: Job) -> Calibration:
    """The rule's calibration by the job's recent answers (for checks made row by row in SQL)."""
    seen, hist_tokens, hist_chars, hist_out, *_ = _history(con, job)
    return Calibration(int(seen or 0), _scale(job, seen, hist_tokens, hist_chars),
                       float(hist_out) if seen and hist_out is not None else None)


def input_tokens_sql(job: Job, scale: float, chars: str) -> str:
    """SQL of one request's input tokens by the rule `estimate_job` falls back on, from the SQL `chars` of
    its prompt: for checking rows against the context window set-wise."""
    return f"((ceil({chars} / {CHARS_PER_TOKEN!r}) + {fixed_tokens(job)}) * {scale!r})"


def estimate_job(
    con: duckdb.DuckDBPyConnection, job: Job, plan: JobPlan, book: PriceBook, counting: Counting | None = None,
    *, cache_hit_rate: float = 0.64, started: StartedCount | None = None,
) -> Estimate:
    """The job's cost estimate. `started`: its input tokens' counting, begun by `start_count`."""
    n = plan.send_requests
    price = book.lookup(job.model)
    hist = _history(con, job)
    seen, hist_tokens, hist_chars, hist_out, hist_out_sd, hist_read, hist_write = hist
    figures: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    counted: InputCount | None = None
    if counting is not None and counting.sample > 0 and n:
        try:
            counted = count_input(con, job, counting, started)
        except ApiError as e:
            warnings.append(f"token counting failed ({e}); input tokens are estimated by the rule (characters / 4)")
    caches = job.cache_ttl != "none" and bool(job.system or job.few_shot)
    if counted is not None:
        total_input = counted.total
        cached_prefix = counted.prefix if caches else 0
        exact = counted.relative_error == 0 and counted.sampled >= n
        figures["input_tokens"] = {
            "method": "count_tokens" if exact else "count_tokens_sample",
            "requests_counted": counted.sampled, "counted_now": counted.counted_now,
            "relative_error": round(counted.relative_error, 5),
        }
        method = (f"input: token counting endpoint, all {n:,} requests" if exact else
                  f"input: token counting endpoint on {counted.sampled:,} of {n:,} requests stratified by prompt "
                  f"length, +/-{counted.relative_error * 100:.1f}% (standard error)")
    else:
        shared = prefix_tokens(job)
        per_row_estimate = tokens(plan.prompt_chars) + fixed_tokens(job) * n  # with each row's message framing
        method = "input: characters / 4 of every text, plus framing and schema (a rule, not counted)"
        scale = _scale(job, seen, hist_tokens, hist_chars)
        if scale != 1.0:
            method += f", scaled x{scale:.2f} by {seen:,} earlier answers"
        total_input = int(per_row_estimate * scale)
        cached_prefix = int(shared * scale) if caches else 0
        figures["input_tokens"] = {"method": "rule_calibrated" if scale != 1.0 else "rule", "relative_error": None}
    hit_rate, figures["cache_hit_rate"] = _hit_rate(hist_read, hist_write, cache_hit_rate)
    cache_write = cache_read = 0
    cache_write_low = cache_read_low = 0  # at the low end of hit rates, for the upper bound
    if price and cached_prefix >= price.min_cache_tokens and n:
        batches = min(max(1, len(plan.chunks)), n)
        lookups = n - batches  # the first request of each batch writes the prefix
        cache_read = int(cached_prefix * lookups * hit_rate)
        cache_write = cached_prefix * batches + int(cached_prefix * lookups * (1 - hit_rate))
        low = min(hit_rate, CACHE_HIT_RATE_LOW)
        cache_read_low = int(cached_prefix * lookups * low)
        cache_write_low = cached_prefix * batches + int(cached_prefix * lookups * (1 - low))
        method += (f"; shared prefix of ~{cached_prefix:,} tokens cached ({job.cache_ttl}), "
                   f"{hit_rate:.0%} of lookups hit ({figures['cache_hit_rate']['method']})")
    if seen and hist_out is not None:
        out_each = min(float(hist_out), job.max_tokens)
        method += f"; output: mean of {seen:,} earlier answers"
        spread = float(hist_out_sd or 0.0) / float(hist_out) if hist_out else 0.0
        figures["output_tokens"] = {"method": "observed_mean", "answers": int(seen),
                                    "relative_error": round(spread * math.sqrt(1 / max(n, 1) + 1 / seen), 5)}
    elif job.answer_schema is not None:
        out_each = min(_schema_tokens(job.answer_schema), job.max_tokens)
        method += "; output: typical size of the schema"
        figures["output_tokens"] = {"method": "schema_typical", "relative_error": None}
    else:
        out_each = job.max_tokens / 2
        method += "; output: half of max_tokens"
        figures["output_tokens"] = {"method": "half_max_tokens", "relative_error": None}
    out_total = int(out_each * n)
    out_max = job.max_tokens * n

    def cost(out: int, write: int, read: int) -> float | None:
        w5 = write if job.cache_ttl == "5m" else 0
        w1 = write if job.cache_ttl == "1h" else 0
        return book.cost(job.model, input_tokens=max(0, total_input - write - read), output_tokens=out,
                         cache_5m=w5, cache_1h=w1, cache_read=read, batch=True)

    if price is None:
        method += f"; model {job.model!r} has no price: cost unknown"
    return Estimate(
        requests=n,
        input_tokens=max(0, total_input - cache_write - cache_read),
        cache_write_tokens=cache_write,
        cache_read_tokens=cache_read,
        output_tokens=out_total,
        output_tokens_max=out_max,
        batch_usd=cost(out_total, cache_write, cache_read),
        batch_usd_max=cost(out_max, cache_write_low, cache_read_low),
        sync_usd=book.cost(job.model, input_tokens=total_input, output_tokens=out_total, batch=False) if price else None,
        method=method,
        figures=figures,
        warnings=warnings,
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
