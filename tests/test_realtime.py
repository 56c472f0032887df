from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchStatus,
    Completion,
    CompletionStatus,
    InvalidRequestError,
    OpenAIProvider,
    ProviderRejectedError,
    ProviderUnavailableError,
)
from batchinfer.testing import Emulator

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MTOK = Decimal(1_000_000)

CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            # Keys in the order jsonb keeps them (see test_batch_input_keeps_key_order).
            "properties": {"limit": {"type": "integer"}, "query": {"type": "string"}},
        },
    },
}
RESPONSES_TOOL = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
LONG_TEXT = " ".join(f"w{i % 31}" for i in range(1300))

# (endpoint, model, body): one case per parsed shape.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "chat": (
        CHAT,
        "gpt-4o-mini",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
            ]
        },
    ),
    "chat-tools": (
        CHAT,
        "gpt-4o-mini",
        {"messages": [{"role": "user", "content": "find cats"}], "tools": [CHAT_TOOL]},
    ),
    "chat-long-reasoning": (
        CHAT,
        "o3-mini",
        {"messages": [{"role": "user", "content": LONG_TEXT}], "max_completion_tokens": 4},
    ),
    "responses": (RESPONSES, "gpt-4o-mini", {"input": "Say something nice", "instructions": "Hi"}),
    "responses-tools": (
        RESPONSES,
        "gpt-5-mini",
        {"input": [{"role": "user", "content": "search"}], "tools": [RESPONSES_TOOL]},
    ),
    "embeddings": (EMBEDDINGS, "text-embedding-3-small", {"input": ["alpha beta", "gamma"]}),
}

_VOLATILE = {"id", "created", "created_at", "completed_at"}


def stable(body: dict[str, Any] | None) -> dict[str, Any]:
    assert body is not None
    return {k: v for k, v in body.items() if k not in _VOLATILE}


def fields(c: Completion) -> dict[str, Any]:
    return {
        "status": c.status,
        "status_code": c.status_code,
        "request_body": c.request_body,
        "output_text": c.output_text,
        "tool_calls": c.tool_calls,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.total_tokens,
        "cached_tokens": c.cached_tokens,
        "reasoning_tokens": c.reasoning_tokens,
        "failure_error": c.failure_error,
        "failure_reason": c.failure_reason,
        "response_body": stable(c.response_body),
    }


async def batch_completion(
    bi: BatchInfer, emulator: Emulator, endpoint: str, model: str, body: dict[str, Any]
) -> Completion:
    batch = await bi.create_batch(
        provider="openai",
        endpoint=endpoint,
        model=model,
        requests=[{"custom_id": "only", "body": body}],
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    batch = await bi.wait(batch)
    assert batch.status is BatchStatus.COMPLETED
    (c,) = [c async for c in bi.completions(batch)]
    return c


async def stored_row(engine: AsyncEngine, schema: str, completion_id: int) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                sa.text(
                    f'SELECT batch_id, status, total_cost, output_text FROM "{schema}".completions '
                    "WHERE id = :i"
                ),
                {"i": completion_id},
            )
        ).one()


async def count_rows(engine: AsyncEngine, schema: str) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".completions'))).scalar()
            or 0
        )


@pytest.mark.parametrize("case", list(CASES))
async def test_complete_returns_a_stored_completion(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str, case: str
) -> None:
    endpoint, model, body = CASES[case]

    live = await bi.complete(
        provider="openai", endpoint=endpoint, model=model, body=body, metadata={"case": case}
    )

    assert live.batch_id is None
    assert live.status is CompletionStatus.COMPLETED
    assert live.status_code == 200
    assert live.custom_id.startswith("live-")
    assert live.metadata == {"case": case}
    assert live.request_body == {**body, "model": model}
    assert live.response_body is not None
    assert live.response_body["model"] == model
    assert live.prompt_tokens
    assert live.started_at is not None
    assert live.completed_at is not None
    row = await stored_row(engine, schema, live.id)
    assert row.batch_id is None
    assert row.status == "completed"
    assert row.total_cost == live.total_cost
    assert row.output_text == live.output_text
    assert ("POST", endpoint) in emulator.requests


async def test_live_chat_fields_and_full_price(bi: BatchInfer, emulator: Emulator) -> None:
    endpoint, model, body = CASES["chat"]
    live = await bi.complete(
        provider="openai", endpoint=endpoint, model=model, body=body, custom_id="mine"
    )
    assert live.custom_id == "mine"
    assert live.output_text == "Echo: What is the capital of France?"
    assert live.finish_reason == "stop"
    assert live.tool_calls is None
    assert live.prompt_tokens is not None
    assert live.completion_tokens is not None
    # gpt-4o-mini at the live rate: no batch discount.
    assert live.input_cost == live.prompt_tokens * Decimal("0.15") / MTOK
    assert live.output_cost == live.completion_tokens * Decimal("0.60") / MTOK
    assert live.total_cost == live.input_cost + live.output_cost


async def test_live_tool_call(bi: BatchInfer, emulator: Emulator) -> None:
    endpoint, model, body = CASES["chat-tools"]
    live = await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)
    assert live.finish_reason == "tool_calls"
    assert live.output_text is None
    assert live.tool_calls is not None
    assert [t["function"]["name"] for t in live.tool_calls] == ["lookup"]


@pytest.mark.parametrize("case", list(CASES))
async def test_batch_and_live_paths_agree(bi: BatchInfer, emulator: Emulator, case: str) -> None:
    endpoint, model, body = CASES[case]

    batched = await batch_completion(bi, emulator, endpoint, model, body)
    live = await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)

    assert fields(live) == fields(batched)
    assert batched.batch_id is not None
    assert live.batch_id is None
    # Same tokens, same prices: the batch costs exactly half the live rate.
    assert live.total_cost is not None
    assert live.total_cost > 0
    assert batched.input_cost == live.input_cost * Decimal("0.5")  # type: ignore[operator]
    assert batched.output_cost == live.output_cost * Decimal("0.5")  # type: ignore[operator]
    assert batched.total_cost == live.total_cost * Decimal("0.5")


async def test_agreement_covers_every_parsed_field(bi: BatchInfer, emulator: Emulator) -> None:
    # The comparison above is only meaningful if these cases exercise each field.
    seen: dict[str, set[Any]] = {"tool_calls": set(), "cached": set(), "reasoning": set()}
    for case in ("chat-tools", "chat-long-reasoning", "responses-tools"):
        endpoint, model, body = CASES[case]
        live = await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)
        seen["tool_calls"].add(live.tool_calls is not None)
        seen["cached"].add(bool(live.cached_tokens))
        seen["reasoning"].add(bool(live.reasoning_tokens))
        if case == "chat-long-reasoning":
            assert live.finish_reason == "length"
    assert seen == {
        "tool_calls": {True, False},
        "cached": {True, False},
        "reasoning": {True, False},
    }


@pytest.mark.parametrize(
    ("endpoint", "model", "body", "fragment"),
    [
        (CHAT, "gpt-4o-mini", {"prompt": "no messages"}, "body.messages is required"),
        (CHAT, "gpt-4o-mini", {"messages": [], "stream": True}, "stream"),
        (CHAT, "gpt-4o-mini", {"messages": [], "model": "gpt-4o"}, "differs from the batch"),
        ("/v1/nope", "gpt-4o-mini", {"messages": []}, "not accepted"),
        (EMBEDDINGS, "text-embedding-3-small", {}, "body.input is required"),
    ],
)
async def test_bad_body_rejected_before_any_call(
    bi: BatchInfer,
    emulator: Emulator,
    engine: AsyncEngine,
    schema: str,
    endpoint: str,
    model: str,
    body: dict[str, Any],
    fragment: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)
    assert emulator.requests == []
    assert await count_rows(engine, schema) == 0


async def test_provider_500_after_retries(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    emulator.fail_http("POST", "/chat/completions", 500, times=100)
    endpoint, model, body = CASES["chat"]
    with pytest.raises(ProviderUnavailableError, match="HTTP 500") as info:
        await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)
    assert info.value.status == 500
    calls = [r for r in emulator.requests if r == ("POST", CHAT)]
    assert len(calls) > 1  # retried before giving up
    # The stored row says what happened instead of staying "submitted".
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    f'SELECT status, status_code, failure_error, failure_reason FROM "{schema}"'
                    ".completions"
                )
            )
        ).one()
    assert row.status == "failed"
    assert row.status_code == 500
    assert "500" in row.failure_error
    assert "HTTP 500" in row.failure_reason


async def test_provider_500_then_success(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("POST", "/chat/completions", 500, times=1)
    endpoint, model, body = CASES["chat"]
    live = await bi.complete(provider="openai", endpoint=endpoint, model=model, body=body)
    assert live.status is CompletionStatus.COMPLETED
    assert [r for r in emulator.requests if r == ("POST", CHAT)] == [("POST", CHAT)] * 2


async def test_provider_400_is_not_retried(bi: BatchInfer, emulator: Emulator) -> None:
    with pytest.raises(ProviderRejectedError, match="dimensions") as info:
        await bi.complete(
            provider="openai",
            endpoint=EMBEDDINGS,
            model="text-embedding-3-small",
            body={"input": "x", "dimensions": 0},
        )
    assert info.value.status == 400
    assert [r for r in emulator.requests if r == ("POST", EMBEDDINGS)] == [("POST", EMBEDDINGS)]


async def test_batch_input_keeps_key_order(bi: BatchInfer, emulator: Emulator) -> None:
    schema = {
        "type": "object",
        "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["reasoning", "answer"],
    }
    body = {
        "messages": [{"role": "user", "content": "think first"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    batch = await bi.create_batch(
        provider="openai",
        endpoint=CHAT,
        model="gpt-4o-mini",
        requests=[{"custom_id": "k", "body": body}],
    )
    batch = await bi.submit_batch(batch)
    assert batch.input_file_id is not None
    (line,) = emulator.file_content(batch.input_file_id).splitlines()
    sent = orjson.loads(line)["body"]
    properties = sent["response_format"]["json_schema"]["schema"]["properties"]
    # Property order steers structured outputs, so the batch path keeps the caller's order.
    assert list(properties) == ["reasoning", "answer"]
    assert batch.input_bytes == len(emulator.file_content(batch.input_file_id))


class _BatchOnly(OpenAIProvider):
    """A provider with batches but no live endpoint: the realtime path refuses it."""

    complete = None  # type: ignore[assignment]


async def test_a_provider_without_a_live_path_is_refused_by_name(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    batch_only = _BatchOnly(api_key=emulator.api_key, base_url=emulator.base_url, name="bulk")
    async with BatchInfer(engine, providers=[batch_only], schema=schema) as bi:
        await bi.migrate()
        with pytest.raises(InvalidRequestError, match=r"'bulk' .* has no live path"):
            await bi.complete(
                provider="bulk",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                body={"messages": [{"role": "user", "content": "hi"}]},
            )
    assert emulator.requests == []
