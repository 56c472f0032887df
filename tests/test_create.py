from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    InvalidBatchError,
    InvalidRequestError,
    OpenAIProvider,
)
from batchinfer.domain import BatchLimits
from batchinfer.providers.openai import BATCH_ENDPOINTS
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def ok(custom_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "body": {"messages": [{"role": "user", "content": f"hi {custom_id}"}]},
        **extra,
    }


def line_length(custom_id: str, endpoint: str, body: dict[str, Any]) -> int:
    """The size of one JSONL input line, computed independently of the library's encoder."""
    line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
    return len(orjson.dumps(line)) + 1


async def row_counts(engine: AsyncEngine, schema: str) -> tuple[int, int]:
    async with engine.connect() as conn:
        batches = (await conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".batches'))).scalar()
        completions = (
            await conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".completions'))
        ).scalar()
    return int(batches or 0), int(completions or 0)


async def create(bi: BatchInfer, requests: Any, **kwargs: Any) -> Any:
    params: dict[str, Any] = {"provider": "openai", "endpoint": CHAT, "model": MODEL}
    params.update(kwargs)
    return await bi.create_batch(requests=requests, **params)


def limited(emulator: Emulator, schema: str, engine: AsyncEngine, **limits: Any) -> BatchInfer:
    provider = OpenAIProvider(
        api_key=emulator.api_key,
        base_url=emulator.base_url,
        limits=BatchLimits(endpoints=BATCH_ENDPOINTS, **limits),
    )
    return BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0)


# -- bad inputs: each raises InvalidRequestError naming where and what, and writes nothing ---------

BAD_INPUTS: list[Any] = [
    pytest.param([], {}, ["at least one request"], id="empty-list"),
    pytest.param(
        [ok("a"), {"body": {"messages": []}}],
        {},
        ["requests[1]", "custom_id is missing"],
        id="missing-custom-id",
    ),
    pytest.param(
        [ok("a"), ok("")],
        {},
        ["requests[1]", "custom_id is missing or empty"],
        id="empty-custom-id",
    ),
    pytest.param(
        [ok("a"), ok("   ")],
        {},
        ["requests[1]", "custom_id is missing or empty"],
        id="blank-custom-id",
    ),
    pytest.param(
        [ok("a"), ok("x" * 65)],
        {},
        ["requests[1]", "x" * 65, "longer than 64 characters"],
        id="custom-id-too-long",
    ),
    pytest.param(
        [ok("a"), ok("b"), ok("a")],
        {},
        ["requests[2]", "custom_id 'a'", "duplicate custom_id"],
        id="duplicate-custom-id",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "body": "hello"}],
        {},
        ["requests[1]", "custom_id 'b'", "body must be a dict"],
        id="body-not-a-dict",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "body": {"model": "gpt-4o", "messages": []}}],
        {},
        ["requests[1]", "custom_id 'b'", "'gpt-4o'", "differs from the batch model 'gpt-4o-mini'"],
        id="other-model",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "body": {"messages": [], "stream": True}}],
        {},
        ["requests[1]", "custom_id 'b'", "stream is not supported"],
        id="stream-true",
    ),
    pytest.param(
        [ok("a")],
        {"endpoint": "/v1/fine_tuning"},
        ["'/v1/fine_tuning'", "not accepted by the batch API", CHAT],
        id="unknown-endpoint",
    ),
    pytest.param(
        [ok("a"), ok("b", url="/v1/embeddings")],
        {},
        ["requests[1]", "custom_id 'b'", "'/v1/embeddings'", "differs from the batch endpoint"],
        id="url-differs",
    ),
    pytest.param(
        [ok("a", method="GET")],
        {},
        ["requests[0]", "custom_id 'a'", "method must be POST"],
        id="method-not-post",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "bdy": {"messages": []}}],
        {},
        ["requests[1]", "custom_id 'b'", "unknown key(s) bdy"],
        id="unknown-key",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "body": {"input": "no messages"}}],
        {},
        ["requests[1]", "custom_id 'b'", "body.messages is required"],
        id="chat-without-messages",
    ),
    pytest.param(
        [ok("a"), {"custom_id": "b", "body": {"messages": [], "tags": {"x", "y"}}}],
        {},
        ["requests[1]", "custom_id 'b'", "not JSON-serialisable"],
        id="set-in-body",
    ),
    pytest.param(
        [ok("a"), ok("b", metadata={"seen": {1, 2}})],
        {},
        ["requests[1]", "custom_id 'b'", "not JSON-serialisable"],
        id="set-in-metadata",
    ),
    pytest.param(
        [ok("a"), ok("b", metadata="row-7")],
        {},
        ["requests[1]", "custom_id 'b'", "metadata must be a dict"],
        id="metadata-a-string",
    ),
    pytest.param(
        [ok("a"), ok("b", metadata=[])],
        {},
        ["requests[1]", "custom_id 'b'", "metadata must be a dict"],
        id="metadata-an-empty-list",
    ),
    pytest.param(
        [ok("a"), ok("b", metadata={"note": "\x00"})],
        {},
        ["requests[1]", "custom_id 'b'", "NUL character"],
        id="nul-in-metadata",
    ),
    pytest.param(
        [ok("a"), ok("b\x00")], {}, ["requests[1]", "NUL character"], id="nul-in-custom-id"
    ),
    pytest.param(
        [ok("a"), "not a request"],
        {},
        ["requests[1]", "expected a dict", "got str"],
        id="request-not-a-dict",
    ),
]


@pytest.mark.parametrize(("requests", "kwargs", "fragments"), BAD_INPUTS)
async def test_bad_input_is_rejected_and_nothing_is_written(
    bi: BatchInfer,
    engine: AsyncEngine,
    schema: str,
    requests: list[Any],
    kwargs: dict[str, Any],
    fragments: list[str],
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, requests, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert await row_counts(engine, schema) == (0, 0)


async def test_custom_id_of_exactly_64_characters_is_accepted(bi: BatchInfer) -> None:
    batch = await create(bi, [ok("x" * 64)])
    assert [c.custom_id async for c in bi.completions(batch)] == ["x" * 64]


async def test_escaped_backslash_u0000_text_is_not_mistaken_for_nul(bi: BatchInfer) -> None:
    text = "a literal \\u0000 in source code"
    batch = await create(bi, [{"custom_id": "a", "body": {"messages": [{"content": text}]}}])
    [completion] = [c async for c in bi.completions(batch)]
    assert completion.request_body["messages"][0]["content"] == text


async def test_nul_in_a_body_is_sent_verbatim_and_its_result_stored(
    bi: BatchInfer, emulator: Emulator
) -> None:
    # Bodies are stored as json text, so a NUL escape survives; the model's answer echoes it,
    # and the jsonb/text result columns get U+FFFD in its place instead of failing the chunk.
    body = {"messages": [{"role": "user", "content": "x\x00y"}]}
    batch = await bi.submit_batch(await create(bi, [{"custom_id": "a", "body": body}]))
    assert batch.input_file_id is not None
    assert b"x\\u0000y" in emulator.file_content(batch.input_file_id)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    batch = await bi.wait(batch)
    [completion] = [c async for c in bi.completions(batch)]
    assert completion.request_body == {**body, "model": "gpt-4o-mini"}
    assert completion.status.value == "completed"
    assert completion.output_text is not None
    assert "x\ufffdy" in completion.output_text
    assert "\x00" not in orjson.dumps(completion.response_body).decode()


async def test_unknown_provider_names_the_configured_ones(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    with pytest.raises(InvalidBatchError, match=r"'anthropic'.*configured: openai"):
        await create(bi, [ok("a")], provider="anthropic")
    assert await row_counts(engine, schema) == (0, 0)


# -- limits -----------------------------------------------------------------------------------


def test_default_limits_are_the_batch_apis() -> None:
    limits = OpenAIProvider(api_key="sk-x").limits
    assert limits.max_requests == 50_000
    assert limits.max_custom_id_length == 64
    assert limits.max_bytes in (200 * 1024 * 1024, 200_000_000)
    assert {"/v1/chat/completions", "/v1/responses", "/v1/embeddings"} <= limits.endpoints


async def test_more_than_max_requests_is_rejected(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    async with limited(emulator, schema, engine, max_requests=3) as small:
        with pytest.raises(InvalidRequestError) as info:
            await create(small, [ok(f"r{i}") for i in range(4)])
    message = str(info.value)
    assert "requests[3]" in message
    assert "custom_id 'r3'" in message
    assert "at most 3 requests" in message
    assert await row_counts(engine, schema) == (0, 0)


async def test_exactly_max_requests_is_accepted(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    async with limited(emulator, schema, engine, max_requests=3) as small:
        batch = await create(small, [ok(f"r{i}") for i in range(3)])
    assert batch.request_total == 3
    assert await row_counts(engine, schema) == (1, 3)


async def test_over_max_bytes_names_the_request_that_crosses_the_limit(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    requests = [ok(f"r{i}") for i in range(6)]
    sizes = [line_length(r["custom_id"], CHAT, {**r["body"], "model": MODEL}) for r in requests]
    # The first three lines fit exactly; the fourth crosses the limit.
    limit = sum(sizes[:3])
    async with limited(emulator, schema, engine, max_bytes=limit) as small:
        with pytest.raises(InvalidRequestError) as info:
            await create(small, requests)
        message = str(info.value)
        assert "requests[3]" in message
        assert "custom_id 'r3'" in message
        assert f"exceed {limit:,} bytes" in message
        assert await row_counts(engine, schema) == (0, 0)

        batch = await create(small, requests[:3])
    assert batch.input_bytes == limit


# -- async iterables and atomicity ------------------------------------------------------------


async def test_async_generator_is_accepted(bi: BatchInfer) -> None:
    async def generate() -> AsyncIterator[dict[str, Any]]:
        for request in chat_requests(5):
            yield request

    batch = await create(bi, generate())
    assert batch.request_total == 5
    assert [c.custom_id async for c in bi.completions(batch)] == [f"q{i}" for i in range(5)]


async def test_async_generator_failing_on_its_third_item_leaves_nothing(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    async def generate() -> AsyncIterator[dict[str, Any]]:
        yield ok("a")
        yield ok("b")
        yield {"custom_id": "c", "body": {"messages": [], "stream": True}}
        yield ok("d")

    with pytest.raises(InvalidRequestError, match=r"requests\[2\], custom_id 'c': stream"):
        await create(bi, generate())
    assert await row_counts(engine, schema) == (0, 0)


async def test_failure_after_rows_were_copied_leaves_nothing(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    # Far enough in that earlier rows have already been sent to Postgres in bulk.
    good = 12_000

    async def generate() -> AsyncIterator[dict[str, Any]]:
        for i in range(good):
            yield {"custom_id": f"r{i}", "body": {"messages": []}}
        yield {"custom_id": "r0", "body": {"messages": []}}

    with pytest.raises(InvalidRequestError, match=rf"requests\[{good}\], custom_id 'r0'"):
        await create(bi, generate())
    assert await row_counts(engine, schema) == (0, 0)


async def test_error_raised_by_the_callers_iterable_propagates_and_leaves_nothing(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    class SourceBroke(Exception):
        pass

    async def generate() -> AsyncIterator[dict[str, Any]]:
        yield ok("a")
        raise SourceBroke("the app's source failed")

    with pytest.raises(SourceBroke):
        await create(bi, generate())
    assert await row_counts(engine, schema) == (0, 0)


# -- what is stored ---------------------------------------------------------------------------


async def test_body_without_model_gets_the_batch_model(bi: BatchInfer) -> None:
    batch = await create(
        bi,
        [ok("a"), {"custom_id": "b", "body": {"model": MODEL, "messages": [], "temperature": 0}}],
    )
    stored = {c.custom_id: c.request_body async for c in bi.completions(batch)}
    assert stored["a"] == {"model": MODEL, "messages": [{"role": "user", "content": "hi a"}]}
    assert stored["b"] == {"model": MODEL, "messages": [], "temperature": 0}


async def test_caller_body_is_not_mutated(bi: BatchInfer) -> None:
    request = ok("a")
    await create(bi, [request])
    assert "model" not in request["body"]


async def test_request_metadata_is_stored_and_never_sent(
    bi: BatchInfer, emulator: Emulator
) -> None:
    requests = [
        ok("a", metadata={"order_id": "ORD-SECRET-4711", "row": 1}),
        ok("b"),
    ]
    batch = await create(bi, requests)
    stored = {c.custom_id: c.metadata async for c in bi.completions(batch)}
    assert stored == {"a": {"order_id": "ORD-SECRET-4711", "row": 1}, "b": {}}

    batch = await bi.submit_batch(batch)
    assert batch.input_file_id is not None
    content = emulator.file_content(batch.input_file_id)
    assert b"ORD-SECRET-4711" not in content
    for line in content.splitlines():
        assert set(orjson.loads(line)) == {"custom_id", "method", "url", "body"}


async def test_batch_metadata_is_stored(bi: BatchInfer) -> None:
    metadata = {"purpose": "nightly-summaries", "run": 3, "tags": ["a", "b"]}
    batch = await create(bi, [ok("a")], metadata=metadata)
    assert batch.metadata == metadata
    assert (await bi.get_batch(batch.id)).metadata == metadata


async def test_new_batch_is_pending_with_pending_children(bi: BatchInfer) -> None:
    batch = await create(bi, [ok("a"), ok("b")])
    assert batch.status is BatchStatus.PENDING
    assert batch.provider_batch_id is None
    assert batch.input_file_id is None
    assert batch.submitted_at is None
    assert batch.ended_at is None
    assert batch.provider == "openai"
    assert batch.endpoint == CHAT
    assert batch.model == MODEL
    assert batch == await bi.get_batch(batch)
    comps = [c async for c in bi.completions(batch)]
    assert {c.status for c in comps} == {CompletionStatus.PENDING}
    assert all(c.started_at is None and c.batch_id == batch.id for c in comps)


async def test_line_numbers_follow_the_given_order(bi: BatchInfer) -> None:
    ids = ["zeta", "alpha", "mu", "beta", "omega"]
    batch = await create(bi, [ok(i) for i in ids])
    comps = [c async for c in bi.completions(batch)]
    assert [c.custom_id for c in comps] == ids
    assert [c.line_no for c in comps] == [1, 2, 3, 4, 5]


async def test_fifty_thousand_requests_in_one_call(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    n = 50_000
    requests: list[dict[str, Any]] = [
        {"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": str(i)}]}}
        for i in range(n)
    ]
    expected_bytes = sum(
        line_length(r["custom_id"], CHAT, {**r["body"], "model": MODEL}) for r in requests
    )
    batch = await create(bi, requests)
    assert batch.request_total == n
    assert batch.input_bytes == expected_bytes
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    f"SELECT count(*), count(DISTINCT line_no), min(line_no), max(line_no), "
                    f'count(DISTINCT custom_id) FROM "{schema}".completions WHERE batch_id = :b'
                ),
                {"b": batch.id},
            )
        ).one()
    assert tuple(row) == (n, n, 1, n, n)


async def test_input_bytes_equals_the_uploaded_file(bi: BatchInfer, emulator: Emulator) -> None:
    requests = chat_requests(500)
    requests[7]["body"]["messages"][1]["content"] = "naïve café, 日本語 and an emoji 🎉"
    requests[9]["body"]["temperature"] = 0.25
    expected = sum(
        line_length(r["custom_id"], CHAT, {**r["body"], "model": MODEL}) for r in requests
    )
    batch = await create(bi, requests)
    assert batch.input_bytes == expected
    batch = await bi.submit_batch(batch)
    assert batch.input_file_id is not None
    assert len(emulator.file_content(batch.input_file_id)) == expected
