"""Preview: a few rows through the synchronous Messages API, to see the answers before a batch.

"What will the answers look like?" is asked before every new job; a batch answers it hours later.
A preview sends a handful of rows (by default the longest, the shortest and a typical prompt; or the
keys asked for) with exactly the body their batch line would carry (`export.params_sql`), and shows
the request, the raw answer, the typed columns the results would get (or why parsing failed,
checked by the same SQL as a load: `outputs.valid_sql`, `field_structures`), tokens and cost at
standard prices. It records nothing that changes what `sync` sends and writes nothing to the
results source: rows are read from the warehouse into temp tables, answers stay in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb

from . import api, state
from .config import Settings
from .errors import ApiAuthError, ApiError, ConfigError
from .estimate import calibration, fixed_tokens, tokens
from .export import custom_id_sql, empty_prompt_sql, key_json_sql, params_sql, prompt_sql, warehouse_attached
from .jobs import Job, quote_ident, quote_literal
from .outputs import field_structures, valid_sql
from .preflight import check_jobs
from .pricing import load_prices

if TYPE_CHECKING:  # the SDK costs ~1 s to import: api.preload() brings it in beside other work
    import anthropic

DEFAULT_ROWS = 3
ASK_ABOVE_USD = 0.50  # on a terminal, a preview that may cost more is confirmed first
SHOWN_CHARS = 300  # system and prompt texts are shown shortened to about this many characters


@dataclass
class PreviewRow:
    """One row to preview: why it was chosen, its key, and the exact request params."""

    why: str  # longest | shortest | typical | pNN (a length percentile) | asked
    key: Any
    custom_id: str
    prompt_chars: int
    params: dict[str, Any]
    input_tokens_est: int
    # Filled once sent:
    answer: str | None = None
    stop_reason: str | None = None
    parsed: dict[str, Any] | None = None
    parse_error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    cost_usd: float | None = None
    error: str | None = None


@dataclass
class Preview:
    job: Job
    rows: list[PreviewRow]
    max_usd: float | None  # if every answer used max_tokens, at standard prices (None: model not priced)
    warnings: list[str] = field(default_factory=list)

    @property
    def cost_usd(self) -> float | None:
        costs = [r.cost_usd for r in self.rows if r.answer is not None]
        return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job.name,
            "model": self.job.model,
            "prices": "standard (synchronous Messages API), not batch",
            "estimated_usd_max": self.max_usd,
            "cost_usd": self.cost_usd,
            "warnings": self.warnings,
            "rows": [_row_json(self.job, r) for r in self.rows],
        }


def shorten(text: str | None, limit: int = SHOWN_CHARS) -> str | None:
    """The head and the tail of a long text, with how much was left out in between."""
    if text is None or len(text) <= limit:
        return text
    head, tail = int(limit * 0.7), int(limit * 0.25)
    return f"{text[:head]} [... {len(text) - head - tail:,} characters ...] {text[-tail:]}"


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return None


def _row_json(job: Job, r: PreviewRow) -> dict[str, Any]:
    p = r.params
    messages = p.get("messages") or []
    return {
        "why": r.why,
        "key": r.key,
        "custom_id": r.custom_id,
        "request": {
            "model": p.get("model"), "max_tokens": p.get("max_tokens"),
            "system": shorten(_text(p.get("system"))),
            "few_shot_turns": (len(messages) - 1) // 2,
            "prompt": shorten(_text(messages[-1].get("content")) if messages else None),
            "prompt_chars": r.prompt_chars,
            "output": "output_tool" if job.output_tool else "output_schema" if job.output_schema else "text",
        },
        "answer": r.answer,
        "stop_reason": r.stop_reason,
        "parsed": r.parsed,
        "parse_error": r.parse_error,
        "usage": r.usage,
        "cost_usd": r.cost_usd,
        "error": r.error,
    }


def _quantiles(n: int) -> list[tuple[str, float]]:
    """Which prompt lengths to show for `n` rows, evenly spread over the rows ordered by length:
    the longest, the shortest, the typical one (nearest the median), then the others as percentiles."""
    if n == 1:
        return [("typical", 0.5)]
    qs = [k / (n - 1) for k in range(n)]
    middle = min(qs[1:-1], key=lambda q: abs(q - 0.5)) if n > 2 else None
    named = [("longest", 1.0), ("shortest", 0.0)] + ([("typical", middle)] if middle is not None else [])
    rest = [(f"p{round(q * 100)}", q) for q in qs[1:-1] if q != middle]
    return named + rest


def _select_rows(con: duckdb.DuckDBPyConnection, job: Job, n: int, keys: tuple[str, ...]) -> list[tuple]:
    """(why, key_json, custom_id, prompt_chars, params_json) of the rows to preview."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE bb_preview_rows AS
        SELECT custom_id, key_json, prompt_chars, row_number() OVER (ORDER BY prompt_chars, custom_id) - 1 AS rn,
               count(*) OVER () AS total, key_text
        FROM (
            SELECT {custom_id_sql(job)} AS custom_id, {key_json_sql(job, 's')} AS key_json,
                   {f"CAST(s.{quote_ident(job.key[0])} AS VARCHAR)" if len(job.key) == 1 else "NULL::VARCHAR"} AS key_text,
                   length({prompt_sql(job)}) AS prompt_chars, {empty_prompt_sql(job)} AS empty
            FROM {job.relation.sql()} s
        ) WHERE custom_id IS NOT NULL AND NOT empty
        """
    )
    if keys:
        picked = []
        for k in keys:
            row = con.execute(
                "SELECT custom_id FROM bb_preview_rows WHERE key_text = $k "
                "OR (try(json(key_json)) = try(json($k))) LIMIT 1", {"k": k}).fetchone()
            if row is None:
                raise ConfigError(
                    f"--key {k!r}: no row of {job.relation.identifier} with this key and a non-empty prompt",
                    hint="give the key value as shown by the staging table; for a key of several columns, "
                    "a JSON array such as '[\"shop\", 3]'",
                )
            picked.append(("asked", row[0]))
    else:
        total = con.execute("SELECT count(*) FROM bb_preview_rows").fetchone()[0]
        if not total:
            raise ConfigError(f"job {job.name!r}: {job.relation.identifier} has no row with a key and a non-empty prompt")
        picked, seen = [], set()
        for why, q in _quantiles(n):
            rn = round(q * (total - 1))
            if rn in seen:
                continue
            seen.add(rn)
            picked.append((why, con.execute("SELECT custom_id FROM bb_preview_rows WHERE rn = ?", [rn]).fetchone()[0]))
    ids = [cid for _, cid in picked]
    con.execute("CREATE OR REPLACE TEMP TABLE bb_preview_pick (custom_id VARCHAR)")
    con.execute("INSERT INTO bb_preview_pick SELECT unnest(?::VARCHAR[])", [ids])
    rows = {r[0]: r[1:] for r in con.execute(
        f"""
        SELECT c, k, n, p FROM (
            SELECT {custom_id_sql(job)} AS c, {key_json_sql(job, 's')} AS k, length({prompt_sql(job)}) AS n,
                   {params_sql(job)} AS p
            FROM {job.relation.sql()} s
            SEMI JOIN bb_preview_pick q ON q.custom_id = {custom_id_sql(job)}
        )
        """
    ).fetchall()}
    return [(why, rows[cid][0], cid, rows[cid][1], rows[cid][2]) for why, cid in picked]


def prepare(
    settings: Settings, job: Job, client: anthropic.Anthropic, *, rows: int = DEFAULT_ROWS, keys: tuple[str, ...] = (),
) -> Preview:
    """Preflight the job (as for a synchronous call), choose the rows, build their exact params, and
    price them at their most; sends nothing."""
    if rows < 1:
        raise ConfigError(f"--rows {rows}: must be at least 1")
    book = load_prices(settings.prices_file)
    with state.connect(settings) as con:
        found = check_jobs(con, settings, [job], client, for_batch=False)[job.name]
        scale = calibration(con, job).scale
        with warehouse_attached(con, settings, job.relation.database):
            picked = _select_rows(con, job, rows, keys)
    out = []
    for why, key_json, cid, chars, params in picked:
        est = int((tokens(chars) + fixed_tokens(job)) * scale)
        key = json.loads(key_json)
        out.append(PreviewRow(why, key[0] if len(job.key) == 1 else key, cid, int(chars), json.loads(params), est))
    costs = [book.cost(job.model, input_tokens=r.input_tokens_est, output_tokens=job.max_tokens, batch=False)
             for r in out]
    max_usd = None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
    warnings = [*found.warnings, *(f"not checked: {u}" for u in found.unchecked)]
    if max_usd is None:
        warnings.append(f"model {job.model!r} has no price: the cost is unknown")
    return Preview(job, out, max_usd, warnings)


def send(settings: Settings, preview: Preview, client: anthropic.Anthropic) -> Preview:
    """Send each row synchronously; fill in answers, parsed columns, usage and cost."""
    book = load_prices(settings.prices_file)
    job = preview.job
    con = duckdb.connect()  # parsing only: the bridge's files are not touched
    try:
        for r in preview.rows:
            try:
                message = api.create_message(client, r.params)
            except ApiAuthError:
                raise
            except ApiError as e:
                r.error = e.message
                continue
            _fill(con, job, r, message, book)
    finally:
        con.close()
    return preview


def _fill(con: duckdb.DuckDBPyConnection, job: Job, r: PreviewRow, message: Any, book: Any) -> None:
    blocks = list(message.content or [])
    if job.output_tool is not None:
        tool = next((b for b in blocks if getattr(b, "type", None) == "tool_use"), None)
        r.answer = json.dumps(tool.input, ensure_ascii=False) if tool is not None else ""
    else:
        r.answer = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
    r.stop_reason = message.stop_reason
    u = message.usage
    cc = getattr(u, "cache_creation", None)
    w5 = (cc.ephemeral_5m_input_tokens if cc else 0) or 0
    w1 = (cc.ephemeral_1h_input_tokens if cc else 0) or 0
    read = u.cache_read_input_tokens or 0
    r.usage = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
               "cache_creation_input_tokens": u.cache_creation_input_tokens or 0, "cache_read_input_tokens": read}
    r.cost_usd = book.cost(job.model, input_tokens=u.input_tokens, output_tokens=u.output_tokens, cache_5m=w5,
                           cache_1h=w1, cache_read=read, batch=False)
    schema = job.answer_schema
    if schema is None:
        return
    fields = field_structures(schema)
    typed = (f", json_transform(j, {quote_literal(json.dumps(fields))}) AS typed" if fields else ", NULL AS typed")
    ok, valid, value = con.execute(
        f"SELECT j IS NOT NULL, coalesce(j IS NOT NULL AND {valid_sql(schema, 'j')}, false){typed} "
        "FROM (SELECT CASE WHEN json_valid($t) THEN json($t) END AS j)", {"t": r.answer},
    ).fetchone()
    if not ok:
        r.parse_error = "the answer is not JSON" + (f" (stop_reason {r.stop_reason})" if r.stop_reason == "max_tokens" else "")
    elif not valid:
        r.parse_error = "the answer is JSON but does not match the output schema (it would load as parse_failed)"
    else:
        r.parsed = value if isinstance(value, dict) else json.loads(r.answer)
