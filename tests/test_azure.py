"""Azure OpenAI: OpenAI's protocol at Azure's paths, with its auth, versions and quirks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    AuthenticationError,
    AzureOpenAIProvider,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    RateLimitedError,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
DEPLOYMENT = "gpt-4o-mini-batch"


async def run(bi: BatchInfer, emulator: Emulator, n: int = 3) -> Any:
    batch = await bi.create_batch(
        provider="azure", endpoint=CHAT, model=DEPLOYMENT, requests=chat_requests(n)
    )
    batch = await bi.submit_batch(batch)
    await emulator.finish(batch.provider_batch_id)
    return await bi.wait(batch)


@pytest.fixture
async def counted_tokens() -> list[int]:
    return []


@pytest.fixture
async def bi(
    engine: AsyncEngine, schema: str, emulator: Emulator, counted_tokens: list[int]
) -> AsyncIterator[BatchInfer]:
    async def token() -> str:
        counted_tokens.append(1)
        return emulator.api_key

    emulator.azure_deployment(DEPLOYMENT, "gpt-4o-mini-2024-07-18")
    provider = AzureOpenAIProvider(
        endpoint=emulator.azure_endpoint, token_provider=token, api_version="2024-10-21"
    )
    async with BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0) as client:
        await client.migrate()
        yield client


async def test_the_classic_api_with_a_token_asked_for_each_request(
    bi: BatchInfer, emulator: Emulator, counted_tokens: list[int]
) -> None:
    done = await run(bi, emulator)
    assert done.status is BatchStatus.COMPLETED
    azure = [r for r in emulator.received if r.path.startswith("/openai/")]
    assert azure
    assert {r.path.split("/")[2] for r in azure} <= {"files", "batches"}
    assert all(r.headers["Authorization"] == f"Bearer {emulator.api_key}" for r in azure)
    assert len(counted_tokens) == len(azure)
    # Files and batches are not per deployment; the deployment is each line's model.
    (pb,) = emulator.batches
    assert emulator.batches[pb]["endpoint"] == CHAT
    rows = [c async for c in bi.completions(done)]
    assert {c.status for c in rows} == {CompletionStatus.COMPLETED}
    # Priced by the model each response names (the deployment's name has no price).
    first = rows[0]
    assert first.prompt_tokens is not None
    assert first.completion_tokens is not None
    assert first.response_body is not None
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=first.prompt_tokens,
            cache_read_tokens=first.cached_tokens or 0,
            output_tokens=first.completion_tokens,
        ),
        first.response_body["model"],
        provider_id="azure",
    )
    assert first.response_body["model"] == "gpt-4o-mini-2024-07-18"
    assert first.input_cost == calc.input_price * Decimal("0.5")


async def test_the_v1_api_with_a_key_and_the_live_path(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = AzureOpenAIProvider(endpoint=emulator.azure_endpoint, api_key=emulator.api_key)
    async with BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0) as bi:
        await bi.migrate()
        done = await run(bi, emulator, 2)
        assert done.status is BatchStatus.COMPLETED
        live = await bi.complete(
            provider="azure",
            endpoint=CHAT,
            model=DEPLOYMENT,
            body={"messages": [{"role": "user", "content": "hello there"}]},
        )
    assert live.output_text == "Echo: hello there"
    sent = [r for r in emulator.received if r.path.startswith("/openai/v1/")]
    assert all(r.headers["api-key"] == emulator.api_key for r in sent)
    assert ("POST", "/openai/v1/chat/completions") in emulator.requests


async def test_the_classic_live_path_goes_by_deployment(bi: BatchInfer, emulator: Emulator) -> None:
    await bi.complete(
        provider="azure",
        endpoint=CHAT,
        model=DEPLOYMENT,
        body={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert ("POST", f"/openai/deployments/{DEPLOYMENT}/chat/completions") in emulator.requests


async def test_a_full_token_quota_is_retried_not_a_failed_batch(
    bi: BatchInfer, emulator: Emulator
) -> None:
    quota = {
        "error": {
            "code": "token_limit_exceeded",
            "message": "Enqueued token limit reached for gpt-4o-mini (token_limit_exceeded).",
        }
    }
    emulator.fail_http("POST", "/openai/batches", 400, body=quota)
    done = await run(bi, emulator)
    assert done.status is BatchStatus.COMPLETED
    creates = [1 for m, p in emulator.requests if m == "POST" and p == "/openai/batches"]
    assert len(creates) == 2

    emulator.fail_http("POST", "/openai/batches", 400, body=quota, times=None)
    batch = await bi.create_batch(
        provider="azure", endpoint=CHAT, model=DEPLOYMENT, requests=chat_requests(2, prefix="x")
    )
    with pytest.raises(RateLimitedError, match="token_limit_exceeded"):
        await bi.submit_batch(batch)
    # Queued for a worker, it is looked at again later, not ended as refused.
    queued = await bi.create_batch(
        provider="azure",
        endpoint=CHAT,
        model=DEPLOYMENT,
        requests=chat_requests(2, prefix="y"),
        submit=True,
    )
    await bi.worker().run_once()
    again = await bi.get_batch(queued)
    assert again.status is BatchStatus.PENDING
    assert again.step_failures == 1
    assert again.last_error is not None
    assert "token_limit_exceeded" in again.last_error.message


async def test_a_wrong_key_says_so(emulator: Emulator) -> None:
    provider = AzureOpenAIProvider(endpoint=emulator.azure_endpoint, api_key="wrong")
    try:
        with pytest.raises(AuthenticationError, match="Access denied") as info:
            await provider.retrieve_batch("batch_x")
        assert info.value.request_id is not None
    finally:
        await provider.aclose()


async def test_a_failing_token_provider_is_an_authentication_error(emulator: Emulator) -> None:
    def broken() -> str:
        raise RuntimeError("no credential in this environment")

    provider = AzureOpenAIProvider(endpoint=emulator.azure_endpoint, token_provider=broken)
    try:
        with pytest.raises(AuthenticationError, match="no credential in this environment"):
            await provider.retrieve_batch("batch_x")
    finally:
        await provider.aclose()


def test_settings_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="api_key or a token_provider"):
        AzureOpenAIProvider(endpoint="https://r.openai.azure.com")
    with pytest.raises(ValueError, match="api_key or a token_provider"):
        AzureOpenAIProvider(
            endpoint="https://r.openai.azure.com", api_key="k", token_provider=lambda: "t"
        )
    with pytest.raises(ValueError, match="resource's URL"):
        AzureOpenAIProvider(endpoint="r.openai.azure.com", api_key="k")
    limits = AzureOpenAIProvider(endpoint="https://r.openai.azure.com", api_key="k").limits
    assert limits.max_requests == 100_000
    assert "/v1/embeddings" not in limits.endpoints


def test_azures_odd_batch_objects_are_read() -> None:
    """As Microsoft's own examples show them: a capitalised status, ISO times, "" for files
    not there, null counts while validating."""
    provider = AzureOpenAIProvider(endpoint="https://r.openai.azure.com", api_key="k")
    validating = provider._batch(
        {
            "id": "batch_1",
            "object": "batch",
            "status": "Validating",
            "created_at": "2024-07-19T17:13:57.2491382+00:00",
            "output_file_id": "",
            "error_file_id": "",
            "request_counts": {"total": None, "completed": None, "failed": None},
        }
    )
    assert validating.status is BatchStatus.VALIDATING
    assert validating.raw_status == "Validating"
    assert (validating.output_file_id, validating.error_file_id) == (None, None)
    assert validating.request_counts.total == 0
    done = provider._batch(
        {
            "id": "batch_1",
            "status": "Completed",
            "output_file_id": "file-out",
            "error_file_id": "file-err",
            "request_counts": {"total": 2, "completed": 2, "failed": 0},
        }
    )
    assert done.status is BatchStatus.COMPLETED
    assert [s.ref for s in done.results.sources] == ["file-out", "file-err"]
    assert done.results.ready


async def test_the_openai_sdks_azure_client_accepts_every_answer(emulator: Emulator) -> None:
    """openai's AzureOpenAI client, validating every response strictly, on the classic API."""
    import io

    import openai

    client = openai.AsyncAzureOpenAI(
        azure_endpoint=emulator.azure_endpoint,
        api_key=emulator.api_key,
        api_version="2024-10-21",
        max_retries=0,
        _strict_response_validation=True,
    )
    line = (
        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":'
        b'{"model":"gpt-4o-mini-batch","messages":[{"role":"user","content":"hi"}]}}\n'
    )
    async with client:
        uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(line)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await emulator.finish(batch.id)
        done = await client.batches.retrieve(batch.id)
        assert done.status == "completed"
        assert done.output_file_id is not None
        content = await client.files.content(done.output_file_id)
        assert b'"custom_id":"a"' in content.read()
        listed = await client.batches.list(limit=5)
        assert [b.id for b in listed.data] == [batch.id]
        answer = await client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content == "Echo: hello"
