from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    Completion,
    CompletionStatus,
    OpenAIProvider,
    Price,
    Usage,
)
from batchinfer.domain import Costs
from batchinfer.pricing import Pricing
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MTOK = Decimal(1_000_000)
HALF = Decimal("0.5")

# gpt-4o-mini at the live rate, USD per million tokens (genai-prices).
MINI = Price(
    input_per_mtok=Decimal("0.15"),
    output_per_mtok=Decimal("0.60"),
    cached_input_per_mtok=Decimal("0.075"),
)


def expected_costs(c: Completion, price: Price, discount: Decimal) -> Costs:
    assert c.prompt_tokens is not None
    assert c.completion_tokens is not None
    cached = c.cached_tokens or 0
    cached_rate = price.cached_input_per_mtok
    if cached_rate is None:
        cached_rate = price.input_per_mtok
    inp = ((c.prompt_tokens - cached) * price.input_per_mtok + cached * cached_rate) / MTOK
    out = c.completion_tokens * price.output_per_mtok / MTOK
    return Costs(input=inp * discount, output=out * discount)


def assert_costs(c: Completion, price: Price, discount: Decimal) -> None:
    want = expected_costs(c, price, discount)
    assert c.input_cost == want.input, c.custom_id
    assert c.output_cost == want.output, c.custom_id
    assert c.total_cost == want.input + want.output, c.custom_id


@asynccontextmanager
async def make_bi(
    engine: AsyncEngine,
    schema: str,
    emulator: Emulator,
    *,
    discount: str | None = None,
    prices: Mapping[str, Price] | None = None,
) -> AsyncIterator[BatchInfer]:
    kwargs: dict[str, Any] = {} if discount is None else {"batch_discount": discount}
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url, **kwargs)
    async with BatchInfer(engine, providers=[provider], schema=schema, prices=prices) as client:
        await client.migrate()
        yield client


async def run(
    bi: BatchInfer, emulator: Emulator, requests: list[dict[str, Any]], *, model: str
) -> tuple[Batch, list[Completion]]:
    batch = await bi.create_batch(provider="openai", endpoint=CHAT, model=model, requests=requests)
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    batch = await bi.wait(batch)
    assert batch.status is BatchStatus.COMPLETED
    return batch, [c async for c in bi.completions(batch)]


def long_request(custom_id: str, words: int = 1500) -> dict[str, Any]:
    text = " ".join(f"token{i % 97}" for i in range(words))
    return {"custom_id": custom_id, "body": {"messages": [{"role": "user", "content": text}]}}


# -- unit tests of Pricing --------------------------------------------------------------------


def test_known_usage_exact_values() -> None:
    costs = Pricing().costs(
        "openai",
        "gpt-4o-mini",
        Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500, cached_tokens=0),
        discount=HALF,
    )
    assert costs == Costs(input=Decimal("0.000075"), output=Decimal("0.00015"))
    assert costs is not None
    assert costs.total == Decimal("0.000225")


def test_cached_tokens_priced_at_cached_rate() -> None:
    costs = Pricing().costs(
        "openai",
        "gpt-4o-mini",
        Usage(prompt_tokens=2048, completion_tokens=100, cached_tokens=1024),
        discount=HALF,
    )
    # (1024 * 0.15 + 1024 * 0.075) / 1e6 * 0.5 and 100 * 0.60 / 1e6 * 0.5
    assert costs == Costs(input=Decimal("0.0001152"), output=Decimal("0.00003"))


def test_dated_snapshot_resolves_to_the_same_price() -> None:
    usage = Usage(prompt_tokens=777, completion_tokens=33, cached_tokens=0)
    pricing = Pricing()
    base = pricing.costs("openai", "gpt-4o-mini", usage, discount=HALF)
    dated = pricing.costs("openai", "gpt-4o-mini-2024-07-18", usage, discount=HALF)
    assert base is not None
    assert dated == base


def test_unknown_model_has_no_cost(caplog: pytest.LogCaptureFixture) -> None:
    pricing = Pricing()
    usage = Usage(prompt_tokens=10, completion_tokens=5)
    assert pricing.costs("openai", "unknown-model-x", usage, discount=HALF) is None
    assert pricing.costs("openai", "unknown-model-x", usage, discount=HALF) is None
    warnings = [r for r in caplog.records if r.getMessage().startswith("batchinfer.price_unknown")]
    assert len(warnings) == 1  # resolved once, then remembered
    assert warnings[0].__dict__["batchinfer.model"] == "unknown-model-x"


def test_no_tokens_no_cost() -> None:
    assert Pricing().costs("openai", "gpt-4o-mini", Usage(), discount=HALF) is None


def test_override_wins_over_genai_prices() -> None:
    mine = Price(input_per_mtok=Decimal(10), output_per_mtok=Decimal(20))
    pricing = Pricing({"gpt-4o-mini": mine, "my-model": mine})
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=500)
    want = Costs(input=Decimal("0.01"), output=Decimal("0.002"))  # no cached rate: full price
    assert pricing.costs("openai", "gpt-4o-mini", usage, discount=Decimal(1)) == want
    assert pricing.costs("openai", "my-model", usage, discount=Decimal(1)) == want


def test_cached_tokens_never_exceed_prompt() -> None:
    costs = Pricing({"m": MINI}).costs(
        "openai",
        "m",
        Usage(prompt_tokens=100, completion_tokens=0, cached_tokens=1000),
        discount=Decimal(1),
    )
    assert costs == Costs(input=Decimal("0.0000075"), output=Decimal(0))


def test_embedding_model_has_input_cost_only() -> None:
    costs = Pricing().costs(
        "openai",
        "text-embedding-3-small",
        Usage(prompt_tokens=1000, total_tokens=1000),
        discount=HALF,
    )
    assert costs == Costs(input=Decimal("0.00001"), output=Decimal(0))


def test_tiered_model_goes_through_genai_prices() -> None:
    usage = Usage(prompt_tokens=300_000, completion_tokens=1_000, cached_tokens=0)
    costs = Pricing().costs("openai", "gpt-5.4", usage, discount=HALF)
    calc = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=300_000, cache_read_tokens=0, output_tokens=1_000),
        "gpt-5.4",
        provider_id="openai",
    )
    assert costs == Costs(input=calc.input_price * HALF, output=calc.output_price * HALF)
    assert costs is not None
    assert costs.input > 0


# -- costs stored by the batch path -----------------------------------------------------------


async def test_per_completion_costs_gpt_4o_mini(bi: BatchInfer, emulator: Emulator) -> None:
    requests = [*chat_requests(4, words=30), long_request("long")]
    _, comps = await run(bi, emulator, requests, model="gpt-4o-mini")
    for c in comps:
        assert c.status is CompletionStatus.COMPLETED
        assert c.prompt_tokens
        assert c.completion_tokens
        assert_costs(c, MINI, HALF)
    q0 = comps[0]
    assert q0.cached_tokens == 0
    assert q0.input_cost == q0.prompt_tokens * Decimal("0.15") / MTOK * HALF  # type: ignore[operator]


async def test_cached_tokens_cost_less(bi: BatchInfer, emulator: Emulator) -> None:
    _, comps = await run(bi, emulator, [long_request("long")], model="gpt-4o-mini")
    (c,) = comps
    assert c.prompt_tokens is not None
    assert c.cached_tokens is not None
    assert c.cached_tokens >= 1024
    uncached = c.prompt_tokens - c.cached_tokens
    want = (uncached * Decimal("0.15") + c.cached_tokens * Decimal("0.075")) / MTOK * HALF
    assert c.input_cost == want
    full = c.prompt_tokens * Decimal("0.15") / MTOK * HALF
    assert c.input_cost < full


async def test_batch_discount_is_configurable(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    async with make_bi(engine, schema, emulator, discount="0.25") as bi:
        _, comps = await run(
            bi, emulator, [*chat_requests(3), long_request("long")], model="gpt-4o-mini"
        )
    for c in comps:
        assert_costs(c, MINI, Decimal("0.25"))
        half = expected_costs(c, MINI, HALF)
        assert c.total_cost == (half.input + half.output) / 2


async def test_prices_follow_the_pricing_id_not_the_registered_name(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    """A second OpenAI account registered as "openai-eu" is still priced as OpenAI; one whose
    pricing id genai-prices does not know gets tokens and no cost."""
    eu = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url, name="openai-eu")
    odd = OpenAIProvider(
        api_key=emulator.api_key, base_url=emulator.base_url, name="odd", pricing_id="no-such"
    )
    async with BatchInfer(engine, providers=[eu, odd], schema=schema) as bi:
        await bi.migrate()
        for name in ("openai-eu", "odd"):
            batch = await bi.create_batch(
                provider=name, endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
            )
            batch = await bi.submit_batch(batch)
            await emulator.finish(batch.provider_batch_id or "")
            await bi.wait(batch, poll_interval=0)
            comps = [c async for c in bi.completions(batch)]
            assert [c.status for c in comps] == [CompletionStatus.COMPLETED] * 2
            for c in comps:
                if name == "odd":
                    assert c.prompt_tokens
                    assert c.total_cost is None
                else:
                    assert_costs(c, MINI, HALF)
        live = await bi.complete(
            provider="openai-eu",
            endpoint=CHAT,
            model="gpt-4o-mini",
            body={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert live.total_cost is not None
        assert live.total_cost > 0


async def test_price_override_used(engine: AsyncEngine, schema: str, emulator: Emulator) -> None:
    mine = Price(
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("7"),
        cached_input_per_mtok=Decimal("1"),
    )
    async with make_bi(engine, schema, emulator, prices={"my-model": mine}) as bi:
        batch, comps = await run(
            bi, emulator, [*chat_requests(2), long_request("long")], model="my-model"
        )
    assert any(c.cached_tokens for c in comps)
    for c in comps:
        assert_costs(c, mine, HALF)
    assert batch.total_cost == sum(c.total_cost for c in comps if c.total_cost is not None)


async def test_unknown_model_stores_tokens_without_cost(bi: BatchInfer, emulator: Emulator) -> None:
    batch, comps = await run(bi, emulator, chat_requests(3), model="unknown-model-x")
    for c in comps:
        assert c.status is CompletionStatus.COMPLETED
        assert c.prompt_tokens is not None
        assert c.prompt_tokens > 0
        assert c.completion_tokens is not None
        assert c.completion_tokens > 0
        assert c.input_cost is None
        assert c.output_cost is None
        assert c.total_cost is None
    assert batch.input_cost is None
    assert batch.output_cost is None
    assert batch.total_cost is None
    summary = await bi.summary(batch)
    assert summary["prompt_tokens"] == sum(c.prompt_tokens or 0 for c in comps)


async def test_reasoning_tokens_are_billed_as_output(bi: BatchInfer, emulator: Emulator) -> None:
    _, comps = await run(bi, emulator, chat_requests(2), model="o3-mini")
    o3 = Price(
        input_per_mtok=Decimal("1.1"),
        output_per_mtok=Decimal("4.4"),
        cached_input_per_mtok=Decimal("0.55"),
    )
    for c in comps:
        assert c.reasoning_tokens
        assert c.completion_tokens is not None
        assert c.completion_tokens > c.reasoning_tokens
        assert_costs(c, o3, HALF)


async def test_batch_costs_are_sums_of_children(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    emulator.fail_request("q1", message="nope")
    emulator.drop_request("q3")
    batch, comps = await run(
        bi, emulator, [*chat_requests(6, words=12), long_request("long")], model="gpt-4o-mini"
    )
    priced = [c for c in comps if c.status is CompletionStatus.COMPLETED]
    failed = [c for c in comps if c.status is CompletionStatus.FAILED]
    assert {c.custom_id for c in failed} == {"q1", "q3"}
    for c in failed:
        assert c.input_cost is None
        assert c.output_cost is None
        assert c.total_cost is None

    assert batch.input_cost == sum(c.input_cost for c in priced if c.input_cost is not None)
    assert batch.output_cost == sum(c.output_cost for c in priced if c.output_cost is not None)
    assert batch.total_cost == sum(c.total_cost for c in priced if c.total_cost is not None)
    assert batch.total_cost is not None
    assert batch.input_cost is not None
    assert batch.output_cost is not None
    assert batch.total_cost == batch.input_cost + batch.output_cost
    assert batch.total_cost > 0

    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    f'SELECT sum(input_cost), sum(output_cost), sum(total_cost) FROM "{schema}"'
                    ".completions WHERE batch_id = :b"
                ),
                {"b": batch.id},
            )
        ).one()
    assert tuple(row) == (batch.input_cost, batch.output_cost, batch.total_cost)
    assert await bi.get_batch(batch) == batch


def test_cache_writes_are_priced_at_their_own_rate() -> None:
    price = Price(
        input_per_mtok="3",
        output_per_mtok="15",
        cached_input_per_mtok="0.3",
        cache_write_per_mtok="3.75",
    )
    pricer = Pricing({"m": price}).pricer("anthropic", "m", HALF)
    usage = Usage(
        prompt_tokens=2000, cached_tokens=500, cache_write_tokens=1000, completion_tokens=100
    )
    costs = pricer("m", usage)
    assert costs is not None
    assert costs.input == (500 * 3 + 500 * Decimal("0.3") + 1000 * Decimal("3.75")) / MTOK * HALF
    assert costs.output == 100 * 15 / MTOK * HALF
    # No write rate given: written tokens cost what plain input does.
    plain = Pricing({"m": Price(input_per_mtok="3", output_per_mtok="15")}).pricer("x", "m", HALF)
    assert plain("m", usage) == Costs(input=2000 * 3 / MTOK * HALF, output=100 * 15 / MTOK * HALF)


def test_cache_writes_agree_with_genai_prices_own_calculation() -> None:
    """The convention (prompt tokens include cache reads and writes) is genai-prices' own."""
    usage = Usage(
        prompt_tokens=2000, cached_tokens=300, cache_write_tokens=1000, completion_tokens=50
    )
    ours = Pricing().pricer("anthropic", "claude-sonnet-4-5", Decimal(1))(None, usage)
    theirs = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=2000, cache_read_tokens=300, cache_write_tokens=1000, output_tokens=50
        ),
        "claude-sonnet-4-5",
        provider_id="anthropic",
    )
    assert ours is not None
    assert ours.input == theirs.input_price
    assert ours.output == theirs.output_price
    assert ours.input > (2000 - 300) * Decimal(3) / MTOK  # writes cost more than plain input


async def test_cache_write_tokens_are_stored_and_summed(bi: BatchInfer) -> None:
    from batchinfer.domain import ParsedResponse, ResultOutcome
    from batchinfer.storage.rows import RESULT_FIELDS, outcome_values

    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
    )
    usage = Usage(prompt_tokens=900, cached_tokens=100, cache_write_tokens=700, completion_tokens=9)
    outcomes = [
        ResultOutcome(
            custom_id=f"q{i}",
            status=CompletionStatus.COMPLETED,
            response=ParsedResponse(body={"ok": i}, output_text="ok", usage=usage),
            status_code=200,
            costs=Costs(input=Decimal("0.001"), output=Decimal("0.002")),
        )
        for i in range(2)
    ]
    # Every field an outcome is flattened into has its column, and the statement writes them all.
    assert len(outcome_values(outcomes[0])) == len(RESULT_FIELDS)
    result = await bi._store.results.apply_outcomes(batch.id, outcomes)
    assert result.applied == 2
    comps = [c async for c in bi.completions(batch)]
    assert [c.cache_write_tokens for c in comps] == [700, 700]
    assert [c.total_cost for c in comps] == [Decimal("0.003")] * 2
    assert (await bi.summary(batch))["cache_write_tokens"] == 1400
