"""Result downloads that survive dropped connections: resumed with Range where the server has
it, restarted with the bytes already read skipped where it does not, nothing applied twice."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import stamina
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    ApplyReport,
    Batch,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    OpenAIProvider,
    ProviderRejectedError,
    ProviderUnavailableError,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
LINES = 2_500
# conftest's stamina.set_testing(attempts=3): one GET, then up to three resumptions.
RESUMES = 3


async def finished(bi: BatchInfer, emulator: Emulator, requests: list[dict[str, Any]]) -> Batch:
    batch = await bi.create_batch(provider="openai", endpoint=CHAT, model=MODEL, requests=requests)
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    batch = await bi.get_batch(batch)
    assert batch.output_file_id is not None
    return batch


def content_path(batch: Batch) -> str:
    return f"/files/{batch.output_file_id}/content"


async def assert_all_applied_correctly(bi: BatchInfer, emulator: Emulator, batch: Batch) -> None:
    assert batch.output_file_id is not None
    lines = emulator.file_content(batch.output_file_id).splitlines()
    expected = {
        r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
        for r in map(orjson.loads, lines)
    }
    got = {c.custom_id: (c.status, c.output_text) async for c in bi.completions(batch)}
    assert got == {cid: (CompletionStatus.COMPLETED, text) for cid, text in expected.items()}


def ranges_asked(emulator: Emulator, batch: Batch) -> list[str | None]:
    path = f"/v1{content_path(batch)}"
    return [r.headers.get("Range") for r in emulator.received if r.path == path]


# ---------------------------------------------------------------- through a results pass


@pytest.mark.parametrize("drops", [1, 2, 3])
async def test_drops_mid_download_are_resumed_with_range(
    bi: BatchInfer, emulator: Emulator, drops: int
) -> None:
    batch = await finished(bi, emulator, chat_requests(LINES))
    size = len(emulator.file_content(str(batch.output_file_id)))
    step = size // (drops + 1) - 7  # anywhere, mid-line as likely as not
    emulator.drop_connection("GET", content_path(batch), times=drops, after_bytes=step)

    done = await bi.fetch_batch_results(batch)

    assert bi.last_apply_report == ApplyReport(applied=LINES)
    await assert_all_applied_correctly(bi, emulator, done)
    asked = ranges_asked(emulator, batch)
    # Each resumption starts where the last answer broke off: no later than its cut, since a
    # client may lose what it still buffered when the connection went.
    starts = [int(str(r).removeprefix("bytes=").removesuffix("-")) for r in asked[1:]]
    assert asked[0] is None
    assert len(starts) == drops
    assert all(a < b for a, b in zip([0, *starts], starts, strict=False))
    assert all(start <= k * step for k, start in enumerate(starts, 1))
    content_gets = [r for r in emulator.received if r.path == f"/v1{content_path(batch)}"]
    assert {r.headers["Accept-Encoding"] for r in content_gets} == {"identity"}


@pytest.mark.parametrize("drops", [1, 3])
async def test_without_range_support_a_download_restarts_and_skips_what_was_read(
    bi: BatchInfer, emulator: Emulator, drops: int
) -> None:
    emulator.ranges = False
    batch = await finished(bi, emulator, chat_requests(LINES))
    size = len(emulator.file_content(str(batch.output_file_id)))
    # Each attempt starts at byte 0 again, so each is cut a little further on.
    for k in range(1, drops + 1):
        emulator.drop_connection("GET", content_path(batch), after_bytes=k * size // (drops + 2))

    done = await bi.fetch_batch_results(batch)

    assert bi.last_apply_report == ApplyReport(applied=LINES)  # no duplicates, nothing twice
    await assert_all_applied_correctly(bi, emulator, done)
    assert len(ranges_asked(emulator, batch)) == drops + 1


@pytest.mark.parametrize("ranges", [True, False])
async def test_drops_inside_multibyte_characters(
    bi: BatchInfer, emulator: Emulator, ranges: bool
) -> None:
    emulator.ranges = ranges
    requests = [
        {
            "custom_id": f"u{i}",
            "body": {"messages": [{"role": "user", "content": f"{i} ü 漢字 🙂 ok"}]},
        }
        for i in range(300)
    ]
    batch = await finished(bi, emulator, requests)
    content = emulator.file_content(str(batch.output_file_id))
    emoji = content.index("🙂".encode(), len(content) // 3) + 2  # two bytes into four
    han = content.index("漢".encode(), 2 * len(content) // 3) + 1  # one byte into three
    emulator.drop_connection("GET", content_path(batch), after_bytes=emoji)
    emulator.drop_connection("GET", content_path(batch), after_bytes=han - emoji if ranges else han)

    done = await bi.fetch_batch_results(batch)

    assert bi.last_apply_report == ApplyReport(applied=300)
    await assert_all_applied_correctly(bi, emulator, done)
    texts = {c.output_text async for c in bi.completions(done)}
    assert "Echo: 7 ü 漢字 🙂 ok" in texts
    # Asked the same either way; without Range support the answers were whole files, skipped.
    asked = ranges_asked(emulator, batch)
    assert asked == [None, f"bytes={emoji}-", f"bytes={han}-"]
    assert all(content[n] & 0xC0 == 0x80 for n in (emoji, han))  # both inside a character


async def test_more_drops_than_attempts_fail_the_pass_and_a_later_one_finishes(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    # Small chunks, so what was read before the download gave up is written meanwhile.
    async with BatchInfer(engine, providers=[provider], schema=schema, apply_chunk_size=50) as bi:
        await bi.migrate()
        await more_drops_than_attempts(bi, emulator)


async def more_drops_than_attempts(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(LINES))
    size = len(emulator.file_content(str(batch.output_file_id)))
    step = size // 10
    emulator.drop_connection("GET", content_path(batch), times=1 + RESUMES, after_bytes=step)

    with pytest.raises(ProviderUnavailableError) as info:
        await bi.fetch_batch_results(batch)

    message = str(info.value)
    assert f"downloading file {batch.output_file_id}" in message
    assert "dropped mid-download" in message
    assert re.search(rf"gave up after \d+ of {size} bytes", message), message
    half = await bi.get_batch(batch)
    assert half.results_applied_at is None
    done_before = [c async for c in bi.completions(batch, status=CompletionStatus.COMPLETED)]
    assert 0 < len(done_before) < LINES

    done = await bi.fetch_batch_results(batch)

    report = bi.last_apply_report
    assert report is not None
    assert report.applied + report.already_applied == LINES
    assert report.already_applied >= len(done_before)
    assert report.duplicates == 0
    await assert_all_applied_correctly(bi, emulator, done)


async def test_a_resume_rides_through_5xx_and_429(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(200))
    emulator.drop_connection("GET", content_path(batch), after_bytes=5_000)
    emulator.fail_http("GET", content_path(batch), 503, headers={"Retry-After": "0"})
    emulator.fail_http("GET", content_path(batch), 429, headers={"retry-after-ms": "1"})

    done = await bi.fetch_batch_results(batch)

    assert bi.last_apply_report == ApplyReport(applied=200)
    await assert_all_applied_correctly(bi, emulator, done)
    assert ranges_asked(emulator, batch) == [None] + ["bytes=5000-"] * 3


async def test_a_resume_waits_as_long_as_retry_after_says(
    emulator: Emulator, provider: OpenAIProvider
) -> None:
    file_id = upload_direct(emulator, b"x" * 100_000)
    path = f"/files/{file_id}/content"
    emulator.drop_connection("GET", path, after_bytes=10)
    emulator.fail_http("GET", path, 503, headers={"retry-after-ms": "300"})
    emulator.fail_http("GET", path, 429, headers={"retry-after-ms": "200"})
    started = time.monotonic()
    with stamina.set_testing(False):
        assert await read_all(provider, file_id) == b"x" * 100_000
    assert time.monotonic() - started >= 0.5


async def test_a_resume_refused_outright_is_not_retried(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(200))
    emulator.drop_connection("GET", content_path(batch), after_bytes=5_000)
    emulator.fail_http("GET", content_path(batch), 404)

    with pytest.raises(ProviderRejectedError, match="resuming after 5000 of"):
        await bi.fetch_batch_results(batch)

    assert len(ranges_asked(emulator, batch)) == 2
    done = await bi.fetch_batch_results(batch)
    assert done.results_applied_at is not None
    await assert_all_applied_correctly(bi, emulator, done)


# ---------------------------------------------------------------- the byte stream itself


@pytest.fixture
async def provider(emulator: Emulator) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    yield p
    await p.aclose()


def upload_direct(emulator: Emulator, content: bytes) -> str:
    file_id = f"file-test{len(emulator.files)}"
    emulator.files[file_id] = content
    return file_id


async def read_all(provider: OpenAIProvider, file_id: str) -> bytes:
    out = bytearray()
    async with provider.open_file(file_id) as chunks:
        async for chunk in chunks:
            assert len(chunk) <= 256 * 1024  # memory stays one chunk, whatever the file
            out += chunk
    return bytes(out)


async def test_a_big_file_comes_back_whole_in_bounded_chunks(
    emulator: Emulator, provider: OpenAIProvider
) -> None:
    content = bytes(range(256)) * (12 * 1024)  # 3 MiB
    file_id = upload_direct(emulator, content)
    emulator.drop_connection("GET", f"/files/{file_id}/content", times=2, after_bytes=1_100_000)
    assert await read_all(provider, file_id) == content


async def test_a_consumer_that_stops_early_releases_the_resumed_download(
    emulator: Emulator, provider: OpenAIProvider
) -> None:
    content = b"y" * 2_000_000
    file_id = upload_direct(emulator, content)
    emulator.drop_connection("GET", f"/files/{file_id}/content", after_bytes=300_000)
    seen = 0
    async with provider.open_file(file_id) as chunks:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > 600_000:
                break
    assert 600_000 < seen < len(content)
    assert await read_all(provider, file_id) == content  # the connection pool is still sound


async def test_an_error_answer_to_the_first_request_is_raised_at_once(
    emulator: Emulator, provider: OpenAIProvider
) -> None:
    file_id = upload_direct(emulator, b"z" * 10)
    emulator.fail_http("GET", f"/files/{file_id}/content", 503)
    with pytest.raises(ProviderUnavailableError, match="HTTP 503"):
        await read_all(provider, file_id)
    assert len(emulator.requests) == 1


# ---------------------------------------------------------------- servers that do it oddly


@pytest.fixture
async def odd_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A file server whose ranged answers are short or start at the wrong byte."""
    content = bytes(range(250)) * 14  # 3,500 bytes
    state: dict[str, Any] = {"mode": "capped", "content": content, "asked": []}

    async def serve(request: web.Request) -> web.StreamResponse:
        asked = request.headers.get("Range")
        state["asked"].append(asked)
        size = len(content)
        if asked is None:
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            if len(state["asked"]) == 1:  # the first answer breaks off
                await response.write(content[:1000])
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(content)
            await response.write_eof()
            return response
        start = int(asked.removeprefix("bytes=").removesuffix("-"))
        if state["mode"] == "wrong-start":
            start_sent, end = 0, size
        else:  # at most 1,000 bytes per answer, as some CDNs do
            start_sent, end = start, min(start + 1000, size)
        return web.Response(
            status=206,
            body=content[start_sent:end],
            headers={"Content-Range": f"bytes {start_sent}-{end - 1}/{size}"},
            content_type="application/octet-stream",
        )

    app = web.Application()
    app.router.add_get("/v1/files/{file_id}/content", serve)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1", state
    await runner.cleanup()


async def test_short_ranged_answers_are_continued(odd_server: tuple[str, dict[str, Any]]) -> None:
    base_url, state = odd_server
    provider = OpenAIProvider(api_key="sk-x", base_url=base_url)
    try:
        assert await read_all(provider, "file-odd") == state["content"]
    finally:
        await provider.aclose()
    assert state["asked"] == [None, "bytes=1000-", "bytes=2000-", "bytes=3000-"]


async def test_a_ranged_answer_from_the_wrong_byte_falls_back_to_a_restart(
    odd_server: tuple[str, dict[str, Any]],
) -> None:
    base_url, state = odd_server
    state["mode"] = "wrong-start"
    provider = OpenAIProvider(api_key="sk-x", base_url=base_url)
    try:
        assert await read_all(provider, "file-odd") == state["content"]
    finally:
        await provider.aclose()
    assert state["asked"] == [None, "bytes=1000-", None]
