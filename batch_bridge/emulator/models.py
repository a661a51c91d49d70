"""Known models: limits, lifecycle and capabilities, in the shape of the Models API's `ModelInfo`.

Generous on purpose: aliases, dated snapshots (`<alias>-YYYYMMDD`, any date) and `-latest`
all resolve to the family. An id outside this table is unknown: `GET /v1/models/{id}` answers 404
`not_found_error`, and a request naming it ends `errored` with `not_found_error`, as the real API
answers. A few families carry a lifecycle or a missing capability so that clients can be tested
against them: `claude-3-opus`, `claude-3-7-sonnet` and `claude-3-5-haiku` are `deprecated`,
`claude-3-sonnet` and `claude-3-5-sonnet` are `retired` (requests naming them fail like unknown ones),
`claude-mythos-preview` has no batch support, and the 3.x and 4.0/4.1 families no structured outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class ModelInfo:
    max_output_tokens: int
    cache_min_tokens: int  # the real API's minimum prefix length for a cache breakpoint
    family: str = ""
    lifecycle: str = "active"  # active | deprecated | retired
    batch: bool = True
    structured_outputs: bool = True
    max_input_tokens: int = 200_000

    @property
    def retired(self) -> bool:
        return self.lifecycle == "retired"


_OPUS_SONNET_CACHE_MIN = 1024
_HAIKU_CACHE_MIN = 2048
# Newer families need longer prefixes (Anthropic prompt-caching docs, late 2026): 4,096 tokens for
# Haiku 4.5 and Opus 4.5 and later, 2,048 for Sonnet 4.6.
_CACHE_MIN_EXCEPTIONS = {
    "claude-haiku-4-5": 4096, "claude-opus-4-5": 4096, "claude-opus-4-6": 4096, "claude-opus-4-7": 4096,
    "claude-opus-4-8": 4096, "claude-sonnet-4-6": 2048,
}

_FAMILIES: dict[str, int] = {
    # current and recent families
    "claude-opus-5-5": 128_000,
    "claude-opus-5": 128_000,
    "claude-sonnet-5-5": 64_000,
    "claude-sonnet-5": 64_000,
    "claude-haiku-5-5": 64_000,
    "claude-haiku-5": 64_000,
    "claude-fable-5-2": 128_000,
    "claude-fable-5-1": 128_000,
    "claude-fable-5": 128_000,
    "claude-mythos-5-2": 128_000,
    "claude-mythos-5-1": 128_000,
    "claude-mythos-5": 128_000,
    "claude-mythos-preview": 128_000,
    "claude-opus-4-8": 128_000,
    "claude-opus-4-7": 128_000,
    "claude-opus-4-6": 128_000,
    "claude-sonnet-4-6": 64_000,
    "claude-opus-4-5": 64_000,
    "claude-sonnet-4-5": 64_000,
    "claude-haiku-4-5": 64_000,
    "claude-opus-4-1": 32_000,
    "claude-opus-4-0": 32_000,
    "claude-opus-4": 32_000,
    "claude-sonnet-4-0": 64_000,
    "claude-sonnet-4": 64_000,
    # older generations, still seen in code in the wild
    "claude-3-7-sonnet": 64_000,
    "claude-3-5-sonnet": 8_192,
    "claude-3-5-haiku": 8_192,
    "claude-3-opus": 4_096,
    "claude-3-sonnet": 4_096,
    "claude-3-haiku": 4_096,
}

_SUFFIX = re.compile(r"-(\d{8}|latest)$")
# (deprecated_at, retires_at) of the families that are not `active`.
_DEPRECATED = {
    "claude-3-opus": ("2025-06-30T00:00:00Z", "2027-01-05T00:00:00Z"),
    "claude-3-7-sonnet": ("2025-10-28T00:00:00Z", "2027-02-19T00:00:00Z"),
    "claude-3-5-haiku": ("2025-12-19T00:00:00Z", "2027-02-19T00:00:00Z"),
}
_RETIRED = {
    "claude-3-sonnet": ("2025-01-21T00:00:00Z", "2025-07-21T00:00:00Z"),
    "claude-3-5-sonnet": ("2025-08-13T00:00:00Z", "2025-10-22T00:00:00Z"),
}
_NO_BATCH = {"claude-mythos-preview"}
_NO_STRUCTURED = {
    "claude-opus-4-1", "claude-opus-4-0", "claude-opus-4", "claude-sonnet-4-0", "claude-sonnet-4",
    "claude-3-7-sonnet", "claude-3-5-sonnet", "claude-3-5-haiku", "claude-3-opus", "claude-3-sonnet", "claude-3-haiku",
}
_LARGE_CONTEXT = {"claude-opus-5-5", "claude-sonnet-5-5", "claude-fable-5-2", "claude-mythos-5-2"}


@lru_cache(maxsize=1024)  # called twice per request; a batch names one or a few models
def lookup(model: str) -> ModelInfo | None:
    """ModelInfo for an alias or dated id, or None when the model is unknown."""
    family = _SUFFIX.sub("", model)
    max_out = _FAMILIES.get(family)
    if max_out is None:
        return None
    cache_min = _CACHE_MIN_EXCEPTIONS.get(family) or (_HAIKU_CACHE_MIN if "haiku" in family else _OPUS_SONNET_CACHE_MIN)
    lifecycle = "retired" if family in _RETIRED else "deprecated" if family in _DEPRECATED else "active"
    return ModelInfo(
        max_output_tokens=max_out, cache_min_tokens=cache_min, family=family, lifecycle=lifecycle,
        batch=family not in _NO_BATCH, structured_outputs=family not in _NO_STRUCTURED,
        max_input_tokens=1_000_000 if family in _LARGE_CONTEXT else 200_000,
    )


def known_aliases() -> list[str]:
    return sorted(_FAMILIES)


_LINES = ("haiku", "sonnet", "opus", "fable", "mythos")


def _supported(flag: bool) -> dict[str, bool]:
    return {"supported": flag}


def _display_name(family: str) -> str:
    words = family.removeprefix("claude-").split("-")
    name = [w.capitalize() for w in words if not w.isdigit()]
    version = ".".join(w for w in words if w.isdigit())
    return "Claude " + " ".join(name) + (f" {version}" if version else "")


def model_info(model: str) -> dict[str, object] | None:
    """The Models API's `ModelInfo` object for `model` (any alias or dated id), or None when unknown."""
    info = lookup(model)
    if info is None:
        return None
    family = info.family
    dates = _RETIRED.get(family) or _DEPRECATED.get(family) or (None, None)
    thinking = not family.startswith("claude-3-") or family == "claude-3-7-sonnet"
    modern = thinking and family not in ("claude-3-7-sonnet",)
    return {
        "type": "model",
        "id": family,
        "display_name": _display_name(family),
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": info.lifecycle,
        "deprecated_at": dates[0],
        "retires_at": dates[1],
        "line": next((x for x in _LINES if x in family), None),
        "max_input_tokens": info.max_input_tokens,
        "max_tokens": info.max_output_tokens,
        "capabilities": {
            "batch": _supported(info.batch),
            "citations": _supported(True),
            "code_execution": _supported(modern),
            "context_management": {"supported": modern},
            "effort": {"supported": modern, "low": _supported(modern), "medium": _supported(modern),
                       "high": _supported(modern), "max": _supported(modern)},
            "image_input": _supported(True),
            "pdf_input": _supported(True),
            "server_tools": {"supported": modern, "code_execution": _supported(modern), "web_search": _supported(modern)},
            "structured_outputs": _supported(info.structured_outputs),
            "thinking": {"supported": thinking, "types": {
                "adaptive": _supported(modern), "between_tools": _supported(False),
                "disabled": _supported(True), "enabled": _supported(thinking)}},
        },
    }


def catalog(lifecycles: tuple[str, ...] = ("active", "deprecated")) -> list[dict[str, object]]:
    """Every known family's `ModelInfo` in the given lifecycle stages, in the table's order (newest first)."""
    out = []
    for family in _FAMILIES:
        info = model_info(family)
        if info is not None and info["lifecycle"] in lifecycles:
            out.append(info)
    return out
