"""JSON schema -> SQL: the DuckDB type of each output field, and a set-wise validity check.

Answers are parsed and validated in DuckDB, never row by row in Python: the schema becomes one SQL
boolean over a JSON value (types, enums, required and unknown properties, array sizes and items,
numeric bounds, nested objects) and one `json_transform` structure giving typed columns.

Each call of a DuckDB JSON function parses its argument again and holds the parse of a whole vector
of it, so the check parses each object once, into a MAP of its properties' values, and checks each
value on its own: with a JSON call on the whole answer per property and keyword (about a dozen for a
three-property schema), 12,000 answers of ~1.6 KB needed 768 MiB to load; parsed once, 144 MiB.
"""

from __future__ import annotations

import json
from typing import Any

from .jobs import quote_literal


def _main_type(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        return non_null[0] if len(non_null) == 1 else None
    return t


def structure(schema: dict[str, Any]) -> Any:
    """The `json_transform` structure for a schema: typed STRUCTs, lists and scalars."""
    if "enum" in schema:
        vals = schema["enum"]
        if all(isinstance(v, str) for v in vals):
            return "VARCHAR"
        if all(isinstance(v, bool) for v in vals):
            return "BOOLEAN"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return "BIGINT"
        return "JSON"
    t = _main_type(schema)
    if t == "object":
        props = schema.get("properties") or {}
        return {k: structure(v) for k, v in props.items()} if props else "JSON"
    if t == "array":
        return [structure(schema.get("items") or {})]
    return {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}.get(t or "", "JSON")


def field_structures(schema: dict[str, Any]) -> dict[str, Any]:
    """Top-level output columns and their structures."""
    return {k: structure(v) for k, v in (schema.get("properties") or {}).items()}


_TYPES = {
    "string": "('VARCHAR')",
    "integer": "('BIGINT', 'UBIGINT')",
    "number": "('BIGINT', 'UBIGINT', 'DOUBLE')",
    "boolean": "('BOOLEAN')",
    "null": "('NULL')",
    "object": "('OBJECT')",
    "array": "('ARRAY')",
}


def valid_sql(schema: dict[str, Any], v: str, depth: int = 0) -> str:
    """SQL that is true when the JSON value `v` satisfies `schema` (the subset jobs may use)."""
    checks: list[str] = []
    if "enum" in schema:
        texts = ", ".join(quote_literal(json.dumps(x, separators=(",", ":"))) for x in schema["enum"])
        checks.append(f"CAST(json({v}) AS VARCHAR) IN ({texts})")
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    main = _main_type(schema)
    if types and types != ["object"]:  # an object alone: its MAP cast below says whether `v` is one
        allowed = sorted({x for typ in types for x in _TYPES[typ].strip("()").replace("'", "").split(", ")})
        checks.append(f"json_type({v}) IN ({', '.join(quote_literal(a) for a in allowed)})")
    nullable = "null" in types
    sub: list[str] = []
    if main == "object":
        # Parsed once: cast to a MAP of its properties' JSON values (NULL when `v` is not an object, or
        # names a property twice), bound to `o` by a lambda over a one-element list so that every check
        # reads the MAP instead of parsing `v` again (a JSON null comes out of the MAP as NULL).
        o = f"o{depth}"
        props = schema.get("properties") or {}
        inner = [f"{o} IS NOT NULL"]
        inner += [f"map_contains({o}, {quote_literal(r)})" for r in schema.get("required") or []]
        for k, s in props.items():
            value = f"coalesce({o}[{quote_literal(k)}], 'null'::JSON)"
            inner.append(f"(NOT map_contains({o}, {quote_literal(k)}) OR {valid_sql(s, value, depth + 1)})")
        if schema.get("additionalProperties") is False:
            names = ", ".join(quote_literal(k) for k in props) or "NULL"
            inner.append(f"list_has_all([{names}]::VARCHAR[], map_keys({o}))")
        sub.append(f"list_transform([TRY_CAST({v} AS MAP(VARCHAR, JSON))], lambda {o}: {' AND '.join(inner)})[1]")
    elif main == "array":
        if "minItems" in schema:
            sub.append(f"json_array_length({v}) >= {int(schema['minItems'])}")
        if "maxItems" in schema:
            sub.append(f"json_array_length({v}) <= {int(schema['maxItems'])}")
        if schema.get("items"):
            x = f"x{depth}"
            sub.append(
                f"coalesce(list_bool_and(list_transform(json_extract({v}, '$[*]'), lambda {x}: "
                f"{valid_sql(schema['items'], x, depth + 1)})), true)"
            )
    elif main in ("number", "integer"):
        num = f"CAST(json_extract_string({v}, '$') AS DOUBLE)"
        for k, op in (("minimum", ">="), ("maximum", "<="), ("exclusiveMinimum", ">"), ("exclusiveMaximum", "<")):
            if isinstance(schema.get(k), (int, float)) and not isinstance(schema.get(k), bool):
                sub.append(f"{num} {op} {schema[k]}")
    elif main == "string":
        s = f"json_extract_string({v}, '$')"
        if "maxLength" in schema:
            sub.append(f"length({s}) <= {int(schema['maxLength'])}")
        if "minLength" in schema:
            sub.append(f"length({s}) >= {int(schema['minLength'])}")
    if sub:
        body = " AND ".join(sub)
        checks.append(f"(json_type({v}) = 'NULL' OR ({body}))" if nullable else f"({body})")
    return "(" + (" AND ".join(checks) or "true") + ")"
