"""Usage -> cost, from genai-prices' price data times the batch discount.

genai-prices resolves a model name (dated snapshots included) to its prices; looking that up costs
about 0.2 ms, so each model is resolved once and the arithmetic on 50,000 rows is done here in
Decimal. Prices that depend on the request (tiers by context length) go through genai-prices'
own calculation instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import genai_prices

from batchinfer.domain import Costs, Usage

logger = logging.getLogger(__name__)

_MTOK = Decimal(1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per million tokens, at the live (undiscounted) rate."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None


class Pricing:
    """Prices models; ``prices`` overrides or adds models by exact name."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._overrides = dict(prices or {})
        self._resolved: dict[tuple[str, str], Price | Any | None] = {}

    def costs(self, provider: str, model: str, usage: Usage, *, discount: Decimal) -> Costs | None:
        """The cost of one response, or None when the model's price is unknown or no tokens."""
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        price = self._price(provider, model)
        if price is None:
            return None
        if isinstance(price, Price):
            costs = _apply(price, usage)
        else:
            calc = price.calc_price(
                genai_prices.Usage(
                    input_tokens=usage.prompt_tokens or 0,
                    cache_read_tokens=usage.cached_tokens or 0,
                    output_tokens=usage.completion_tokens or 0,
                )
            )
            costs = Costs(input=calc["input_price"], output=calc["output_price"])
        return Costs(input=costs.input * discount, output=costs.output * discount)

    def _price(self, provider: str, model: str) -> Price | Any | None:
        if model in self._overrides:
            return self._overrides[model]
        key = (provider, model)
        if key not in self._resolved:
            self._resolved[key] = _lookup(provider, model)
        return self._resolved[key]


def _lookup(provider: str, model: str) -> Price | Any | None:
    try:
        calc = genai_prices.calc_price(genai_prices.Usage(), model, provider_id=provider)
    except LookupError:
        logger.warning(
            "batchinfer.price_unknown",
            extra={"batchinfer.provider": provider, "batchinfer.model": model},
        )
        return None
    mp = calc.model_price
    inp, out, cached = mp.input_mtok, mp.output_mtok, mp.cache_read_mtok
    if (
        isinstance(inp, Decimal)
        and isinstance(out, Decimal | None)
        and isinstance(cached, Decimal | None)
    ):
        return Price(
            input_per_mtok=inp, output_per_mtok=out or Decimal(0), cached_input_per_mtok=cached
        )
    return mp


def _apply(price: Price, usage: Usage) -> Costs:
    prompt = usage.prompt_tokens or 0
    cached = min(usage.cached_tokens or 0, prompt)
    cached_rate = price.cached_input_per_mtok
    if cached_rate is None:
        cached_rate = price.input_per_mtok
    input_cost = ((prompt - cached) * price.input_per_mtok + cached * cached_rate) / _MTOK
    output_cost = (usage.completion_tokens or 0) * price.output_per_mtok / _MTOK
    return Costs(input=input_cost, output=output_cost)
