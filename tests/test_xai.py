"""xAI's batches: a container filled page by page, results applied as they arrive, xAI's own
cost per request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    ProviderRejectedError,
    XAIProvider,
)
from batchinfer.domain import SubmitKey
from batchinfer.testing import Emulator, FakeClock
from tests.helpers import MemoryCheckpoint, chat_requests

CHAT = "/v1/chat/completions"
MODEL = "grok-4"


def provider(emulator: Emulator, **kwargs: Any) -> XAIProvider:
    return XAIProvider(api_key=emulator.api_key, base_url=emulator.xai_base_url, **kwargs)


@pytest.fixture
async def bi(engine: AsyncEngine, schema: str, emulator: Emulator) -> AsyncIterator[BatchInfer]:
    async with BatchInfer(
        engine, providers=[provider(emulator, page_size=4)], schema=schema, poll_interval=0
    ) as client:
        await client.migrate()
        yield client


def adds(emulator: Emulator) -> int:
    return sum(1 for m, p in emulator.requests if m == "POST" and p.endswith("/requests"))


async def test_requests_go_in_pages_and_results_arrive_while_it_runs(
    bi: BatchInfer, emulator: Emulator
) -> None:
    clock = FakeClock()
    batch = await bi.create_batch(
        provider="xai", endpoint=CHAT, model=MODEL, requests=chat_requests(10), submit=True
    )
    worker = bi.worker(poll_schedule=(10,), clock=clock)
    assert await worker.run_once() == 1
    submitted = await bi.get_batch(batch)
    assert submitted.status is BatchStatus.IN_PROGRESS
    assert adds(emulator) == 3  # 4 + 4 + 2
    pb = submitted.provider_batch_id
    assert pb is not None

    await emulator.process(pb, 4)
    clock.advance(10)
    assert await worker.run_once() == 1
    running = await bi.get_batch(batch)
    assert running.status is BatchStatus.IN_PROGRESS
    assert running.results_applied_at is None
    summary = (await bi.summary(batch))["by_status"]
    assert summary == {"completed": 4, "submitted": 6}

    await emulator.finish(pb)
    clock.advance(10)
    assert await worker.run_once() == 1
    done = await bi.get_batch(batch)
    assert done.status is BatchStatus.COMPLETED
    assert done.provider_status == "done"
    assert (await bi.summary(batch))["by_status"] == {"completed": 10}


async def test_the_cost_is_xais_own(engine: AsyncEngine, schema: str, emulator: Emulator) -> None:
    """Each success says what it cost (ticks of 1e-10 USD); that is what is recorded, split
    between input and output as the price table would. Reasoning tokens are completion tokens
    here, as batchinfer counts them, though xAI counts them apart."""
    async with BatchInfer(
        engine, providers=[provider(emulator)], schema=schema, poll_interval=0
    ) as bi:
        await bi.migrate()
        reasoning = "grok-4-fast-reasoning"
        batch = await bi.create_batch(
            provider="xai", endpoint=CHAT, model=reasoning, requests=chat_requests(3)
        )
        batch = await bi.submit_batch(batch)
        await emulator.finish(batch.provider_batch_id)
        done = await bi.wait(batch)
        rows = [c async for c in bi.completions(done)]
    for c in rows:
        assert c.response_body is not None
        usage = c.response_body["usage"]
        visible, thought = (
            usage["completion_tokens"],
            usage["completion_tokens_details"]["reasoning_tokens"],
        )
        assert thought == 2 * visible
        assert c.completion_tokens == visible + thought
        assert c.reasoning_tokens == thought
        assert c.total_tokens == usage["total_tokens"]
        assert c.total_cost == Decimal(usage["cost_in_usd_ticks"]) * Decimal("1e-10")
        assert c.input_cost is not None
        assert c.output_cost is not None
        assert c.input_cost > 0
        assert c.output_cost > 0
    assert done.total_cost == sum(c.total_cost or 0 for c in rows)


async def test_a_submit_that_died_half_way_adds_only_the_rest(emulator: Emulator) -> None:
    p = provider(emulator, page_size=2)
    requests = chat_requests(5)
    bodies = [(r["custom_id"], orjson.dumps({"model": MODEL, **r["body"]})) for r in requests]
    key = SubmitKey(
        batch_id=uuid.uuid4(),
        endpoint=CHAT,
        model=MODEL,
        request_total=5,
        input_bytes=0,
        created_at=datetime.now(UTC),
    )
    checkpoint = MemoryCheckpoint()

    async def dying() -> AsyncIterator[list[tuple[str, bytes]]]:
        yield bodies[:2]
        raise ConnectionResetError("the database went away")

    async def whole() -> AsyncIterator[list[tuple[str, bytes]]]:
        yield bodies[:2]
        yield bodies[2:]

    try:
        with pytest.raises(ConnectionResetError):
            await p.submit(dying, key=key, checkpoint=checkpoint)
        assert checkpoint.values["added"] == "2"
        assert adds(emulator) == 1
        # The next try finds the container in its notes and adds the other three, in two calls.
        pb = await p.submit(whole, key=key, checkpoint=checkpoint)
        assert adds(emulator) == 3
        assert pb.request_counts.total == 5
        assert checkpoint.inputs == []  # requests go inline: no file
        # With the notes lost as well, the container is found by name; re-adding is harmless.
        again = await p.submit(whole, key=key, checkpoint=MemoryCheckpoint())
        assert again.id == pb.id
        assert len(emulator._xai.batches) == 1
        assert again.request_counts.total == 5
    finally:
        await p.aclose()


async def test_failed_and_missing_requests(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q1", message="Maximum number of tokens max_tokens must be positive")
    emulator.drop_request("q2")
    batch = await bi.submit_batch(
        await bi.create_batch(provider="xai", endpoint=CHAT, model=MODEL, requests=chat_requests(4))
    )
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    rows = {c.custom_id: c async for c in bi.completions(done)}
    assert rows["q1"].status is CompletionStatus.FAILED
    assert rows["q1"].failure_error == "xAI batch request failed"
    assert rows["q1"].failure_reason == "Maximum number of tokens max_tokens must be positive"
    assert rows["q2"].status is CompletionStatus.FAILED
    assert rows["q2"].failure_reason is not None
    assert "not present in the batch's results" in rows["q2"].failure_reason


async def test_a_wrong_key_reads_xais_error_body(emulator: Emulator) -> None:
    p = XAIProvider(api_key="wrong", base_url=emulator.xai_base_url)
    try:
        with pytest.raises(ProviderRejectedError, match="Incorrect API key provided"):
            await p.retrieve_batch("batch_x")
    finally:
        await p.aclose()


def test_the_status_is_read_from_the_counters() -> None:
    p = XAIProvider(api_key="k")

    def status(**body: Any) -> BatchStatus:
        state = {"num_requests": 4, "num_pending": 0, "num_success": 4, "num_error": 0}
        state |= body.pop("state", {})
        return p._batch({"batch_id": "b", "state": state, **body}).status

    assert status() is BatchStatus.COMPLETED
    assert status(state={"num_pending": 2}) is BatchStatus.IN_PROGRESS
    assert status(state={"num_requests": 0, "num_success": 0}) is BatchStatus.IN_PROGRESS
    assert status(cancel_by_xai_message="Model grok-9 is not supported") is BatchStatus.FAILED
    assert status(cancel_time="2025-11-11", state={"num_pending": 1}) is BatchStatus.CANCELLING
    assert status(cancel_time="2025-11-11", state={"num_cancelled": 2}) is BatchStatus.CANCELLED
    assert status(state={"num_cancelled": 2, "num_success": 2}) is BatchStatus.EXPIRED


async def test_the_live_path(bi: BatchInfer, emulator: Emulator) -> None:
    completion = await bi.complete(
        provider="xai",
        endpoint=CHAT,
        model=MODEL,
        body={"messages": [{"role": "user", "content": "hello"}]},
    )
    assert completion.output_text == "Echo: hello"
    assert completion.total_cost is not None
    assert completion.total_cost > 0
    assert ("POST", "/xai/v1/chat/completions") in emulator.requests
