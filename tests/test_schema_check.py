"""schema_check: what structured outputs refuse, named by keyword and JSON path."""

from __future__ import annotations

from batch_bridge import schema_check


def problems(schema):
    return [(p.path, p.keyword) for p in schema_check.check(schema)]


def obj(props, required=None, **extra):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


def test_an_accepted_schema_has_no_problems():
    schema = obj({
        "label": {"type": "string", "enum": ["a", "b"], "description": "the label"},
        "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "note": {"type": ["string", "null"]},
        "detail": obj({"reason": {"type": "string"}}),
    })
    assert problems(schema) == []


def test_unsupported_keywords_are_named_with_their_path():
    schema = obj({
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    })
    assert problems(schema) == [
        ("$.properties.score.minimum", "minimum"), ("$.properties.score.maximum", "maximum"),
        ("$.properties.tags.maxItems", "maxItems"), ("$.properties.tags.items.maxLength", "maxLength"),
    ]
    [first] = [p for p in schema_check.check(schema) if p.keyword == "maxItems"]
    assert "say how many in the prompt or description" in str(first)


def test_objects_need_additional_properties_false_and_declared_required_fields():
    schema = {"type": "object", "properties": {"a": {"type": "string"},
                                               "b": {"type": "object", "properties": {}, "additionalProperties": True}},
              "required": ["a", "c"]}
    assert problems(schema) == [
        ("$.additionalProperties", "additionalProperties"), ("$.required", "required"),
        ("$.properties.b.additionalProperties", "additionalProperties"),
    ]


def test_enum_format_pattern_min_items_and_ref_rules():
    schema = obj({
        "e": {"enum": [{"x": 1}]},
        "f": {"type": "string", "format": "credit-card"},
        "p": {"type": "string", "pattern": "(a)\\1"},
        "m": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "r": {"$ref": "https://example.com/schema.json"},
    })
    assert problems(schema) == [
        ("$.properties.e.enum", "enum"), ("$.properties.f.format", "format"), ("$.properties.p.pattern", "pattern"),
        ("$.properties.m.minItems", "minItems"), ("$.properties.r.$ref", "$ref"),
    ]


def test_limits_on_optional_properties_and_unions():
    many = obj({f"p{i}": {"type": "string"} for i in range(25)}, required=[])
    assert ("$", "required") in problems(many)
    unions = obj({f"u{i}": {"type": ["string", "null"]} for i in range(17)})
    assert ("$", "anyOf") in problems(unions)
    assert problems(obj({f"u{i}": {"type": ["string", "null"]} for i in range(16)})) == []
