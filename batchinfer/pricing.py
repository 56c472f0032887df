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

from batchinfer.domain import Costs, Pricer, Usage

logger = logging.getLogger(__name__)

_MTOK = Decimal(1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per million tokens, at the live (undiscounted) rate."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    #: Prompt tokens read from the cache; None: at the input rate.
    cached_input_per_mtok: Decimal | None = None
    #: Prompt tokens written to the cache; None: at the input rate.
    cache_write_per_mtok: Decimal | None = None

    def __post_init__(self) -> None:
        # Prices are often written as floats or strings; costs are Decimal, never float.
        for name in (
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Decimal):
                try:
                    object.__setattr__(self, name, Decimal(str(value)))
                except ArithmeticError:
                    raise ValueError(f"Price.{name} must be a number, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class _Rates:
    """USD per token, discount applied: three multiplications a row, no division."""

    input: Decimal
    cached: Decimal
    written: Decimal
    output: Decimal


class Pricing:
    """Prices models; ``prices`` overrides or adds models by exact name."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._overrides = dict(prices or {})
        self._resolved: dict[tuple[str, str], Price | Any | None] = {}
        self._rates: dict[tuple[str, str, Decimal], _Rates | None] = {}

    def has_override(self, model: str) -> bool:
        return model in self._overrides

    def costs(self, provider: str, model: str, usage: Usage, *, discount: Decimal) -> Costs | None:
        """The cost of one response, or None when the model's price is unknown or no tokens."""
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        key = (provider, model, discount)
        if key not in self._rates:
            self._rates[key] = self._flat_rates(provider, model, discount)
        rates = self._rates[key]
        if rates is not None:
            prompt = usage.prompt_tokens or 0
            cached = min(usage.cached_tokens or 0, prompt)
            written = min(usage.cache_write_tokens or 0, prompt - cached)
            uncached = (prompt - cached - written) * rates.input + cached * rates.cached
            return Costs(
                input=uncached + written * rates.written if written else uncached,
                output=(usage.completion_tokens or 0) * rates.output,
            )
        price = self._price(provider, model)
        if price is None or isinstance(price, Price):
            return None
        # Prices that vary by request (tiers) go through genai-prices' own calculation.
        calc = price.calc_price(
            genai_prices.Usage(
                input_tokens=usage.prompt_tokens or 0,
                cache_read_tokens=usage.cached_tokens or 0,
                cache_write_tokens=usage.cache_write_tokens or 0,
                output_tokens=usage.completion_tokens or 0,
            )
        )
        return Costs(input=calc["input_price"] * discount, output=calc["output_price"] * discount)

    def pricer(self, provider: str, model: str, discount: Decimal) -> Pricer:
        """Prices responses times ``discount``: by ``model`` when the caller set its price,
        else by the (often dated) model each response names, else by ``model``."""

        def price(named: str | None, usage: Usage) -> Costs | None:
            try:
                if named and named != model and not self.has_override(model):
                    costs = self.costs(provider, named, usage, discount=discount)
                    if costs is not None:
                        return costs
                return self.costs(provider, model, usage, discount=discount)
            except Exception:
                # A price table problem must not cost the result; the row just has no cost.
                logger.warning(
                    "batchinfer.pricing_failed %s %s: no cost recorded",
                    provider,
                    model,
                    exc_info=True,
                    extra={"batchinfer.event": "pricing_failed", "batchinfer.model": model},
                )
                return None

        return price

    def _flat_rates(self, provider: str, model: str, discount: Decimal) -> _Rates | None:
        price = self._price(provider, model)
        if not isinstance(price, Price):
            return None
        cached = price.cached_input_per_mtok
        if cached is None:
            cached = price.input_per_mtok
        written = price.cache_write_per_mtok
        if written is None:
            written = price.input_per_mtok
        return _Rates(
            input=price.input_per_mtok * discount / _MTOK,
            cached=cached * discount / _MTOK,
            written=written * discount / _MTOK,
            output=price.output_per_mtok * discount / _MTOK,
        )

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
            "batchinfer.price_unknown %s %s: no price known; results priced by this name get no "
            "cost (pass prices= to set one)",
            provider,
            model,
            extra={
                "batchinfer.event": "price_unknown",
                "batchinfer.provider": provider,
                "batchinfer.model": model,
            },
        )
        return None
    mp = calc.model_price
    inp, out = mp.input_mtok, mp.output_mtok
    cached, written = mp.cache_read_mtok, mp.cache_write_mtok
    if (
        isinstance(inp, Decimal)
        and isinstance(out, Decimal | None)
        and isinstance(cached, Decimal | None)
        and isinstance(written, Decimal | None)
    ):
        return Price(
            input_per_mtok=inp,
            output_per_mtok=out or Decimal(0),
            cached_input_per_mtok=cached,
            cache_write_per_mtok=written,
        )
    return mp
