"""Is an output schema one that structured outputs accept? Checked before anything is sent.

The API constrains decoding to the schema and refuses (400 `invalid_request_error`) a schema that
uses what it cannot constrain. Inside a batch that refusal comes back hours later, once per
request, so the rules are checked here first (Anthropic's structured-outputs documentation,
"JSON Schema limitations"): every object says `additionalProperties: false`; only these keywords;
`enum` of plain values; `minItems` 0 or 1; a known `format`; a `pattern` without backreferences,
lookaround or word boundaries; `required` naming declared properties; local `$ref` only; at most 24
optional properties and 16 unions (`anyOf` or a list of types) in the whole schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

KEYWORDS = frozenset({
    "type", "description", "title", "enum", "const", "default", "properties", "required",
    "additionalProperties", "items", "minItems", "anyOf", "allOf", "$ref", "$defs", "definitions",
    "format", "pattern",
})
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"})
MAX_OPTIONAL = 24
MAX_UNIONS = 16
# What to do instead of a keyword the API refuses, for the common ones.
_INSTEAD = {
    "minimum": "state the range in the property's description", "maximum": "state the range in the description",
    "exclusiveMinimum": "state the range in the description", "exclusiveMaximum": "state the range in the description",
    "multipleOf": "state it in the description", "minLength": "state the length in the description",
    "maxLength": "state the length in the description", "maxItems": "say how many in the prompt or description",
    "uniqueItems": "say it in the description", "oneOf": "use anyOf",
}
_BAD_PATTERN = re.compile(r"\\[1-9]|\\k<|\(\?[=!]|\(\?<[=!]|\\b|\\B")


@dataclass(frozen=True)
class SchemaProblem:
    path: str  # JSON path of the offending keyword, e.g. $.properties.topics.maxItems
    keyword: str
    why: str

    def __str__(self) -> str:
        return f"{self.keyword!r} at {self.path}: {self.why}"


def check(schema: Any) -> list[SchemaProblem]:
    """Every problem structured outputs would refuse in `schema`, in document order."""
    problems: list[SchemaProblem] = []
    counts = {"optional": 0, "unions": 0}
    _walk(schema, "$", problems, counts)
    if counts["optional"] > MAX_OPTIONAL:
        problems.append(SchemaProblem("$", "required", f"{counts['optional']} optional properties in the schema; "
                                      f"at most {MAX_OPTIONAL} (list more of them in `required`)"))
    if counts["unions"] > MAX_UNIONS:
        problems.append(SchemaProblem("$", "anyOf", f"{counts['unions']} unions (anyOf or a list of types); "
                                      f"at most {MAX_UNIONS}"))
    return problems


def _walk(schema: Any, path: str, out: list[SchemaProblem], counts: dict[str, int]) -> None:
    if not isinstance(schema, dict):
        out.append(SchemaProblem(path, "type", "a schema must be an object"))
        return
    for key in schema:
        if key not in KEYWORDS:
            instead = _INSTEAD.get(key, f"supported keywords: {', '.join(sorted(KEYWORDS))}")
            out.append(SchemaProblem(f"{path}.{key}", key, f"not supported by structured outputs; {instead}"))
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    if isinstance(t, list) and len([x for x in t if x != "null"]) > 0 and len(t) > 1:
        counts["unions"] += 1
    if "anyOf" in schema:
        counts["unions"] += 1
    if "enum" in schema:
        vals = schema["enum"]
        if not isinstance(vals, list) or any(isinstance(v, (dict, list)) for v in vals):
            out.append(SchemaProblem(f"{path}.enum", "enum", "enum values must be strings, numbers, booleans or null"))
    if "minItems" in schema and schema["minItems"] not in (0, 1):
        out.append(SchemaProblem(f"{path}.minItems", "minItems", f"only 0 or 1 is supported, got {schema['minItems']!r}"))
    if "format" in schema and schema["format"] not in FORMATS:
        out.append(SchemaProblem(f"{path}.format", "format",
                                 f"{schema['format']!r} is not supported; supported: {', '.join(sorted(FORMATS))}"))
    if isinstance(schema.get("pattern"), str) and _BAD_PATTERN.search(schema["pattern"]):
        out.append(SchemaProblem(f"{path}.pattern", "pattern",
                                 "backreferences, lookahead/lookbehind and \\b are not supported in patterns"))
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        out.append(SchemaProblem(f"{path}.$ref", "$ref", f"only local references (#/$defs/...) are supported, got {ref!r}"))
    if "object" in types or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            got = schema.get("additionalProperties", "(missing)")
            out.append(SchemaProblem(f"{path}.additionalProperties", "additionalProperties",
                                     f"every object needs additionalProperties: false, got {got!r}"))
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if isinstance(props, dict):
            names = list(props)
            if isinstance(required, list):
                for r in required:
                    if r not in props:
                        out.append(SchemaProblem(f"{path}.required", "required",
                                                 f"{r!r} is required but not a declared property ({', '.join(names)})"))
                counts["optional"] += len([n for n in names if n not in required])
            for name, sub in props.items():
                _walk(sub, f"{path}.properties.{name}", out, counts)
    if "items" in schema:
        _walk(schema["items"], f"{path}.items", out, counts)
    for key in ("anyOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            _walk(sub, f"{path}.{key}[{i}]", out, counts)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            _walk(sub, f"{path}.{key}.{name}", out, counts)
