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

from .errors import ConfigError
from .jobs import quote_literal

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


def _price_struct(p: ModelPrice, discount: float) -> str:
    return (f"{{'input': {p.input!r}::DOUBLE, 'output': {p.output!r}::DOUBLE, 'write_5m': {p.write_5m!r}::DOUBLE, "
            f"'write_1h': {p.write_1h!r}::DOUBLE, 'read': {p.read!r}::DOUBLE, 'discount': {discount!r}::DOUBLE}}")


def _map_sql(entries: dict[str, str]) -> str:
    if not entries:
        return "NULL"
    return "MAP {" + ", ".join(f"{quote_literal(k)}: {v}" for k, v in sorted(entries.items())) + "}"


def price_sql(book: PriceBook, model: str, *, batch: bool = True) -> str:
    """SQL for the price STRUCT (input, output, write_5m, write_1h, read, discount) of the model named
    by the expression `model`, NULL when the book does not price it; the rules of `PriceBook.lookup`.

    The book is written into the statement as two MAP literals (every name it knows, and what a dated
    id `<name>-YYYYMMDD` it does not name resolves to), not joined as a table: DuckDB cannot estimate
    how many rows a result file holds, and a join would make it build its hash table from the results
    (answer text included) instead of from the few dozen prices."""
    discount = book.batch_discount if batch else 1.0  # synchronous calls pay standard prices
    names = set(book.models) | set(book.aliases)
    direct, stems = {}, {}
    for n in names:
        if (p := book.lookup(n)) is not None:
            direct[n] = _price_struct(p, discount)
        if (stem := book.models.get(book.aliases.get(n, n))) is not None:
            stems[n] = _price_struct(stem, discount)
    return (f"coalesce(({_map_sql(direct)})[{model}], "
            f"({_map_sql(stems)})[regexp_replace({model}, '-[0-9]{{8}}$', '')])")


def cost_sql(alias: str = "r", price: str = "price") -> str:
    """SQL for the billed cost (at the price's discount: batch or standard) of a response row `alias` whose price STRUCT (`price_sql`) is `price`."""
    r, p = alias, price
    return (
        f"CASE WHEN {r}.status IN ('succeeded', 'parse_failed') THEN "
        f"(coalesce({r}.input_tokens, 0) * {p}.input + coalesce({r}.output_tokens, 0) * {p}.output"
        f" + coalesce({r}.cache_creation_5m, 0) * {p}.input * {p}.write_5m"
        f" + coalesce({r}.cache_creation_1h, 0) * {p}.input * {p}.write_1h"
        f" + coalesce({r}.cache_read_input_tokens, 0) * {p}.input * {p}.read) / 1e6 * {p}.discount"
        f" ELSE 0 END"
    )
