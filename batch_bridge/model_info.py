"""What the Models API says of a model, kept in the bridge's state for an hour.

A preflight asks for the model of every job before each submission and each plan; an hourly
schedule would ask the same question every hour for the same answer, so answers are kept in
`model_info` (keyed by the API's base URL too: the emulator and the real API may disagree) and asked
again only once they are older than `MAX_AGE`. Only what the bridge checks is kept, in the API's words.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb

from . import state

MAX_AGE = timedelta(hours=1)
REAL_API = "https://api.anthropic.com"


@dataclass(frozen=True)
class ModelFacts:
    """The fields of a `ModelInfo` the preflight checks."""

    id: str
    display_name: str
    lifecycle: str  # active | deprecated | retired
    deprecated_at: str | None  # ISO 8601
    retires_at: str | None
    max_tokens: int | None  # the highest max_tokens a request may ask for
    max_input_tokens: int | None  # the context window
    batch: bool | None  # capabilities.batch.supported (None: the API did not say)
    structured_outputs: bool | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelFacts":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


def _day(d: datetime | None) -> str | None:
    return d.date().isoformat() if d is not None else None


def facts_of(info: Any) -> ModelFacts:
    """ModelFacts of the SDK's `ModelInfo` (read by attribute, so no SDK import is needed here)."""
    caps = getattr(info, "capabilities", None)

    def supported(name: str) -> bool | None:
        cap = getattr(caps, name, None) if caps is not None else None
        return None if cap is None else bool(cap.supported)

    return ModelFacts(
        id=info.id, display_name=info.display_name, lifecycle=info.lifecycle,
        deprecated_at=_day(info.deprecated_at), retires_at=_day(info.retires_at),
        max_tokens=info.max_tokens, max_input_tokens=info.max_input_tokens,
        batch=supported("batch"), structured_outputs=supported("structured_outputs"),
    )


def cached(
    con: duckdb.DuckDBPyConnection, base_url: str | None, model: str, max_age: timedelta | None = MAX_AGE,
) -> tuple[ModelFacts, datetime] | None:
    """The kept answer for `model` and when it was fetched, when younger than `max_age` (None: any age)."""
    since = state.utcnow() - max_age if max_age is not None else datetime.min
    row = con.execute(
        "SELECT info, fetched_at FROM bb_state.model_info WHERE api = ? AND model = ? AND fetched_at >= ?",
        [base_url or REAL_API, model, since],
    ).fetchone()
    return (ModelFacts.from_json(json.loads(row[0])), row[1]) if row else None


def keep(con: duckdb.DuckDBPyConnection, base_url: str | None, model: str, facts: ModelFacts) -> None:
    con.execute(
        "INSERT OR REPLACE INTO bb_state.model_info VALUES (?, ?, ?, ?)",
        [base_url or REAL_API, model, json.dumps(facts.to_json()), state.utcnow()],
    )
