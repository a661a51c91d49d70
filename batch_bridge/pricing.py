"""Prices as data, and the cost arithmetic.

Prices live in `prices.json` (standard USD per million tokens) and can be overridden by a user file.
Batch cost = standard cost x `batch_discount` (0.5) on every kind of token; cache writes cost 1.25x
(5 minutes) or 2x (1 hour) of base input, cache reads 0.1x, and these stack with the batch discount
(`../shared/reference/anthropic-message-batches-api.md` §6). Only `succeeded` answers are billed (and
`parse_failed`, which is a succeeded answer we could not use). An unknown model has an unknown cost:
NULL in SQL, None in Python, never zero.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from .errors import ConfigError

_DATE_SUFFIX = re.compile(r"-\d{8}$")


@dataclass(frozen=True)
class ModelPrice:
    model: str
    input: float  # USD per million input tokens, standard
    output: float
    write_5m: float  # multipliers of input
    write_1h: float
    read: float
    min_cache_tokens: int


@dataclass(frozen=True)
class PriceBook:
    batch_discount: float
    models: dict[str, ModelPrice]
    aliases: dict[str, str]

    def lookup(self, model: str) -> ModelPrice | None:
        name = self.aliases.get(model, model)
        if name not in self.models:
            name = _DATE_SUFFIX.sub("", name)
            name = self.aliases.get(name, name)
        return self.models.get(name)

    def cost(
        self, model: str, *, input_tokens: float, output_tokens: float, cache_5m: float = 0,
        cache_1h: float = 0, cache_read: float = 0, batch: bool = True,
    ) -> float | None:
        p = self.lookup(model)
        if p is None:
            return None
        usd = (
            input_tokens * p.input
            + output_tokens * p.output
            + cache_5m * p.input * p.write_5m
            + cache_1h * p.input * p.write_1h
            + cache_read * p.input * p.read
        ) / 1e6
        return usd * (self.batch_discount if batch else 1.0)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@lru_cache(maxsize=8)
def load_prices(override: Path | None = None) -> PriceBook:
    data = json.loads(resources.files("batch_bridge").joinpath("prices.json").read_text())
    if override is not None:
        try:
            data = _merge(data, json.loads(Path(override).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"BATCH_BRIDGE_PRICES={override}: cannot read a price file: {e}") from e
    mult = data.get("cache_multipliers", {})
    models = {}
    for name, m in data.get("models", {}).items():
        try:
            models[name] = ModelPrice(
                model=name,
                input=float(m["input"]),
                output=float(m["output"]),
                write_5m=float(m.get("cache_write_5m_multiplier", mult.get("write_5m", 1.25))),
                write_1h=float(m.get("cache_write_1h_multiplier", mult.get("write_1h", 2.0))),
                read=float(m.get("cache_read_multiplier", mult.get("read", 0.1))),
                min_cache_tokens=int(m.get("min_cache_tokens", 1024)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"price file: model {name!r} needs numeric input and output prices ({e})") from e
    return PriceBook(float(data.get("batch_discount", 0.5)), models, dict(data.get("aliases", {})))


def register_prices(con: duckdb.DuckDBPyConnection, book: PriceBook) -> None:
    """A temp table `bb_prices(model, ...)`, one row per priced model, for set-wise cost."""
    rows = list(book.models.items())
    con.execute(
        "CREATE OR REPLACE TEMP TABLE bb_prices (model VARCHAR, input DOUBLE, output DOUBLE, "
        "write_5m DOUBLE, write_1h DOUBLE, read DOUBLE, discount DOUBLE)"
    )
    con.executemany(  # a few dozen price rows, not data rows
        "INSERT INTO bb_prices VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(n, p.input, p.output, p.write_5m, p.write_1h, p.read, book.batch_discount) for n, p in rows],
    )


def cost_sql(alias: str = "r", prices: str = "p") -> str:
    """SQL for the billed batch cost of a response row `alias` joined to `bb_prices` as `prices`."""
    r, p = alias, prices
    return (
        f"CASE WHEN {r}.status IN ('succeeded', 'parse_failed') THEN "
        f"(coalesce({r}.input_tokens, 0) * {p}.input + coalesce({r}.output_tokens, 0) * {p}.output"
        f" + coalesce({r}.cache_creation_5m, 0) * {p}.input * {p}.write_5m"
        f" + coalesce({r}.cache_creation_1h, 0) * {p}.input * {p}.write_1h"
        f" + coalesce({r}.cache_read_input_tokens, 0) * {p}.input * {p}.read) / 1e6 * {p}.discount"
        f" ELSE 0 END"
    )


def register_price_names(con: duckdb.DuckDBPyConnection, book: PriceBook) -> None:
    """Temp table `bb_model_price(model, price_model, stem_price_model)` for every name the price book knows.

    `price_model` is `book.lookup(name)`; `stem_price_model` is what a dated id `<name>-YYYYMMDD` the
    book does not name resolves to. Set up front, so the load needs no pass over the results to find
    their models first; the load's join applies the same rules as `PriceBook.lookup`."""
    names = set(book.models) | set(book.aliases)
    rows = []
    for n in sorted(names):
        p = book.lookup(n)
        stem = book.models.get(book.aliases.get(n, n))
        rows.append((n, p.model if p else None, stem.model if stem else None))
    con.execute("CREATE OR REPLACE TEMP TABLE bb_model_price (model VARCHAR, price_model VARCHAR, stem_price_model VARCHAR)")
    con.executemany("INSERT INTO bb_model_price VALUES (?, ?, ?)", rows)  # a few dozen names, not data rows
