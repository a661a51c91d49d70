"""Known models: max output tokens and minimum cacheable prompt length.

Generous on purpose: aliases, dated snapshots (`<alias>-YYYYMMDD`, any date) and `-latest`
all resolve to the family. An id outside this table makes that one request `errored`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class ModelInfo:
    max_output_tokens: int
    cache_min_tokens: int  # the real API's minimum prefix length for a cache breakpoint


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


@lru_cache(maxsize=1024)  # called twice per request; a batch names one or a few models
def lookup(model: str) -> ModelInfo | None:
    """ModelInfo for an alias or dated id, or None when the model is unknown."""
    family = _SUFFIX.sub("", model)
    max_out = _FAMILIES.get(family)
    if max_out is None:
        return None
    cache_min = _CACHE_MIN_EXCEPTIONS.get(family) or (_HAIKU_CACHE_MIN if "haiku" in family else _OPUS_SONNET_CACHE_MIN)
    return ModelInfo(max_output_tokens=max_out, cache_min_tokens=cache_min)


def known_aliases() -> list[str]:
    return sorted(_FAMILIES)
