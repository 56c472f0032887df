"""Gemini's batch mode: inline or uploaded input, an operation to follow, results by key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    GeminiProvider,
    ProviderRejectedError,
)
from batchinfer.testing import Emulator
from tests.helpers import calls

MODEL = "gemini-2.5-flash"
CREATE = f"/v1beta/models/{MODEL}:batchGenerateContent"


def contents(n: int, **config: Any) -> list[dict[str, Any]]:
    made = []
    for i in range(n):
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": f"q {i}"}]}]}
        if config:
            body["generationConfig"] = config
        made.append({"custom_id": f"r{i}", "body": body})
    return made


@pytest.fixture
async def bi(engine: AsyncEngine, schema: str, emulator: Emulator) -> AsyncIterator[BatchInfer]:
    providers = [
        GeminiProvider(api_key=emulator.api_key, base_url=emulator.gemini_base_url),
        GeminiProvider(
            api_key=emulator.api_key,
            base_url=emulator.gemini_base_url,
            name="gemini-files",
            inline_max_bytes=0,
            upload_chunk_bytes=1_000,
        ),
    ]
    async with BatchInfer(engine, providers=providers, schema=schema, poll_interval=0) as client:
        await client.migrate()
        yield client


async def run(bi: BatchInfer, emulator: Emulator, provider: str, requests: Any, **kw: Any) -> Any:
    batch = await bi.create_batch(
        provider=provider,
        endpoint=kw.pop("endpoint", "generateContent"),
        model=kw.pop("model", MODEL),
        requests=requests,
    )
    batch = await bi.submit_batch(batch)
    await emulator.finish(batch.provider_batch_id)
    return await bi.wait(batch)


async def test_a_small_batch_goes_inline(bi: BatchInfer, emulator: Emulator) -> None:
    done = await run(bi, emulator, "gemini", contents(3))
    assert done.status is BatchStatus.COMPLETED
    assert done.provider_status == "BATCH_STATE_SUCCEEDED"
    assert done.input_file_id is None
    assert calls(emulator, "POST", "/upload/v1beta/files") == 0
    [sent] = [r for r in emulator.received if r.path == CREATE]
    assert sent.headers["x-goog-api-key"] == emulator.api_key
    rows = [c async for c in bi.completions(done)]
    assert [c.output_text for c in rows] == ["Echo: q 0", "Echo: q 1", "Echo: q 2"]
    assert {c.finish_reason for c in rows} == {"STOP"}


async def test_a_large_batch_is_uploaded_in_chunks_then_applied_from_its_file(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_request("r4", status=400, message="Request contains an invalid argument.")
    done = await run(bi, emulator, "gemini-files", contents(30))
    assert done.status is BatchStatus.COMPLETED
    assert done.input_file_id is not None
    assert done.input_file_id.startswith("files/")
    chunks = [r for r in emulator.received if r.path == "/upload/v1beta/files"]
    assert chunks[0].headers["X-Goog-Upload-Command"] == "start"
    assert [c.headers["X-Goog-Upload-Command"] for c in chunks[1:]][-1] == "upload, finalize"
    assert len(chunks) > 3  # 1,000-byte chunks
    offsets = [int(c.headers["X-Goog-Upload-Offset"]) for c in chunks[1:]]
    assert offsets == sorted(offsets)
    assert offsets[1] == 1_000
    by_status = (await bi.summary(done))["by_status"]
    assert by_status == {"completed": 29, "failed": 1}
    failed = [c async for c in bi.completions(done, status=CompletionStatus.FAILED)]
    assert failed[0].failure_reason == "Request contains an invalid argument."
    assert failed[0].status_code == 400
    # The input file is deleted once the results are in.
    assert done.files_deleted_at is not None
    assert done.input_file_id not in emulator._gemini.files


async def test_thinking_tokens_are_output_and_priced_so(bi: BatchInfer, emulator: Emulator) -> None:
    done = await run(bi, emulator, "gemini", contents(2, thinkingConfig={"thinkingBudget": 512}))
    for c in [c async for c in bi.completions(done)]:
        assert c.response_body is not None
        meta = c.response_body["usageMetadata"]
        assert c.completion_tokens == meta["candidatesTokenCount"] + meta["thoughtsTokenCount"]
        assert c.reasoning_tokens == meta["thoughtsTokenCount"]
        assert c.total_tokens == meta["totalTokenCount"]
        assert c.prompt_tokens is not None
        calc = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=c.prompt_tokens, output_tokens=c.completion_tokens),
            MODEL,
            provider_id="google",
        )
        assert (c.input_cost, c.output_cost) == (
            calc.input_price * Decimal("0.5"),
            calc.output_price * Decimal("0.5"),
        )


async def test_embeddings_in_a_batch(bi: BatchInfer, emulator: Emulator) -> None:
    requests = [
        {"custom_id": f"e{i}", "body": {"content": {"parts": [{"text": f"doc {i}"}]}}}
        for i in range(3)
    ]
    done = await run(
        bi,
        emulator,
        "gemini-files",
        requests,
        endpoint="embedContent",
        model="gemini-embedding-001",
    )
    rows = [c async for c in bi.completions(done)]
    assert {c.status for c in rows} == {CompletionStatus.COMPLETED}
    assert all(c.response_body and len(c.response_body["embedding"]["values"]) == 8 for c in rows)
    assert all(c.prompt_tokens for c in rows)


async def test_a_create_whose_answer_was_lost_is_found_by_its_name(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.lose_answer("POST", CREATE)
    batch = await bi.create_batch(
        provider="gemini", endpoint="generateContent", model=MODEL, requests=contents(2)
    )
    batch = await bi.submit_batch(batch)
    assert calls(emulator, "POST", CREATE) == 1
    assert list(emulator._gemini.batches) == [batch.provider_batch_id]


async def test_quota_429s_are_retried_and_a_bad_key_is_reported(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", CREATE, 429)
    done = await run(bi, emulator, "gemini", contents(2))
    assert done.status is BatchStatus.COMPLETED
    bad = GeminiProvider(api_key="wrong", base_url=emulator.gemini_base_url)
    try:
        with pytest.raises(ProviderRejectedError, match="API key not valid"):
            await bad.retrieve_batch("batches/x")
    finally:
        await bad.aclose()


async def test_requests_are_checked_for_gemini(bi: BatchInfer) -> None:
    from batchinfer import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"body\.contents is required"):
        await bi.create_batch(
            provider="gemini",
            endpoint="generateContent",
            model=MODEL,
            requests=[{"custom_id": "a", "body": {"generationConfig": {}}}],
        )
    with pytest.raises(InvalidRequestError, match="one model"):
        await bi.create_batch(
            provider="gemini",
            endpoint="generateContent",
            model=MODEL,
            requests=[{"custom_id": "a", "body": {**contents(1)[0]["body"], "model": "x"}}],
        )


async def test_the_live_path(bi: BatchInfer, emulator: Emulator) -> None:
    completion = await bi.complete(
        provider="gemini",
        endpoint="generateContent",
        model=MODEL,
        body={"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
    )
    assert completion.output_text == "Echo: hello"
    assert ("POST", f"/v1beta/models/{MODEL}:generateContent") in emulator.requests


# google-genai subclasses aiohttp's ClientSession, which aiohttp warns against.
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_the_google_genai_sdk_drives_the_emulator(emulator: Emulator, tmp_path: Path) -> None:
    """google-genai's async client: an inline batch, an uploaded file and a batch over it, get,
    list, cancel, delete, the responses file's download, and a live call."""
    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key=emulator.api_key,
        http_options=types.HttpOptions(base_url=emulator.gemini_base_url, api_version="v1beta"),
    )
    inline = await client.aio.batches.create(
        model=MODEL,
        src=[{"contents": [{"parts": [{"text": "hi"}], "role": "user"}]}],
        config={"display_name": "inline"},
    )
    assert inline.state == types.JobState.JOB_STATE_PENDING
    assert inline.name is not None
    await emulator.finish(inline.name)
    got = await client.aio.batches.get(name=inline.name)
    assert got.state == types.JobState.JOB_STATE_SUCCEEDED
    assert got.dest is not None
    assert got.dest.inlined_responses is not None
    answer = got.dest.inlined_responses[0].response
    assert answer is not None
    assert answer.text == "Echo: hi"

    source = tmp_path / "in.jsonl"
    lines = [{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}}]
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    uploaded = await client.aio.files.upload(
        file=source, config={"display_name": "in", "mime_type": "jsonl"}
    )
    assert uploaded.name is not None
    from_file = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert from_file.name is not None
    await emulator.finish(from_file.name)
    done = await client.aio.batches.get(name=from_file.name)
    assert done.dest is not None
    assert done.dest.file_name is not None
    content = await client.aio.files.download(file=done.dest.file_name)
    assert orjson.loads(content.splitlines()[0])["key"] == "a"

    listed = [job async for job in await client.aio.batches.list(config={"page_size": 1})]
    assert {job.name for job in listed} == {inline.name, from_file.name}
    other = await client.aio.batches.create(
        model=MODEL, src=[{"contents": [{"parts": [{"text": "y"}]}]}]
    )
    assert other.name is not None
    await client.aio.batches.cancel(name=other.name)
    cancelled = await client.aio.batches.get(name=other.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    await client.aio.batches.delete(name=other.name)
    live = await client.aio.models.generate_content(model=MODEL, contents="hello there")
    assert live.text == "Echo: hello there"
