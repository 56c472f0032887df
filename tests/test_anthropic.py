"""Anthropic's Message Batches end to end: the real emulator over loopback HTTP, real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    AnthropicProvider,
    AuthenticationError,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    InvalidRequestError,
    OpenAIProvider,
    PermanentProviderError,
)
from batchinfer.domain import SubmitKey
from batchinfer.testing import Emulator
from tests.helpers import MemoryCheckpoint, calls, chat_requests

MODEL = "claude-3-5-haiku-20241022"
MESSAGES = "/v1/messages"
CREATE = "/v1/messages/batches"
MTOK = Decimal(1_000_000)


def message_requests(n: int, *, prefix: str = "m", system: Any = None) -> list[dict[str, Any]]:
    requests = []
    for i in range(n):
        body: dict[str, Any] = {
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"question number {i} about batches"}],
        }
        if system is not None:
            body["system"] = system
        requests.append({"custom_id": f"{prefix}-{i}", "body": body, "metadata": {"i": i}})
    return requests


def provider(emulator: Emulator, **kwargs: Any) -> AnthropicProvider:
    return AnthropicProvider(
        api_key=emulator.api_key, base_url=emulator.anthropic_base_url, **kwargs
    )


@pytest.fixture
async def bi(engine: AsyncEngine, schema: str, emulator: Emulator) -> AsyncIterator[BatchInfer]:
    providers = [
        provider(emulator),
        OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url),
    ]
    async with BatchInfer(engine, providers=providers, schema=schema, poll_interval=0) as client:
        await client.migrate()
        yield client


async def create(bi: BatchInfer, requests: list[dict[str, Any]]) -> Any:
    return await bi.create_batch(
        provider="anthropic", endpoint=MESSAGES, model=MODEL, requests=requests
    )


def price(usage: genai_prices.Usage) -> tuple[Decimal, Decimal]:
    calc = genai_prices.calc_price(usage, MODEL, provider_id="anthropic")
    return calc.input_price * Decimal("0.5"), calc.output_price * Decimal("0.5")


async def test_a_batch_runs_end_to_end_with_errors_and_missing_entries(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_request("m-3", status=400, message="messages.0: bad content")
    emulator.drop_request("m-5")
    batch = await create(bi, message_requests(8))
    batch = await bi.submit_batch(batch)
    assert batch.status is BatchStatus.IN_PROGRESS
    assert batch.provider_batch_id is not None
    assert batch.provider_batch_id.startswith("msgbatch_")
    # The requests went inline, as Messages params with the batch's model filled in.
    [sent] = [r for r in emulator.received if r.method == "POST" and r.path == CREATE]
    assert sent.headers["x-api-key"] == emulator.api_key
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert calls(emulator, "POST", "/v1/files") == 0

    # Counts stay zero until the end, as Anthropic's do: nothing to apply yet.
    status = await bi.fetch_batch_status(batch)
    assert status is BatchStatus.IN_PROGRESS
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.COMPLETED
    assert done.provider_status == "ended"
    assert done.request_counts.total == 7  # the dropped one is in no count
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)

    rows = {c.custom_id: c async for c in bi.completions(done)}
    ok = rows["m-0"]
    assert ok.status is CompletionStatus.COMPLETED
    assert ok.output_text == "Echo: question number 0 about batches"
    assert ok.finish_reason == "end_turn"
    assert ok.metadata == {"i": 0}
    assert ok.response_body is not None
    assert ok.response_body["type"] == "message"
    assert ok.prompt_tokens is not None
    assert ok.completion_tokens == 6
    assert ok.total_tokens == ok.prompt_tokens + ok.completion_tokens
    expected = price(genai_prices.Usage(input_tokens=ok.prompt_tokens, output_tokens=6))
    assert (ok.input_cost, ok.output_cost) == expected

    failed = rows["m-3"]
    assert failed.status is CompletionStatus.FAILED
    assert failed.failure_error == "Anthropic batch entry errored: invalid_request_error"
    assert failed.failure_reason == "messages.0: bad content"
    missing = rows["m-5"]
    assert missing.status is CompletionStatus.FAILED
    assert missing.failure_reason is not None
    assert "not present in the batch's results" in missing.failure_reason
    assert done.total_cost == sum(c.total_cost or 0 for c in rows.values())
    assert bi.last_apply_report is not None
    assert (bi.last_apply_report.applied, bi.last_apply_report.swept) == (7, 1)


async def test_expired_batch_keeps_what_ran(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(await create(bi, message_requests(6)))
    assert batch.provider_batch_id is not None
    await emulator.process(batch.provider_batch_id, 2)
    await emulator.expire(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.EXPIRED
    by_status = (await bi.summary(done))["by_status"]
    assert by_status == {"completed": 2, "failed": 4}
    rows = [c async for c in bi.completions(done, status=CompletionStatus.FAILED)]
    assert {c.failure_error for c in rows} == {"Anthropic batch entry expired"}


async def test_cancelled_batch_keeps_what_ran(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(await create(bi, message_requests(5)))
    assert batch.provider_batch_id is not None
    await emulator.process(batch.provider_batch_id, 3)
    cancelling = await bi.cancel_batch(batch)
    assert cancelling is BatchStatus.CANCELLING
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.CANCELLED
    assert (await bi.summary(done))["by_status"] == {"completed": 3, "failed": 2}
    rows = [c async for c in bi.completions(done, status=CompletionStatus.FAILED)]
    assert {c.failure_error for c in rows} == {"Anthropic batch entry canceled"}


async def test_cancelling_an_ended_batch_says_so(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(await create(bi, message_requests(2)))
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    with pytest.raises(Exception, match="can no longer be cancelled"):
        await bi.cancel_batch(batch)
    assert (await bi.get_batch(batch)).status is BatchStatus.COMPLETED


async def test_cache_writes_and_reads_are_counted_and_priced(
    bi: BatchInfer, emulator: Emulator
) -> None:
    system = [
        {
            "type": "text",
            "text": "You answer questions. " * 40,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    batch = await bi.submit_batch(await create(bi, message_requests(3, system=system)))
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    rows = sorted([c async for c in bi.completions(done)], key=lambda c: c.custom_id)
    writes = [c.cache_write_tokens for c in rows]
    reads = [c.cached_tokens for c in rows]
    # The emulator runs them in line order: the first writes the cache, the others read it.
    assert writes[0]
    assert not writes[1]
    assert not writes[2]
    assert reads[1] == reads[2] == writes[0]
    assert not reads[0]
    for c in rows:
        assert c.prompt_tokens is not None
        assert c.cached_tokens is not None
        assert c.cache_write_tokens is not None
        assert c.completion_tokens is not None
        expected = price(
            genai_prices.Usage(
                input_tokens=c.prompt_tokens,
                cache_read_tokens=c.cached_tokens,
                cache_write_tokens=c.cache_write_tokens,
                output_tokens=c.completion_tokens,
            )
        )
        assert (c.input_cost, c.output_cost) == expected
    assert rows[0].input_cost is not None
    assert rows[1].input_cost is not None
    assert rows[0].input_cost > rows[1].input_cost  # a write costs more than a read
    assert (await bi.summary(done))["cache_write_tokens"] == writes[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens is required"),
        ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"max_tokens": 5}, "body.messages is required"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": True},
            "stream",
        ),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "model": "other"},
            "a batch uses one model",
        ),
    ],
)
async def test_bad_requests_are_refused_before_anything_is_written(
    bi: BatchInfer, engine: AsyncEngine, schema: str, body: dict[str, Any], message: str
) -> None:
    requests = message_requests(3)
    requests[1]["body"] = body
    with pytest.raises(InvalidRequestError, match=message) as info:
        await create(bi, requests)
    assert "requests[1]" in str(info.value)
    assert "m-1" in str(info.value)
    async with engine.connect() as conn:
        count = await conn.scalar(sa.text(f"SELECT count(*) FROM {schema}.batches"))
    assert count == 0


async def test_custom_ids_anthropic_refuses_are_refused_here(bi: BatchInfer) -> None:
    requests = message_requests(2)
    requests[1]["custom_id"] = "has a space"
    with pytest.raises(InvalidRequestError, match="letters, digits"):
        await create(bi, requests)


async def test_the_limits_are_anthropics_and_configurable(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    p = provider(emulator)
    assert (p.limits.max_requests, p.limits.max_bytes) == (100_000, 256 * 1024 * 1024)
    small = provider(
        emulator, limits=p.limits.__class__(endpoints=p.limits.endpoints, max_requests=2)
    )
    async with BatchInfer(engine, providers=[small], schema=schema) as bi:
        await bi.migrate()
        with pytest.raises(InvalidRequestError, match="at most 2 requests"):
            await create(bi, message_requests(3))
        with pytest.raises(InvalidRequestError, match="endpoint"):
            await bi.create_batch(
                provider="anthropic",
                endpoint="/v1/chat/completions",
                model=MODEL,
                requests=message_requests(1),
            )


async def test_overloaded_and_rate_limited_creates_are_retried(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", CREATE, 529)
    emulator.fail_http("POST", CREATE, 429, headers={"retry-after": "0"})
    batch = await bi.submit_batch(await create(bi, message_requests(2)))
    assert batch.status is BatchStatus.IN_PROGRESS
    assert calls(emulator, "POST", CREATE) == 3
    assert len(emulator._anthropic.batches) == 1


async def test_a_create_whose_answer_was_lost_is_adopted_not_repeated(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.lose_answer("POST", CREATE)
    batch = await bi.submit_batch(await create(bi, message_requests(4)))
    assert calls(emulator, "POST", CREATE) == 1
    assert list(emulator._anthropic.batches) == [batch.provider_batch_id]


async def test_a_submit_that_died_after_creating_reattaches(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    batch = await create(bi, message_requests(4))
    # As a submit killed after its create went out: the time noted, the batch made.
    noted = datetime.now(UTC).isoformat()
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"UPDATE {schema}.batches SET submit_state = "
                "jsonb_build_object('create_started_at', CAST(:t AS text)) WHERE id = :id"
            ),
            {"t": noted, "id": batch.id},
        )
    other = await bi.submit_batch(await create(bi, message_requests(3, prefix="x")))
    made = provider(emulator)
    first = await made.submit(
        _pages(message_requests(4)), key=_key(batch), checkpoint=MemoryCheckpoint()
    )
    await made.aclose()
    submitted = await bi.submit_batch(batch)
    assert submitted.provider_batch_id == first.id != other.provider_batch_id
    assert calls(emulator, "POST", CREATE) == 2  # the other batch's, and the dead submit's


async def test_two_candidates_are_a_possible_duplicate_reported_not_guessed(
    emulator: Emulator,
) -> None:
    p = provider(emulator)
    try:
        since = datetime.now(UTC)
        for _ in range(2):
            await p.submit(
                _pages(message_requests(3)), key=_key(None, 3), checkpoint=MemoryCheckpoint()
            )
        with pytest.raises(PermanentProviderError, match="2 Anthropic batches of 3 requests"):
            await p.find_created(_key(None, 3), since=since)
        assert await p.find_created(_key(None, 4), since=since) is None
    finally:
        await p.aclose()


async def test_a_dropped_results_download_resumes(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(await create(bi, message_requests(30)))
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    emulator.drop_connection(
        "GET", f"{CREATE}/{batch.provider_batch_id}/results", after_bytes=2_000
    )
    done = await bi.wait(batch)
    assert (await bi.summary(done))["by_status"] == {"completed": 30}
    ranged = [
        r
        for r in emulator.received
        if r.path.endswith("/results") and r.headers.get("Range") == "bytes=2000-"
    ]
    assert len(ranged) == 1


async def test_errors_read_anthropics_envelope(emulator: Emulator) -> None:
    p = AnthropicProvider(api_key="wrong", base_url=emulator.anthropic_base_url)
    try:
        with pytest.raises(AuthenticationError, match="invalid x-api-key") as info:
            await p.retrieve_batch("msgbatch_x")
        assert info.value.request_id is not None
        assert info.value.request_id.startswith("req_")
        assert info.value.code == "authentication_error"
    finally:
        await p.aclose()
    p = AnthropicProvider(api_key=emulator.api_key, base_url=emulator.anthropic_base_url + "/v1")
    try:
        with pytest.raises(Exception, match="Anthropic's has no /v1"):
            await p.retrieve_batch("msgbatch_x")
    finally:
        await p.aclose()


async def test_one_app_runs_batches_on_two_providers(bi: BatchInfer, emulator: Emulator) -> None:
    a = await bi.submit_batch(await create(bi, message_requests(2)))
    o = await bi.submit_batch(
        await bi.create_batch(
            provider="openai",
            endpoint="/v1/chat/completions",
            model="gpt-4o-mini",
            requests=chat_requests(2),
        )
    )
    for b in (a, o):
        assert b.provider_batch_id is not None
        await emulator.finish(b.provider_batch_id)
    done = [await bi.wait(b) for b in (a, o)]
    assert [d.provider for d in done] == ["anthropic", "openai"]
    assert [d.status for d in done] == [BatchStatus.COMPLETED] * 2
    assert all(d.total_cost and d.total_cost > 0 for d in done)


async def test_the_live_path_parses_and_prices_as_batches_do(
    bi: BatchInfer, emulator: Emulator
) -> None:
    tools = [
        {
            "name": "lookup",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    completion = await bi.complete(
        provider="anthropic",
        endpoint=MESSAGES,
        model=MODEL,
        body={"max_tokens": 20, "messages": [{"role": "user", "content": "hi"}], "tools": tools},
    )
    assert completion.status is CompletionStatus.COMPLETED
    assert completion.finish_reason == "tool_use"
    assert completion.tool_calls is not None
    assert completion.tool_calls[0]["name"] == "lookup"
    assert completion.tool_calls[0]["input"] == {"q": "echo"}
    assert completion.prompt_tokens is not None
    assert completion.completion_tokens is not None
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens
        ),
        MODEL,
        provider_id="anthropic",
    )
    assert (completion.input_cost, completion.output_cost) == (calc.input_price, calc.output_price)


# -- helpers ----------------------------------------------------------------------------------


def _key(batch: Any, total: int | None = None) -> SubmitKey:
    return SubmitKey(
        batch_id=batch.id if batch is not None else uuid.uuid4(),
        endpoint=MESSAGES,
        model=MODEL,
        request_total=batch.request_total if batch is not None else total or 0,
        input_bytes=0,
        created_at=datetime.now(UTC),
    )


def _pages(requests: list[dict[str, Any]]) -> Any:
    import orjson

    async def pages() -> AsyncIterator[list[tuple[str, bytes]]]:
        yield [(r["custom_id"], orjson.dumps({"model": MODEL, **r["body"]})) for r in requests]

    return pages


async def test_the_anthropic_sdk_in_strict_mode_accepts_every_answer(emulator: Emulator) -> None:
    """The official SDK, validating every response against its types, drives the emulator:
    create, retrieve, list, results (which follows the absolute results_url), cancel, delete
    and a live message, with succeeded, errored, canceled and expired lines."""
    import anthropic

    client = anthropic.AsyncAnthropic(
        api_key=emulator.api_key,
        base_url=emulator.anthropic_base_url,
        _strict_response_validation=True,
        max_retries=0,
    )
    params: Any = {
        "model": MODEL,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "hi"}],
    }
    emulator.fail_request("b", status=400, message="bad")
    async with client:
        batch = await client.messages.batches.create(
            requests=[{"custom_id": c, "params": params} for c in ("a", "b", "c")]
        )
        assert batch.processing_status == "in_progress"
        assert batch.request_counts.processing == 3
        await emulator.process(batch.id, 2)
        other = await client.messages.batches.create(
            requests=[{"custom_id": "z", "params": params}]
        )
        cancelled = await client.messages.batches.cancel(other.id)
        assert cancelled.processing_status == "canceling"
        listed = await client.messages.batches.list(limit=1)
        assert [b.id for b in listed.data] == [other.id]
        assert listed.has_more
        await emulator.expire(batch.id)
        await emulator.finish(other.id)
        ended = await client.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        assert ended.results_url is not None
        assert ended.request_counts.succeeded == 1
        assert ended.request_counts.expired == 1
        kinds = {
            r.custom_id: r.result.type
            async for r in await client.messages.batches.results(batch.id)
        }
        assert kinds == {"a": "succeeded", "b": "errored", "c": "expired"}
        [z] = [r async for r in await client.messages.batches.results(other.id)]
        assert z.result.type == "canceled"
        deleted = await client.messages.batches.delete(other.id)
        assert deleted.type == "message_batch_deleted"
        message = await client.messages.create(**params)
        assert message.content[0].type == "text"
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve(other.id)


async def test_a_worker_claims_only_batches_of_providers_it_knows(
    bi: BatchInfer, engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    """Two workers, one per provider, share one database: each drives its provider's batches
    and leaves the other's alone, with no failed steps."""
    anthropic_batch = await bi.create_batch(
        provider="anthropic",
        endpoint=MESSAGES,
        model=MODEL,
        requests=message_requests(3),
        submit=True,
    )
    openai_batch = await bi.create_batch(
        provider="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        requests=chat_requests(3),
        submit=True,
    )
    only_openai = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[only_openai], schema=schema) as other:
        assert await other.worker().run_once() == 1
    assert (await bi.get_batch(anthropic_batch)).provider_batch_id is None
    submitted = await bi.get_batch(openai_batch)
    assert submitted.provider_batch_id is not None
    assert submitted.step_failures == 0
    assert await bi.worker().run_once() == 1  # the Anthropic one; the OpenAI one is not due
    assert (await bi.get_batch(anthropic_batch)).provider_batch_id is not None
