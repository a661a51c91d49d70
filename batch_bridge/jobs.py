"""Job definitions from dbt YAML (`config.meta.batch_bridge` on a staging model), validated once.

A job's request has a *static* part (model, sampling, system prompt, schema or tool) that is the same
for every row, and one per-row part, the user prompt. We render the static part once in Python and
split it around the prompt, so export can build every request body in SQL as
`prefix || to_json(prompt) || suffix`: byte-identical to `json.dumps` of the full params, with no
Python object per row. The same split gives the input hash: md5(static part, prompt).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import ConfigError, JobDefinitionError

JOB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
MAX_REQUESTS_PER_BATCH = 100_000
MAX_BYTES_PER_BATCH = 256_000_000
CacheTtl = Literal["5m", "1h", "none"]
# Where a run's requests go: a Message Batch (half price, within 24 hours), synchronous Messages calls
# (standard price, seconds), or chosen per run from the work at hand (`lanes.route`).
Lane = Literal["batch", "sync", "auto"]
LANES: tuple[str, ...] = ("batch", "sync", "auto")
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Every field a job may declare, with what it is for. Unknown fields are errors (typos must not be
# silently ignored: a misspelt `output_schema` would send free-text requests and pay for them).
FIELDS: dict[str, str] = {
    "job": "job name (default: the model name)",
    "key": "primary key column or list of columns",
    "model": "Claude model id",
    "max_tokens": "maximum output tokens (1..128000)",
    "system": "system prompt text",
    "prompt_column": "column holding the user prompt",
    "prompt_template": "template over columns, {column} placeholders",
    "output_schema": "JSON schema of the answer (sent as output_config.format)",
    "output_tool": "tool {name, description, input_schema} the model is forced to call",
    "few_shot": "list of {user, assistant} examples, part of the cached prefix",
    "temperature": "sampling temperature 0..1",
    "top_p": "nucleus sampling 0..1",
    "top_k": "top-k sampling, integer >= 1",
    "stop_sequences": "list of strings",
    "max_attempts": "sends per input before giving up on retryable failures (default 3)",
    "budget_usd": "refuse a submission whose estimate exceeds this",
    "cache_ttl": "prompt cache TTL for the shared prefix: 5m, 1h or none (default 1h)",
    "retry_parse_failed": "resend answers that do not match the schema (default false)",
    "max_requests_per_batch": "cap per batch (default and maximum 100000)",
    "max_bytes_per_batch": "cap per batch body in bytes (default and maximum 256000000)",
    "lane": "batch, sync or auto: where a run's requests go (default batch)",
    "sync_max_requests": "with lane auto: runs of at most this many requests go synchronous (default 100)",
    "deadline": "with lane auto: a duration like 2h; sooner than batches have taken -> synchronous",
    "sync_concurrency": "synchronous calls at once (default 4)",
    "enabled": "false to skip this job",
}

PROMPT_SENTINEL = "\u0000batch_bridge_prompt\u0000"


@dataclass(frozen=True)
class Relation:
    database: str
    schema: str
    identifier: str

    def sql(self) -> str:
        return ".".join(quote_ident(p) for p in (self.database, self.schema, self.identifier))


@dataclass(frozen=True)
class Job:
    name: str
    node: str  # dbt unique_id of the staging model
    relation: Relation
    key: tuple[str, ...]
    model: str
    max_tokens: int
    prompt_column: str | None
    prompt_template: str | None
    system: str | None = None
    output_schema: dict[str, Any] | None = None
    output_tool: dict[str, Any] | None = None
    few_shot: tuple[tuple[str, str], ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 3
    budget_usd: float | None = None
    cache_ttl: CacheTtl = "1h"
    cache_ttl_given: bool = False  # set in the YAML, not the default: only then a too-short prefix is warned of
    retry_parse_failed: bool = False
    max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH
    max_bytes_per_batch: int = MAX_BYTES_PER_BATCH
    # Not part of the request nor of any hash: changing the lane never resends an answered row.
    lane: Lane = "batch"
    sync_max_requests: int = 100
    deadline_seconds: float | None = None
    sync_concurrency: int = 4

    @property
    def structured(self) -> bool:
        return self.output_schema is not None or self.output_tool is not None

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        if self.output_tool is not None:
            return self.output_tool["input_schema"]
        return self.output_schema

    def params_template(self) -> dict[str, Any]:
        """The request params with PROMPT_SENTINEL where the row's prompt goes."""
        cache = None if self.cache_ttl == "none" else {"type": "ephemeral", "ttl": self.cache_ttl}
        params: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        if self.system:
            block: dict[str, Any] = {"type": "text", "text": self.system}
            if cache and not self.few_shot:
                block["cache_control"] = cache
            params["system"] = [block]
        messages: list[dict[str, Any]] = []
        for i, (user, assistant) in enumerate(self.few_shot):
            messages.append({"role": "user", "content": user})
            last = {"type": "text", "text": assistant}
            if cache and i == len(self.few_shot) - 1:
                last["cache_control"] = cache
            messages.append({"role": "assistant", "content": [last]})
        messages.append({"role": "user", "content": PROMPT_SENTINEL})
        params["messages"] = messages
        params.update(self.sampling)
        if self.output_schema is not None:
            params["output_config"] = {"format": {"type": "json_schema", "schema": self.output_schema}}
        if self.output_tool is not None:
            tool = dict(self.output_tool)
            params["tools"] = [tool]
            params["tool_choice"] = {"type": "tool", "name": tool["name"]}
        return params

    def params_split(self) -> tuple[str, str]:
        """(prefix, suffix) such that prefix + json(prompt) + suffix is the params JSON."""
        text = json.dumps(self.params_template(), ensure_ascii=False, separators=(",", ":"))
        token = json.dumps(PROMPT_SENTINEL, ensure_ascii=False)
        prefix, suffix = text.split(token)
        return prefix, suffix

    @property
    def static_hash(self) -> str:
        prefix, suffix = self.params_split()
        return hashlib.md5(f"{prefix}\x00{suffix}".encode()).hexdigest()

    @property
    def definition_hash(self) -> str:
        """The whole definition, batch caps included: a create the API rejected for good is not tried
        again with the same rows until it changes."""
        body = {**self.to_json(), "max_requests_per_batch": self.max_requests_per_batch,
                "max_bytes_per_batch": self.max_bytes_per_batch}
        return hashlib.md5(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node": self.node,
            "relation": [self.relation.database, self.relation.schema, self.relation.identifier],
            "key": list(self.key),
            "params_template": self.params_template(),
            "max_attempts": self.max_attempts,
            "budget_usd": self.budget_usd,
            "retry_parse_failed": self.retry_parse_failed,
        }


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (table, column, schema): the only way names reach SQL."""
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _suggest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _check_schema(job: str, fld: str, schema: Any, path: str = "") -> None:
    """Check that a JSON schema uses only what we can send, parse and type."""
    where = f"{fld}{path}"
    if not isinstance(schema, dict):
        raise JobDefinitionError(job, where, schema, "a JSON schema object")
    t = schema.get("type")
    types = ("object", "array", "string", "number", "integer", "boolean", "null")
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise JobDefinitionError(job, f"{where}.enum", schema["enum"], "a non-empty list")
        return
    if isinstance(t, list):
        if not all(x in types for x in t):
            raise JobDefinitionError(job, f"{where}.type", t, ", ".join(types))
        return
    if t not in types:
        raise JobDefinitionError(job, f"{where}.type", t, ", ".join(types))
    if t == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise JobDefinitionError(job, f"{where}.properties", props, "a mapping of property name to schema")
        for name, sub in props.items():
            _check_schema(job, fld, sub, f"{path}.properties.{name}")
        req = schema.get("required", [])
        missing = [r for r in req if r not in props] if isinstance(req, list) else req
        if not isinstance(req, list) or missing:
            raise JobDefinitionError(job, f"{where}.required", req, f"a list of declared properties {sorted(props)}")
    if t == "array":
        if "items" in schema:
            _check_schema(job, fld, schema["items"], f"{path}.items")


def parse_job(node: dict[str, Any]) -> Job | None:
    """Build and validate the job declared on one manifest node, or None if it declares none."""
    meta = (node.get("config") or {}).get("meta") or node.get("meta") or {}
    raw = meta.get("batch_bridge")
    if raw is None:
        return None
    model_name = node.get("name", "?")
    if not isinstance(raw, dict):
        raise JobDefinitionError(model_name, "", raw, "a mapping of job fields")
    name = raw.get("job", model_name)
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise JobDefinitionError(
            model_name, "job", name, "letters, digits and underscores, starting with a letter, at most 63"
        )
    for k in raw:
        if k not in FIELDS:
            raise JobDefinitionError(name, k, raw[k], f"one of {', '.join(FIELDS)}", hint=_suggest(k, list(FIELDS)))
    if raw.get("enabled") is False:
        return None
    if (node.get("config") or {}).get("materialized") == "ephemeral":
        # dbt inlines an ephemeral model into its dependents and builds nothing: the bridge would read
        # nothing, or a table or view an earlier materialization left behind.
        raise ConfigError(
            f"job {name!r}: its model {model_name!r} is materialized as 'ephemeral', so dbt builds no relation "
            "the bridge can read",
            hint=f"materialize {model_name!r} as a table or a view (config: materialized: table)",
        )

    key = raw.get("key")
    keys = (key,) if isinstance(key, str) else tuple(key) if isinstance(key, list) else ()
    if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
        raise JobDefinitionError(name, "key", key, "a column name or a list of distinct column names")
    _check_key_names(name, key, keys)

    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise JobDefinitionError(name, "model", model, "a Claude model id such as 'claude-haiku-4-5'")

    max_tokens = raw.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 128_000:
        raise JobDefinitionError(name, "max_tokens", max_tokens, "an integer from 1 to 128000")

    pc, pt = raw.get("prompt_column"), raw.get("prompt_template")
    if (pc is None) == (pt is None):
        raise JobDefinitionError(
            name, "prompt_column", pc, "exactly one of prompt_column or prompt_template", hint=f"prompt_template={pt!r}"
        )
    if pc is not None and (not isinstance(pc, str) or not pc):
        raise JobDefinitionError(name, "prompt_column", pc, "a column name")
    if pt is not None and (not isinstance(pt, str) or not template_columns(pt)):
        raise JobDefinitionError(name, "prompt_template", pt, "text with at least one {column} placeholder")

    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise JobDefinitionError(name, "system", system, "a string")

    schema, tool = raw.get("output_schema"), raw.get("output_tool")
    if schema is not None and tool is not None:
        raise JobDefinitionError(name, "output_tool", tool, "not together with output_schema; choose one")
    if schema is not None:
        _check_schema(name, "output_schema", schema)
        if schema.get("type") != "object":
            raise JobDefinitionError(name, "output_schema.type", schema.get("type"), "'object' at the top level")
        _check_output_names(name, "output_schema", schema, keys)
    if tool is not None:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or "input_schema" not in tool:
            raise JobDefinitionError(name, "output_tool", tool, "a mapping with name, description and input_schema")
        extra = set(tool) - {"name", "description", "input_schema"}
        if extra:
            raise JobDefinitionError(name, "output_tool", sorted(extra), "only name, description, input_schema")
        _check_schema(name, "output_tool.input_schema", tool["input_schema"])
        _check_output_names(name, "output_tool.input_schema", tool["input_schema"], keys)

    few = raw.get("few_shot") or []
    if not isinstance(few, list) or not all(
        isinstance(e, dict) and isinstance(e.get("user"), str) and isinstance(e.get("assistant"), str) for e in few
    ):
        raise JobDefinitionError(name, "few_shot", few, "a list of {user: text, assistant: text}")

    sampling: dict[str, Any] = {}
    for f, lo, hi in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        v = raw.get(f)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise JobDefinitionError(name, f, v, f"a number from {lo} to {hi}")
            sampling[f] = v
    if raw.get("top_k") is not None:
        v = raw["top_k"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise JobDefinitionError(name, "top_k", v, "an integer >= 1")
        sampling["top_k"] = v
    if raw.get("stop_sequences") is not None:
        v = raw["stop_sequences"]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise JobDefinitionError(name, "stop_sequences", v, "a list of non-empty strings")
        if v:
            sampling["stop_sequences"] = v

    max_attempts = raw.get("max_attempts", 3)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 100:
        raise JobDefinitionError(name, "max_attempts", max_attempts, "an integer from 1 to 100")
    budget = raw.get("budget_usd")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
        raise JobDefinitionError(name, "budget_usd", budget, "a number >= 0 (US dollars)")
    ttl = raw.get("cache_ttl", "1h")
    if ttl not in ("5m", "1h", "none"):
        raise JobDefinitionError(name, "cache_ttl", ttl, "'5m', '1h' or 'none'")
    rpf = raw.get("retry_parse_failed", False)
    if not isinstance(rpf, bool):
        raise JobDefinitionError(name, "retry_parse_failed", rpf, "true or false")
    mr = raw.get("max_requests_per_batch", MAX_REQUESTS_PER_BATCH)
    if isinstance(mr, bool) or not isinstance(mr, int) or not 1 <= mr <= MAX_REQUESTS_PER_BATCH:
        raise JobDefinitionError(name, "max_requests_per_batch", mr, f"an integer from 1 to {MAX_REQUESTS_PER_BATCH}")
    mb = raw.get("max_bytes_per_batch", MAX_BYTES_PER_BATCH)
    if isinstance(mb, bool) or not isinstance(mb, int) or not 1024 <= mb <= MAX_BYTES_PER_BATCH:
        raise JobDefinitionError(name, "max_bytes_per_batch", mb, f"an integer from 1024 to {MAX_BYTES_PER_BATCH}")

    lane = raw.get("lane", "batch")
    if lane not in LANES:
        raise JobDefinitionError(name, "lane", lane, "'batch', 'sync' or 'auto'", hint=_suggest(str(lane), list(LANES)))
    smr = raw.get("sync_max_requests", 100)
    if isinstance(smr, bool) or not isinstance(smr, int) or smr < 0:
        raise JobDefinitionError(name, "sync_max_requests", smr, "an integer >= 0")
    deadline = raw.get("deadline")
    deadline_seconds = None
    if deadline is not None:
        deadline_seconds = parse_duration(deadline)
        if deadline_seconds is None or deadline_seconds <= 0:
            raise JobDefinitionError(name, "deadline", deadline, "a duration such as '90s', '30m', '2h' or '1d'")
    sc = raw.get("sync_concurrency", 4)
    if isinstance(sc, bool) or not isinstance(sc, int) or not 1 <= sc <= 256:
        raise JobDefinitionError(name, "sync_concurrency", sc, "an integer from 1 to 256")

    return Job(
        name=name,
        node=node.get("unique_id", model_name),
        relation=Relation(node.get("database") or "", node.get("schema") or "main", node.get("alias") or model_name),
        key=keys,
        model=model.strip(),
        max_tokens=max_tokens,
        prompt_column=pc,
        prompt_template=pt,
        system=system,
        output_schema=schema,
        output_tool=tool,
        few_shot=tuple((e["user"], e["assistant"]) for e in few),
        sampling=sampling,
        max_attempts=max_attempts,
        budget_usd=float(budget) if budget is not None else None,
        cache_ttl=ttl,
        cache_ttl_given="cache_ttl" in raw,
        retry_parse_failed=rpf,
        max_requests_per_batch=mr,
        max_bytes_per_batch=mb,
        lane=lane,
        sync_max_requests=smr,
        deadline_seconds=deadline_seconds,
        sync_concurrency=sc,
    )


def parse_duration(value: Any) -> float | None:
    """Seconds of a duration such as '45s', '30m', '2h', '1d' (None when it is not one)."""
    if not isinstance(value, str):
        return None
    m = DURATION.match(value)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)] if m else None


# Result columns the bridge always writes; a schema property with one of these names would clash.
RESERVED_COLUMNS = (
    "custom_id status output_text output_json stop_reason model input_tokens output_tokens "
    "cache_creation_input_tokens cache_read_input_tokens cost_usd deduplicated is_stale error_type "
    "error_message attempt batch_id request_custom_id input_hash submitted_at collected_at lane"
).split()


def _check_key_names(job: str, key: Any, keys: tuple[str, ...]) -> None:
    # The results source carries the key columns beside the bridge's own; DuckDB would rename a clashing
    # one to `status_1` and break the source's contract, so the name is refused before anything runs.
    # Column names compare without case in DuckDB, and so do distinct keys.
    clash = [k for k in keys if k.lower() in RESERVED_COLUMNS]
    if clash:
        raise JobDefinitionError(
            job, "key", key, f"column names other than the bridge's result columns ({', '.join(RESERVED_COLUMNS)})",
            hint=f"rename the column in the staging model, e.g. `select {clash[0]} as {clash[0]}_key, ...`, "
                 f"and name it {clash[0] + '_key'!r} in key",
        )
    if len({k.lower() for k in keys}) != len(keys):
        raise JobDefinitionError(job, "key", key, "a column name or a list of distinct column names (case aside)")


def _check_output_names(job: str, fld: str, schema: dict[str, Any], keys: tuple[str, ...]) -> None:
    lowered = {k.lower() for k in keys}
    for prop in schema.get("properties", {}):
        if prop.lower() in RESERVED_COLUMNS or prop.lower() in lowered:
            raise JobDefinitionError(
                job, f"{fld}.properties.{prop}", prop,
                f"a name that is not a key column nor one of the bridge's columns ({', '.join(RESERVED_COLUMNS)})",
                hint=f"rename the property in the schema (and in `required`), e.g. to {prop + '_value'!r}; "
                     "the answer's column takes the property's name",
            )


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_ ]*)\}")


def template_columns(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def jobs_from_manifest(manifest: dict[str, Any]) -> list[Job]:
    """Every enabled job declared in a dbt manifest, sorted by name; duplicate names are an error."""
    jobs: dict[str, Job] = {}
    for node in (manifest.get("nodes") or {}).values():
        if node.get("resource_type") not in ("model", "seed", "snapshot"):
            continue
        job = parse_job(node)
        if job is None:
            continue
        if job.name in jobs:
            raise JobDefinitionError(
                job.name, "job", job.name, "a name used by one model only",
                hint=f"declared on both {jobs[job.name].node} and {job.node}",
            )
        jobs[job.name] = job
    return [jobs[k] for k in sorted(jobs)]


def select_jobs(jobs: list[Job], names: tuple[str, ...] | list[str] | None) -> list[Job]:
    if not names:
        return jobs
    known = {j.name: j for j in jobs}
    out = []
    for n in names:
        if n not in known:
            from .errors import ConfigError

            raise ConfigError(
                f"--job {n!r} is not declared in the project; jobs: {', '.join(known) or '(none)'}",
                hint=_suggest(n, list(known)),
            )
        out.append(known[n])
    return out


def with_lane(jobs: list[Job], lane: str | None) -> list[Job]:
    """The jobs with their lane replaced for one run (`--lane`); unchanged when `lane` is None."""
    if lane is None:
        return jobs
    if lane not in LANES:
        from .errors import ConfigError

        raise ConfigError(f"--lane {lane!r} is not a lane; choose batch, sync or auto")
    return [replace(j, lane=lane) for j in jobs]  # type: ignore[arg-type]
